"""``layerzo.load(base, patch)``: the patch applied in memory, after the same checks as apply."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from layerzo.api import load
from layerzo.errors import BaseMismatchError, PatchError
from patch_helpers import copy_tokenizer, make_patch

IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


@pytest.fixture(scope="module")
def base_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def test_load_applies_exactly_the_patch_tensors(tiny_llama_dir, base_model, tmp_path):
    patch = make_patch(base_model, 2, base_model=str(tiny_llama_dir))
    folder = patch.save_pretrained(tmp_path / "p")
    model, tokenizer = load(tiny_llama_dir, folder)
    state = model.state_dict()
    for key, value in state.items():
        expected = patch.tensors.get(key, base_model.state_dict()[key])
        assert torch.equal(value, expected), key
    assert tokenizer("hello")["input_ids"]
    with torch.no_grad():
        assert not torch.equal(model(IDS).logits, base_model(IDS).logits)


def test_load_accepts_a_layer_patch_object_and_is_repeatable(tiny_llama_dir, base_model):
    patch = make_patch(base_model, 1)
    a, _ = load(tiny_llama_dir, patch)
    b, _ = load(tiny_llama_dir, patch)
    with torch.no_grad():
        assert torch.equal(a(IDS).logits, b(IDS).logits)


def test_load_refuses_another_base(tmp_path, base_model, tiny_llama_dir):
    other = tmp_path / "other"
    make_tiny_model("llama", seed=11).save_pretrained(other)
    copy_tokenizer(tiny_llama_dir, other)
    with pytest.raises(BaseMismatchError, match="differs from the one the patch was made from"):
        load(other, make_patch(base_model, 2))
    model, _ = load(other, make_patch(base_model, 2), force=True)  # force skips only the fingerprint
    assert torch.equal(model.get_parameter("model.layers.2.mlp.up_proj.weight"),
                       make_patch(base_model, 2).tensors["model.layers.2.mlp.up_proj.weight"])


def test_load_bf16_casts_the_patch(tiny_llama_dir, base_model):
    patch = make_patch(base_model, 2)
    with pytest.raises(BaseMismatchError) as info:  # bf16-rounded base values are not the fp32 base
        load(tiny_llama_dir, patch, dtype="bfloat16")
    assert "load it as float32" in info.value.one_line()
    model, _ = load(tiny_llama_dir, patch, dtype="bfloat16", force=True)
    key = "model.layers.2.self_attn.k_proj.weight"
    assert model.get_parameter(key).dtype == torch.bfloat16
    assert torch.equal(model.get_parameter(key), patch.tensors[key].to(torch.bfloat16))


def test_missing_patch_is_one_line(tiny_llama_dir, tmp_path):
    with pytest.raises(PatchError) as info:
        load(tiny_llama_dir, tmp_path / "missing")
    assert "\n" not in info.value.one_line()


def test_package_root_reexports_load():
    import layerzo

    assert layerzo.load is load
