"""Decoder-layer lookup across architectures, key prefixes, and --layers parsing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TINY_ARCHS, make_tiny_model
from layerzo.errors import ArchitectureError, LayerIndexError
from layerzo.model.layers import (
    KNOWN_LAYER_PATHS,
    LayerLayout,
    find_layer_layout,
    get_layer,
    get_layers,
    layer_parameter_names,
    parse_layer_spec,
)

EXPECTED_PATH = {"gpt2": "transformer.h", "opt": "model.decoder.layers", "gpt_neox": "gpt_neox.layers"}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_finds_layers_and_key_prefixes_match_state_dict(arch):
    model = make_tiny_model(arch, num_layers=3)
    layout = find_layer_layout(model)
    assert layout == LayerLayout(EXPECTED_PATH.get(arch, "model.layers"), 3)
    keys = list(model.state_dict().keys())
    for i in range(3):
        prefix = layout.key_prefix(i)
        layer_keys = {k for k in keys if k.startswith(prefix)}
        # the layer module's own state dict, prefixed, is exactly the model's keys under the prefix
        assert layer_keys == {prefix + k for k in get_layer(model, layout, i).state_dict()}
        assert layer_keys and all(layout.layer_of_key(k) == i for k in layer_keys)
        params = layer_parameter_names(model, layout, i)
        assert params and set(params) <= layer_keys
    assert all(layout.layer_of_key(k) is None for k in keys if not k.startswith(layout.path + "."))
    assert len(get_layers(model, layout)) == 3


def test_layer_index_10_does_not_collide_with_1():
    layout = LayerLayout("model.layers", 12)
    assert layout.layer_of_key("model.layers.10.mlp.up_proj.weight") == 10
    assert layout.key_prefix(1) == "model.layers.1."
    assert not "model.layers.10.x".startswith(layout.key_prefix(1))


def test_base_model_found_through_config_layer_count():
    causal = make_tiny_model("llama", num_layers=2)
    layout = find_layer_layout(causal.model)  # LlamaModel: its layers sit at "layers", not a known path
    assert layout == LayerLayout("layers", 2)


def test_plain_module_raises_architecture_error_naming_paths():
    with pytest.raises(ArchitectureError) as info:
        find_layer_layout(nn.Linear(2, 2))
    message = str(info.value)
    assert "Linear" in message and all(path in message for path in KNOWN_LAYER_PATHS)
    assert "\n" not in message


def test_module_without_module_list_raises():
    class Config:
        num_hidden_layers = 2

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = Config()
            self.blocks = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))

    with pytest.raises(ArchitectureError, match="num_hidden_layers=2"):
        find_layer_layout(Odd())


def test_ambiguous_module_lists_raise():
    class Config:
        num_hidden_layers = 2

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = Config()
            self.a = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
            self.b = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])

    with pytest.raises(ArchitectureError):
        find_layer_layout(Twin())


def test_check_index():
    layout = LayerLayout("model.layers", 4)
    layout.check_index(3)
    for bad in (4, -1):
        with pytest.raises(LayerIndexError, match="0-3"):
            layout.check_index(bad)
    with pytest.raises(LayerIndexError):
        get_layer(make_tiny_model("llama", num_layers=2), LayerLayout("model.layers", 2), 2)


@pytest.mark.parametrize("spec, expected", [
    ("dominant", "dominant"), (" ALL ", "all"), ("3", (3,)), ("3,1,3", (1, 3)), ("-1", (29,)),
    ("0, 29", (0, 29)), (7, (7,)), ([2, -2], (2, 28)), ((5,), (5,)),
])
def test_parse_layer_spec(spec, expected):
    assert parse_layer_spec(spec, 30) == expected


@pytest.mark.parametrize("spec, needle", [
    ("30", "out of range"), ("-31", "out of range"), ("a,b", "'a,b'"), ("", "names no layer"), ([], "names no layer"),
    ("1.5", "1.5"),
])
def test_parse_layer_spec_errors(spec, needle):
    with pytest.raises(LayerIndexError, match=needle):
        parse_layer_spec(spec, 30)


def test_layers_of_tuple_returning_architectures_are_modules():
    # GPT-2 / OPT layers return tuples; the lookup itself must not care
    model = make_tiny_model("gpt2", num_layers=2)
    out = get_layer(model, find_layer_layout(model), 0)(torch.zeros(1, 3, 32))
    assert isinstance(out, (tuple, torch.Tensor))
