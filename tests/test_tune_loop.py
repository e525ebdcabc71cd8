"""The tune loop end to end on a tiny checkpoint, plus the CLI and the demo smoke test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from conftest import crash_after_a_checkpoint_then_resume
from layerzo.errors import ConfigError, DivergenceError, LayerIndexError, OutputExistsError
from layerzo.core.hashing import tensor_sha256
from layerzo.model.loading import load_model
from layerzo.patch.format import LayerPatch
from layerzo.patch.manifest import MANIFEST_NAME, TRAJECTORY_NAME, WEIGHTS_NAME
from layerzo.tune.loop import METRICS_NAME, tune
from layerzo.tune.config import TuneConfig
from layerzo.zo.engine import TunedParams, replay_trajectory

REPO = Path(__file__).resolve().parents[1]


def _config(tiny_llama_dir, data_dir, **kw) -> TuneConfig:
    base = dict(model=str(tiny_llama_dir), data_dir=str(data_dir), layers="2", steps=4, batch_size=4,
                eval_every=2, num_train=16, num_dev=8, num_test=8, lr=1e-3, eps=1e-2)
    return TuneConfig.from_dict(dict(**{**base, **kw}))


def _keys(patch_dir: Path) -> list[str]:
    with safe_open(patch_dir / WEIGHTS_NAME, "pt") as f:
        return list(f.keys())


def test_tune_writes_a_one_layer_patch_with_manifest_and_metrics(tiny_llama_dir, data_dir, tmp_path):
    out = tmp_path / "patch"
    result = tune(_config(tiny_llama_dir, data_dir), out, progress=False)
    assert result.layers == (2,)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [WEIGHTS_NAME, MANIFEST_NAME, TRAJECTORY_NAME, "README.md", METRICS_NAME])
    keys = _keys(out)
    assert keys and all(k.startswith("model.layers.2.") for k in keys)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    base = dict(load_model(str(tiny_llama_dir)).model.named_parameters())
    assert manifest["base_fingerprint"] == {k: tensor_sha256(base[k]) for k in keys}
    assert manifest["kind"] == "layers" and manifest["layers"] == [2] and manifest["recipe"]["lr"] == 1e-3
    for name in ("zero_shot_dev_acc", "zero_shot_test_acc", "best_dev_acc", "test_acc"):
        assert name in manifest["metrics"]
    # timing is returned (and logged per step), never written into the patch: same seed → same bytes
    assert "steps_per_second" in result.metrics and "steps_per_second" not in manifest["metrics"]
    rows = [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss_plus", "loss_minus", "grad", "lr", "seconds"} <= set(rows[0]) and "dev_acc" in rows[1]


def test_same_seed_gives_byte_identical_patch_and_replay_rebuilds_it(tiny_llama_dir, data_dir, tmp_path):
    cfg = _config(tiny_llama_dir, data_dir, num_dev=0, q=2, momentum=0.5, weight_decay=0.01)  # no dev: final weights
    a, b = tmp_path / "a", tmp_path / "b"
    tune(cfg, a, progress=False)
    tune(cfg, b, progress=False)
    for name in (WEIGHTS_NAME, TRAJECTORY_NAME):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    patch = LayerPatch.from_pretrained(a)
    assert len(patch.trajectory) == 4
    base = load_model(str(tiny_llama_dir)).model
    params = TunedParams.from_model(base, patch.manifest.metrics["replay"]["tensor_order"])
    assert not all(torch.equal(t, patch.tensors[n]) for n, t in zip(params.names, params.tensors))
    replay_trajectory(params, patch.trajectory, cfg.zo)
    for n, t in zip(params.names, params.tensors):
        assert torch.equal(t, patch.tensors[n]), n


def test_multi_layer_all_and_lora_share_the_format(tiny_llama_dir, data_dir, tmp_path):
    multi = tune(_config(tiny_llama_dir, data_dir, layers="1,3", steps=2), tmp_path / "m", progress=False)
    assert multi.layers == (1, 3)
    assert {k.split(".")[2] for k in _keys(tmp_path / "m")} == {"1", "3"}
    full = tune(_config(tiny_llama_dir, data_dir, layers="all", steps=2), tmp_path / "all", progress=False)
    assert full.layers == (0, 1, 2, 3)
    lora = tune(_config(tiny_llama_dir, data_dir, lora=True, steps=2, num_dev=0), tmp_path / "l", progress=False)
    patch = LayerPatch.from_pretrained(lora.out_dir)
    assert patch.manifest.kind == "lora" and patch.manifest.lora["r"] == 8
    assert sorted(patch.tensors) == sorted(
        f"model.layers.2.self_attn.{p}_proj.lora_{m}.weight" for p in "qv" for m in "AB")
    assert sorted(patch.manifest.base_fingerprint) == [f"model.layers.2.self_attn.{p}_proj.weight" for p in "qv"]
    assert any(bool(t.abs().sum() > 0) for k, t in patch.tensors.items() if "lora_B" in k)  # B moved off zero


def test_bf16_run_keeps_fp32_master_and_moves(tiny_llama_dir, data_dir, tmp_path):
    result = tune(_config(tiny_llama_dir, data_dir, dtype="bfloat16", num_dev=0, lr=1e-4), tmp_path / "p",
                  progress=False)
    patch = LayerPatch.from_pretrained(result.out_dir)
    assert patch.manifest.dtype == "float32"
    base = dict(load_model(str(tiny_llama_dir), dtype="bfloat16").model.named_parameters())
    assert any(not torch.equal(t, base[k].float()) for k, t in patch.tensors.items())


def test_existing_output_is_refused_before_any_work(tmp_path, data_dir):
    out = tmp_path / "p"
    out.mkdir()
    (out / "x").write_text("x")
    cfg = TuneConfig(model=str(tmp_path / "no-such-model"), data_dir=str(data_dir))
    with pytest.raises(OutputExistsError, match="already exists"):
        tune(cfg, out, progress=False)


def test_layer_out_of_range_is_one_clear_line(tiny_llama_dir, data_dir, tmp_path):
    with pytest.raises(LayerIndexError, match=r"out of range.*4 decoder layers") as info:
        tune(_config(tiny_llama_dir, data_dir, layers="7"), tmp_path / "p", progress=False)
    assert "\n" not in info.value.one_line()


def test_divergence_raises_and_still_writes_the_best_patch(tiny_llama_dir, data_dir, tmp_path):
    cfg = _config(tiny_llama_dir, data_dir, lr=1e30, steps=10, eval_every=100, max_bad_steps=2)
    with pytest.raises(DivergenceError, match="diverged") as info:
        tune(cfg, tmp_path / "p", progress=False)
    assert "\n" not in info.value.one_line()
    patch = LayerPatch.from_pretrained(tmp_path / "p")  # the zero-shot (best-dev) weights, all finite
    assert patch.manifest.metrics["diverged"] and patch.trajectory == []


@pytest.mark.parametrize("kw, match", [({"steps": 0}, "steps"), ({"dtype": "int8"}, "dtype"),
                                       ({"lr": -1.0}, "lr"), ({"lr_schedule": "cos"}, "lr_schedule"),
                                       ({"batch_size": 1.5}, "batch_size")])
def test_bad_config_is_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        TuneConfig.from_dict(kw)


def test_cli_options_override_the_recipe(tiny_llama_dir, data_dir, tmp_path):
    from layerzo.cli.main import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_llama_dir}\nlayers: 1\nsteps: 5\nbatch_size: 2\nnum_train: 8\nnum_dev: 4\n"
                      "num_test: 4\nlr: 1e-3\neval_every: 100\n")
    out = tmp_path / "p"
    res = CliRunner().invoke(app, ["tune", "--recipe", str(recipe), "--data-dir", str(data_dir), "--steps", "2",
                                   "--quiet", "--json", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["metrics"]["steps"] == 2 and data["layers"] == [1]
    again = CliRunner().invoke(app, ["tune", "--recipe", str(recipe), "--out", str(out), "--quiet"])
    assert again.exit_code == 1 and "already exists" in again.output


@pytest.mark.demo
def test_demo_cli_tune_writes_a_small_one_layer_patch(data_dir, tmp_path):
    from layerzo.cli.main import app

    out = tmp_path / "P"
    res = CliRunner().invoke(app, ["tune", "--task", "sst2", "--data-dir", str(data_dir), "--steps", "3",
                                   "--num-train", "32", "--num-dev", "8", "--num-test", "8", "--batch-size", "4",
                                   "--keep", "last", "--quiet", "--out", str(out)])
    assert res.exit_code == 0, res.output
    keys = _keys(out)
    assert len({k.split(".")[2] for k in keys}) == 1 and all(k.startswith("model.layers.") for k in keys)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["profile"]["pick"]["layer"] == manifest["layers"][0]
    model = load_model(None).model
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert (out / WEIGHTS_NAME).stat().st_size < 0.05 * model_bytes
    # the same patch as a trajectory-only patch (KBs) rebuilds the weight patch bit-exactly on the demo GGUF
    from layerzo.patch.replay import with_weights

    patch = LayerPatch.from_pretrained(out)
    assert len(patch.trajectory) == 3
    patch.save_pretrained(tmp_path / "T", weights=False)
    trajectory_only = LayerPatch.from_pretrained(tmp_path / "T")
    size = sum(p.stat().st_size for p in (tmp_path / "T").iterdir())
    assert not trajectory_only.weights_included and size < 64 * 1024 < (out / WEIGHTS_NAME).stat().st_size
    rebuilt = with_weights(trajectory_only, None)
    assert all(torch.equal(rebuilt.tensors[k], patch.tensors[k]) for k in patch.tensors)


def test_tune_gives_a_callers_model_back_with_its_structure(tiny_llama_dir, data_dir, tmp_path):
    """No hooks, no LoRA wrappers, the original dtypes: a bf16 model comes back bf16 (so a sweep can run in bf16)."""
    loaded = load_model(str(tiny_llama_dir), dtype="bfloat16")
    model = loaded.model
    modules_before = [(n, type(m).__name__) for n, m in model.named_modules()]
    dtypes_before = {n: p.dtype for n, p in model.named_parameters()}

    def hooks(m):
        return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())

    assert hooks(model) == 0
    for kw in ({"layers": "2"}, {"layers": "1,2", "lora": True}):
        tune(_config(tiny_llama_dir, data_dir, dtype="bfloat16", **kw), tmp_path / kw["layers"], progress=False,
             loaded=loaded)
        assert hooks(model) == 0
        assert [(n, type(m).__name__) for n, m in model.named_modules()] == modules_before
        assert {n: p.dtype for n, p in model.named_parameters()} == dtypes_before


def test_keep_last_writes_the_final_weights_and_best_keeps_the_base_when_nothing_beats_it(tiny_llama_dir, data_dir,
                                                                                          tmp_path):
    from layerzo.patch.replay import replay_patch

    notes: list[str] = []
    # a learning rate of 0 never moves the weights: no dev evaluation can beat the zero-shot one
    best = tune(_config(tiny_llama_dir, data_dir, lr=0.0), tmp_path / "best", progress=False, note=notes.append)
    m = json.loads((tmp_path / "best" / MANIFEST_NAME).read_text())["metrics"]
    assert best.metrics["no_op"] and m["no_op"] is True and m["kept"] == "best" and m["best_step"] == 0
    assert m["applied_steps"] == 4 and (tmp_path / "best" / TRAJECTORY_NAME).read_text() == ""
    assert len(notes) == 1 and notes[0].startswith("warning: no step beat the zero-shot dev accuracy")
    card = (tmp_path / "best" / "README.md").read_text()
    assert "this patch equals its base model" in card and "Trained 4 ZO steps (4 applied)" in card
    assert "trajectory of 0 applied steps" in card  # card and manifest tell the same story
    replayed = replay_patch(str(tiny_llama_dir), LayerPatch.from_pretrained(tmp_path / "best"))
    assert replayed.bit_exact and replayed.steps == 0  # --replay of a no-op patch rebuilds the base

    last = tune(_config(tiny_llama_dir, data_dir, lr=1e-2, keep="last", eval_every=4), tmp_path / "last",
                progress=False)
    m = json.loads((tmp_path / "last" / MANIFEST_NAME).read_text())["metrics"]
    assert m["kept"] == "last" and m["best_step"] == 4 and not m["no_op"] and not last.metrics["no_op"]
    patch = LayerPatch.from_pretrained(tmp_path / "last")
    assert len(patch.trajectory) == 4
    base = dict(load_model(str(tiny_llama_dir)).model.named_parameters())
    assert any(not torch.equal(t, base[n]) for n, t in patch.tensors.items())
    assert replay_patch(str(tiny_llama_dir), patch).bit_exact
    with pytest.raises(ConfigError, match="keep must be one of best, last"):
        _config(tiny_llama_dir, data_dir, keep="first")


def test_the_patch_names_a_local_base_and_data_folder_without_their_paths(tiny_llama_dir, data_dir, tmp_path):
    out = tmp_path / "patch"
    tune(_config(tiny_llama_dir, data_dir, steps=1, eval_every=1), out, progress=False)
    for name in (MANIFEST_NAME, "README.md", WEIGHTS_NAME):
        data = (out / name).read_bytes()
        assert str(tiny_llama_dir).encode() not in data and str(data_dir).encode() not in data, name
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["base_model"] == tiny_llama_dir.name and manifest["recipe"]["model"] == tiny_llama_dir.name
    assert manifest["recipe"]["data_dir"] == Path(data_dir).name
    assert manifest["base_fingerprint"]  # the base is pinned by its tensors, not by where it lies
    tune(_config(tiny_llama_dir, data_dir, steps=1, eval_every=1), tmp_path / "paths", progress=False,
         record_paths=True)
    manifest = json.loads((tmp_path / "paths" / MANIFEST_NAME).read_text())
    assert manifest["base_model"] == str(tiny_llama_dir.resolve()) and manifest["recipe"]["data_dir"] == str(data_dir)


def test_layer_ranges_and_the_last_layer_are_accepted_like_sweep(tiny_llama_dir, data_dir, tmp_path):
    assert tune(_config(tiny_llama_dir, data_dir, layers="0-1,3", steps=1, eval_every=1, num_dev=0),
                tmp_path / "r", progress=False).layers == (0, 1, 3)
    assert tune(_config(tiny_llama_dir, data_dir, layers="-1", steps=1, eval_every=1, num_dev=0),
                tmp_path / "last", progress=False).layers == (3,)


# ----------------------------------------------------------------------------- generative tasks
def _squad(tiny_llama_dir, data_dir, **kw) -> TuneConfig:
    return _config(tiny_llama_dir, data_dir, **{"task": "squad", "max_length": 256, "max_new_tokens": 6,
                                                "eval_batch_size": 8, **kw})


def test_a_generative_task_tunes_with_ce_and_reports_f1_and_em(tiny_llama_dir, data_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    result = tune(_squad(tiny_llama_dir, data_dir), a, progress=False)
    metrics = json.loads((a / MANIFEST_NAME).read_text())["metrics"]
    assert metrics["metric"] == "f1" and metrics["objective"] == "ce" and metrics["max_new_tokens"] == 6
    for name in ("zero_shot_dev_f1", "zero_shot_test_f1", "best_dev_f1", "test_f1", "zero_shot_dev_em",
                 "zero_shot_test_em", "test_em"):
        assert 0.0 <= metrics[name] <= 1.0, name
    assert not any(k.endswith("_acc") for k in metrics)
    assert result.metrics["test_f1"] == metrics["test_f1"]
    rows = [json.loads(line) for line in (a / METRICS_NAME).read_text().splitlines()]
    assert {"dev_f1", "dev_em"} <= set(rows[1]) and rows[0]["loss_plus"] > 0  # ce: positive token cross-entropy
    assert "f1" in (a / "README.md").read_text()
    tune(_squad(tiny_llama_dir, data_dir), b, progress=False)  # deterministic: same bytes
    for name in (WEIGHTS_NAME, TRAJECTORY_NAME, MANIFEST_NAME):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_the_f1_objective_runs_through_tune_and_resumes_byte_identically(tiny_llama_dir, data_dir, tmp_path,
                                                                         monkeypatch):
    config = _squad(tiny_llama_dir, data_dir, objective="f1", num_dev=0, checkpoint_every=2, eps=0.5)
    reference = tmp_path / "ref"
    tune(config, reference, progress=False)
    assert json.loads((reference / MANIFEST_NAME).read_text())["metrics"]["objective"] == "f1"
    crash_after_a_checkpoint_then_resume(config, tmp_path / "p", monkeypatch)
    for name in (WEIGHTS_NAME, TRAJECTORY_NAME, MANIFEST_NAME):
        assert (reference / name).read_bytes() == (tmp_path / "p" / name).read_bytes(), name


def test_a_generative_task_refuses_the_choice_objective_before_loading_the_model(data_dir, tmp_path):
    config = TuneConfig(task="squad", data_dir=str(data_dir), model=str(tmp_path / "no-such-model"), objective="choice")
    with pytest.raises(ConfigError, match="--objective choice does not fit task 'squad', which is generative"):
        tune(config, tmp_path / "p", progress=False)
    assert not (tmp_path / "p").exists()


def test_prompts_longer_than_max_length_are_counted_and_reported(tiny_llama_dir, data_dir, tmp_path):
    notes = []
    tune(_squad(tiny_llama_dir, data_dir, max_length=64, steps=1), tmp_path / "p", progress=False, note=notes.append)
    warning = [n for n in notes if "longer than --max-length 64" in n]
    assert len(warning) == 1 and "16 of 16 train" in warning[0] and "8 of 8 dev" in warning[0]
    assert "6 kept for the answer" in warning[0] and "cut from the left" in warning[0]


def test_chat_data_learns_the_assistant_turns_rendered_with_the_chat_template(tiny_llama_dir, data_dir, tmp_path):
    rows = [json.loads(line) for line in (data_dir / "sst2" / "train.jsonl").read_text().splitlines()[:40]]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Is this review positive or negative? {r['sentence'].strip()}"},
        {"role": "assistant", "content": "positive" if r["label"] else "negative"}]}) + "\n" for r in rows))
    result = tune(_config(tiny_llama_dir, data_dir, task=str(path), max_length=128, max_new_tokens=4,
                          num_dev=8, num_test=8), tmp_path / "p", progress=False)
    manifest = json.loads((tmp_path / "p" / MANIFEST_NAME).read_text())
    assert manifest["metrics"]["metric"] == "f1" and manifest["metrics"]["objective"] == "ce"
    # 40 rows: test and dev get a fifth each (8), train the rest up to --num-train (16 here)
    assert (manifest["metrics"]["num_train"], manifest["metrics"]["num_dev"], manifest["metrics"]["num_test"]) == (16, 8, 8)
    assert result.metrics["test_f1"] is not None


def test_the_per_example_cache_matches_recomputing_the_lower_layers_over_several_epochs(tiny_llama_dir, data_dir,
                                                                                        tmp_path):
    """4 epochs of 8 examples: losses and projected gradients agree to 1e-5 relative with the cache (every
    step a hit, after the up-front fill) and without it (--prefix-cache-gb 0: lower layers every step)."""
    common = dict(steps=8, num_train=8, num_dev=0, num_test=4, eval_every=8, momentum=0.5)
    cached = tune(_config(tiny_llama_dir, data_dir, **common), tmp_path / "c", progress=False)
    plain = tune(_config(tiny_llama_dir, data_dir, prefix_cache_gb=0, **common), tmp_path / "p", progress=False)
    rows = {name: [json.loads(x) for x in (tmp_path / name / METRICS_NAME).read_text().splitlines()]
            for name in ("c", "p")}
    for c, p in zip(rows["c"], rows["p"]):
        for key in ("loss_plus", "loss_minus"):
            assert c[key] == pytest.approx(p[key], rel=1e-5, abs=1e-7), (c["step"], key)
        # g = (L+ − L−) / 2ε: the losses' 1e-5 relative, carried through the difference quotient (on some CPU
        # kinds g alone differs by 2e-5 relative while both losses agree to 1e-7: fp32 rounding of L±)
        tolerance = 1e-5 * (abs(p["loss_plus"]) + abs(p["loss_minus"])) / (2 * 1e-2)
        assert abs(c["grad"] - p["grad"]) <= tolerance, (c["step"], c["grad"], p["grad"])
        assert c["prefix_cache_hit_rate"] == 1.0 and c["prefix_cache_bytes"] > 0
        assert "prefix_cache_hit_rate" not in p
    assert cached.metrics["prefix_cache"]["rows"] == 8 and plain.metrics["prefix_cache"] is None
