"""The patch format's data: the manifest, trajectory steps, tensor-name and LoRA checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import make_tiny_model
from layerzo.errors import PatchError, PatchFormatError
from layerzo.patch.manifest import (TRAJECTORY_NAME, PatchManifest, TrajectoryStep, all_finite, infer_layer_path,
                                    lora_base_key, read_trajectory, validate_tensors)
from patch_helpers import make_patch


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama", num_layers=4, seed=3)


def test_lora_manifest_needs_rank_and_alpha(model):
    base = make_patch(model, 2).manifest.to_dict()
    with pytest.raises(PatchFormatError, match="lora"):
        PatchManifest(**{**base, "kind": "lora", "lora": None})


def test_manifest_round_trips_through_a_plain_dict(model):
    manifest = make_patch(model, 2).manifest
    data = manifest.to_dict()
    assert data["layers"] == [2]  # JSON-ready: a list, not a tuple
    assert PatchManifest.from_dict(data) == manifest
    with pytest.raises(PatchFormatError, match="unknown field"):
        PatchManifest.from_dict({**data, "extra": 1})


def test_lora_scale_is_alpha_over_r(model):
    base = make_patch(model, 2).manifest
    with pytest.raises(PatchFormatError, match="not lora"):
        base.lora_scale
    lora = dataclasses.replace(base, kind="lora", lora={"r": 4, "alpha": 8.0, "target_modules": ["q_proj"]})
    assert lora.lora_scale == 2.0


def test_trajectory_step_json_round_trip():
    step = TrajectoryStep(3, [7, 8], [0.5, -1.25], 1e-3)  # lists become tuples
    assert step.seeds == (7, 8) and step.grads == (0.5, -1.25)
    assert TrajectoryStep.from_json(step.to_json(), "x") == step


@pytest.mark.parametrize("line, match", [
    ('{"step": 0, "seeds": [1], "grads": [1.0, 2.0], "lr": 0.1}', "grads must be 1 finite numbers"),
    ('{"step": -1, "seeds": [1], "grads": [1.0], "lr": 0.1}', "non-negative integer"),
    ('{"step": 0, "seeds": [18446744073709551615], "grads": [1.0], "lr": 0.1}', "63-bit"),
    ('{"step": 0, "seeds": 5, "grads": [1.0], "lr": 0.1}', "must be lists"),
    ('{"step": 0, "seeds": [1], "grads": [1.0], "lr": Infinity}', "lr must be a finite number"),
])
def test_bad_trajectory_steps_name_where_they_are(line, match):
    with pytest.raises(PatchFormatError, match=match) as info:
        TrajectoryStep.from_json(line, "trajectory.jsonl:4")
    assert str(info.value).startswith("trajectory.jsonl:4: ")


def test_read_trajectory_skips_blank_lines_and_a_missing_file_is_empty(tmp_path):
    assert read_trajectory(tmp_path / TRAJECTORY_NAME) == []
    steps = [TrajectoryStep(0, (1,), (0.5,), 0.1), TrajectoryStep(2, (2,), (0.25,), 0.1)]
    (tmp_path / TRAJECTORY_NAME).write_text(steps[0].to_json() + "\n\n" + steps[1].to_json() + "\n")
    assert read_trajectory(tmp_path / TRAJECTORY_NAME) == steps


def test_infer_layer_path():
    assert infer_layer_path(["model.layers.3.mlp.up_proj.weight", "model.layers.4.input_layernorm.weight"]) == "model.layers"
    assert infer_layer_path(["transformer.h.0.attn.c_attn.weight"]) == "transformer.h"
    assert infer_layer_path(["model.decoder.layers.1.fc1.weight"]) == "model.decoder.layers"  # the longest match
    with pytest.raises(PatchError, match="not inside a decoder layer"):
        infer_layer_path(["lm_head.weight"])
    with pytest.raises(PatchError, match="several layer paths"):
        infer_layer_path(["model.layers.0.w", "transformer.h.0.w"])


def test_lora_base_key():
    assert lora_base_key("model.layers.2.self_attn.q_proj.lora_A.weight") == "model.layers.2.self_attn.q_proj.weight"
    assert lora_base_key("model.layers.2.self_attn.q_proj.lora_B.weight") == "model.layers.2.self_attn.q_proj.weight"
    with pytest.raises(PatchError, match="must end with"):
        lora_base_key("model.layers.2.self_attn.q_proj.weight")


def test_all_finite():
    t = torch.randn(100, generator=torch.Generator().manual_seed(0))
    assert all_finite(t) and all_finite(torch.full((4,), 6e4, dtype=torch.float16))  # a float16 sum would overflow
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = t.clone()
        u[57] = bad
        assert not all_finite(u)


def test_lora_tensors_must_come_in_pairs_of_rank_r(model):
    stem = "model.layers.2.self_attn.q_proj"
    w = model.get_parameter(stem + ".weight")
    manifest = dataclasses.replace(make_patch(model, 2).manifest, kind="lora", base_fingerprint={stem + ".weight": "0" * 64},
                                   lora={"r": 4, "alpha": 4.0})
    a, b = torch.zeros(4, w.shape[1]), torch.zeros(w.shape[0], 4)
    validate_tensors(manifest, {stem + ".lora_A.weight": a, stem + ".lora_B.weight": b})
    with pytest.raises(PatchError, match="no .*lora_B"):
        validate_tensors(manifest, {stem + ".lora_A.weight": a})
    with pytest.raises(PatchError, match="do not match r=4"):
        validate_tensors(manifest, {stem + ".lora_A.weight": torch.zeros(2, w.shape[1]),
                                    stem + ".lora_B.weight": torch.zeros(w.shape[0], 2)})
