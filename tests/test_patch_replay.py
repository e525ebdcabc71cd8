"""Replay: rebuilding a patch's tensors from its ZO trajectory on the base, bit for bit."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tiny_model
from layerzo.cli.main import app
from layerzo.errors import BaseMismatchError, PatchError
from layerzo.patch.format import LayerPatch
from layerzo.patch.manifest import TRAJECTORY_NAME, WEIGHTS_NAME, TrajectoryStep
from layerzo.patch.replay import replay_patch, zo_config_from_recipe
from patch_helpers import make_patch, reseal
from test_patch_apply import IDS, base_model, load_dir, run_apply  # noqa: F401  (base_model: fixture)


def _zo_patch(base_model, tiny_llama_dir, steps=3):
    """A real ZO run (the tune engineer's engine) on layer 1 of the tiny model."""
    from layerzo.model.layers import find_layer_layout, layer_parameter_names
    from layerzo.zo.engine import TunedParams, ZOConfig, ZOState, zo_step

    model = load_dir(tiny_llama_dir)
    names = layer_parameter_names(model, find_layer_layout(model), 1)
    base = make_patch(model, 1, scale=0.0, base_model=str(tiny_llama_dir))
    config = ZOConfig(lr=1e-2, eps=1e-3, weight_decay=0.1, q=2, momentum=0.5)
    params, state, trajectory = TunedParams.from_model(model, names), ZOState(), []
    for step in range(steps):
        result = zo_step(params, lambda: float(model(IDS).logits.pow(2).mean()), 1000 + step, config, state)
        trajectory.append(TrajectoryStep(step, result.seeds, result.grads, result.lr))
    recipe = {"lr": 1e-2, "eps": 1e-3, "weight_decay": 0.1, "q": 2, "momentum": 0.5, "steps": steps, "dtype": "float32"}
    manifest = base.manifest.__class__(**{**base.manifest.to_dict(), "recipe": recipe,
                                          "metrics": {"replay": {"tensor_order": names, "master_dtype": "float32"}}})
    return LayerPatch(manifest, params.state(), trajectory)


def test_replay_rebuilds_the_patch_bit_exactly(base_model, tiny_llama_dir, tmp_path):
    patch_dir = _zo_patch(base_model, tiny_llama_dir).save_pretrained(tmp_path / "zo")
    result = CliRunner().invoke(app, ["apply", str(tiny_llama_dir), str(patch_dir), "--replay", "--json",
                                      "--replay-out", str(tmp_path / "replayed"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["replay"] == {"steps": 3, "max_abs_diff": 0.0, "bit_exact": True, "saved": str(tmp_path / "replayed")}
    assert (tmp_path / "replayed" / WEIGHTS_NAME).read_bytes() == (patch_dir / WEIGHTS_NAME).read_bytes()
    assert (tmp_path / "out" / "config.json").is_file()


def test_replay_catches_an_edited_trajectory(base_model, tiny_llama_dir, tmp_path):
    patch_dir = _zo_patch(base_model, tiny_llama_dir, steps=2).save_pretrained(tmp_path / "zo")
    lines = (patch_dir / TRAJECTORY_NAME).read_text().splitlines()
    step = json.loads(lines[1])
    step["grads"][0] *= 1.5
    (patch_dir / TRAJECTORY_NAME).write_text(lines[0] + "\n" + json.dumps(step) + "\n")
    reseal(patch_dir)
    result = run_apply(tiny_llama_dir, patch_dir, "--replay")
    assert result.exit_code == 1 and "does not reproduce" in result.stderr


def test_zo_config_comes_from_the_recipe():
    config = zo_config_from_recipe({"lr": 1e-2, "eps": 1e-3, "weight_decay": 0.1, "momentum": 0.5, "q": 2,
                                    "task": "sst2"})  # non-ZO recipe keys are ignored
    assert (config.lr, config.weight_decay, config.momentum, config.q) == (1e-2, 0.1, 0.5, 2)
    with pytest.raises(PatchError, match="records no lr"):
        zo_config_from_recipe({"eps": 1e-3})


def test_replay_refuses_a_lora_patch_before_loading_anything():
    model = make_tiny_model("llama", num_layers=4, seed=3)
    stem = "model.layers.2.self_attn.q_proj"
    w = model.get_parameter(stem + ".weight")
    manifest = dataclasses.replace(make_patch(model, 2).manifest, kind="lora", lora={"r": 2, "alpha": 2.0},
                                   base_fingerprint={stem + ".weight": "0" * 64})
    patch = LayerPatch(manifest, {stem + ".lora_A.weight": torch.zeros(2, w.shape[1]),
                                  stem + ".lora_B.weight": torch.zeros(w.shape[0], 2)},
                       [TrajectoryStep(0, (1,), (0.5,), 1e-3)])
    with pytest.raises(PatchError, match="full-layer patches; this one is kind 'lora'"):
        replay_patch("/nonexistent/base", patch)


def test_replay_on_another_base_is_refused(tiny_llama_dir):
    other = make_tiny_model("llama", num_layers=4, seed=9)
    patch = make_patch(other, 1, base_model=str(tiny_llama_dir), trajectory=(TrajectoryStep(0, (1,), (0.5,), 1e-3),))
    with pytest.raises(BaseMismatchError, match="differs"):
        replay_patch(tiny_llama_dir, patch)
