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
from test_io_hub import hub, online  # noqa: F401  (fixtures)
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


def test_replay_on_another_base_is_refused(tiny_llama_dir):
    other = make_tiny_model("llama", num_layers=4, seed=9)
    patch = make_patch(other, 1, base_model=str(tiny_llama_dir), trajectory=(TrajectoryStep(0, (1,), (0.5,), 1e-3),))
    with pytest.raises(BaseMismatchError, match="differs"):
        replay_patch(tiny_llama_dir, patch)


def _tune(tiny_llama_dir, data_dir, out, save="weights", **kw):
    from layerzo.tune.config import TuneConfig
    from layerzo.tune.loop import tune

    recipe = {"model": str(tiny_llama_dir), "data_dir": str(data_dir), "layers": "2", "steps": 6, "batch_size": 4,
              "num_train": 16, "num_dev": 0, "num_test": 0, "lr": 5e-2, "eps": 1e-2, "momentum": 0.5, **kw}
    return tune(TuneConfig.from_dict(recipe), out, progress=False, save=save)


@pytest.mark.parametrize("kind", ["layers", "lora"])
def test_a_trajectory_only_patch_rebuilds_the_weight_patch_bit_exactly(tiny_llama_dir, data_dir, tmp_path, kind):
    """Same run saved both ways: the KB patch's replay equals the MB patch's tensors; LoRA regenerates its init."""
    import layerzo
    from layerzo.patch.replay import with_weights

    extra = {"lora": True, "lora_rank": 4, "lora_alpha": 8.0, "layers": "1,2"} if kind == "lora" else {}
    _tune(tiny_llama_dir, data_dir, tmp_path / "full", **extra)
    _tune(tiny_llama_dir, data_dir, tmp_path / "traj", save="trajectory", **extra)
    full, traj = LayerPatch.from_pretrained(tmp_path / "full"), LayerPatch.from_pretrained(tmp_path / "traj")
    assert not (tmp_path / "traj" / WEIGHTS_NAME).exists() and not traj.weights_included and full.weights_included
    assert (tmp_path / "traj" / TRAJECTORY_NAME).read_bytes() == (tmp_path / "full" / TRAJECTORY_NAME).read_bytes()
    size = sum(p.stat().st_size for p in (tmp_path / "traj").iterdir())
    assert size < sum(p.stat().st_size for p in (tmp_path / "full").iterdir())
    rebuilt = with_weights(traj, str(tiny_llama_dir))
    assert rebuilt.tensors.keys() == full.tensors.keys()
    assert all(torch.equal(rebuilt.tensors[k], full.tensors[k]) for k in full.tensors)
    replayed = replay_patch(str(tiny_llama_dir), full)  # and a weight patch (LoRA too) replays bit-exactly
    assert replayed.bit_exact and replayed.steps == 6
    ids = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(0))
    a, _ = layerzo.load(str(tiny_llama_dir), tmp_path / "full")
    b, _ = layerzo.load(str(tiny_llama_dir), tmp_path / "traj")  # load rebuilds from the base
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_apply_of_a_trajectory_only_patch_writes_the_same_checkpoint(tiny_llama_dir, data_dir, tmp_path):
    from safetensors.torch import load_file

    _tune(tiny_llama_dir, data_dir, tmp_path / "full")
    _tune(tiny_llama_dir, data_dir, tmp_path / "traj", save="trajectory")
    for name in ("full", "traj"):
        assert run_apply(tiny_llama_dir, tmp_path / name, "-o", tmp_path / f"out-{name}").exit_code == 0
    shards = sorted(p.name for p in (tmp_path / "out-full").glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "out-traj").glob("*.safetensors"))
    for shard in shards:
        x, y = load_file(tmp_path / "out-full" / shard), load_file(tmp_path / "out-traj" / shard)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_a_trajectory_only_patch_refuses_another_base_and_an_unreplayable_device(tiny_llama_dir, data_dir,
                                                                                 tmp_path):
    import layerzo
    from patch_helpers import edit_manifest

    _tune(tiny_llama_dir, data_dir, tmp_path / "traj", save="trajectory")
    other = tmp_path / "other"
    make_tiny_model("llama", num_layers=4, seed=9).save_pretrained(other)  # same shapes, other values
    for f in tiny_llama_dir.glob("tokenizer*"):
        (other / f.name).write_bytes(f.read_bytes())
    with pytest.raises(BaseMismatchError, match="differs from the one the patch was made from"):
        layerzo.load(str(other), tmp_path / "traj")
    result = run_apply(other, tmp_path / "traj", "-o", tmp_path / "out")
    assert result.exit_code == 1 and "differs from the one the patch was made from" in result.stderr
    assert not (tmp_path / "out").exists()
    data = json.loads((tmp_path / "traj" / "layerzo_patch.json").read_text())
    edit_manifest(tmp_path / "traj", metrics={**data["metrics"], "replay": {**data["metrics"]["replay"],
                                                                            "device_type": "cuda"}})
    with pytest.raises(PatchError, match="recorded on cuda"):
        layerzo.load(str(tiny_llama_dir), tmp_path / "traj")


def test_push_trajectory_only_uploads_kilobytes(tiny_llama_dir, data_dir, tmp_path, online, hub):
    from layerzo.patch.source import pull_to_dir, push_patch
    from test_io_hub import TOKEN

    _tune(tiny_llama_dir, data_dir, tmp_path / "full")
    push_patch(tmp_path / "full", "me/kb", token=TOKEN, endpoint=hub.endpoint, trajectory_only=True)
    repo = hub.repos["me/kb"]
    assert WEIGHTS_NAME not in repo.commits[repo.branches["main"]]
    folder, _ = pull_to_dir("me/kb", tmp_path / "pulled", token=TOKEN, endpoint=hub.endpoint)
    pulled = LayerPatch.from_pretrained(folder)
    assert not pulled.weights_included and len(pulled.trajectory) == 6
    from layerzo.patch.replay import with_weights

    full = LayerPatch.from_pretrained(tmp_path / "full")
    rebuilt = with_weights(pulled, str(tiny_llama_dir))
    assert all(torch.equal(rebuilt.tensors[k], full.tensors[k]) for k in full.tensors)
