"""layerzo sweep on a tiny checkpoint: exact restore, outputs, verdict, resume, several tasks, CLI."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from layerzo.errors import ConfigError, LayerIndexError, OutputExistsError
from layerzo.model.loading import load_model
from layerzo.sweep.run import FULL, SweepConfig, layer_ranges, layer_sha256, parse_full_lr, rate_key, run_sweep


@pytest.fixture()
def tiny(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


def _config(data_dir, **kw) -> SweepConfig:
    base = dict(tasks=("sst2",), data_dir=str(data_dir), layers="0-2", steps=3, batch_size=4, lr=1e-2, eps=1e-2,
                eval_every=3, num_train=16, num_dev=8, num_test=8, eval_batch_size=8, max_length=64)
    return SweepConfig.from_dict({**base, **kw})


def test_sweep_restores_every_layer_bit_exactly_and_writes_outputs(tiny, data_dir, tmp_path, monkeypatch):
    import layerzo.sweep.run as sweep_mod

    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    base_sha = {i: layer_sha256(tiny.model, tiny.layout, [i]) for i in range(4)}
    moved = []  # did each run really change its layer before the restore?
    real_restore = sweep_mod.restore

    def spy(model, saved):
        params = dict(model.named_parameters())
        moved.append(any(not torch.equal(params[n], v) for n, v in saved.items()))
        return real_restore(model, saved)

    monkeypatch.setattr(sweep_mod, "restore", spy)
    # no dev set: tune keeps the FINAL weights (with one, a best-dev step 0 would leave the layer at base)
    doc = run_sweep(_config(data_dir, num_dev=0), tmp_path / "s", loaded=tiny, progress=False)

    assert moved == [True] * 4  # layers 0, 1, 2 and the whole model were tuned, then restored
    for name, value in tiny.model.named_parameters():
        assert torch.equal(value, before[name]), name
    records = [json.loads(line) for line in (tmp_path / "s" / "sweep.jsonl").read_text().splitlines()]
    runs = [r for r in records if r["kind"] == "layer"]
    assert [r["layer"] for r in runs] == [0, 1, 2]
    assert all(r["restored_sha256"] == base_sha[r["layer"]] for r in runs)
    for name in ("sweep.json", "sweep.csv", "sweep.md", "sweep.png"):
        assert (tmp_path / "s" / name).stat().st_size > 0, name
    assert (tmp_path / "s" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "s" / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows] == ["0", "1", "2", "all"]
    assert set(rows[0]) >= {"dev_acc", "test_acc", "final_loss", "wall_s", "is_profiled_pick"}
    s = doc["tasks"]["sst2"]
    best = max(s["layers"], key=lambda r: (r["test_acc"], -sum(r["loss_curve"]) / len(r["loss_curve"]), -r["layer"]))
    assert s["best_layer"] == best["layer"]
    assert any(f"{words}{best['layer']}" in doc["verdict"] for words in ("layer ", "the best, layer "))
    assert ("no layer separates from zero-shot" in doc["verdict"]) == (s["separates_from_zero_shot"] is False)
    assert "full-model MeZO" in doc["verdict"]
    assert s["full"]["test_acc"] is not None and len(s["full"]["loss_curve"]) == 3
    assert doc["config"]["full_lr"] == pytest.approx(1e-2 / 4)  # default: lr / num_layers
    assert [r["is_profiled_pick"] for r in rows].count("True") == (1 if s["profiled_pick"] in (0, 1, 2) else 0)


def test_base_accuracy_is_evaluated_once_per_example_set(tiny, data_dir, tmp_path, monkeypatch):
    from layerzo.tune.batches import EvalSet

    calls = []
    real = EvalSet.evaluate

    def counting(self, model, *args, **kwargs):
        calls.append(self.size)
        return real(self, model, *args, **kwargs)

    monkeypatch.setattr(EvalSet, "evaluate", counting)
    run_sweep(_config(data_dir, layers="0-1", full=False, steps=2, eval_every=2), tmp_path / "s", loaded=tiny,
              progress=False)
    # zero-shot dev + test once for the sweep, then per run: one dev eval (+ test unless best is the base)
    assert 2 + 2 <= len(calls) <= 2 + 2 * 2


def test_sharing_frozen_outputs_across_runs_changes_no_number_and_skips_lower_layers(tiny, data_dir, tmp_path,
                                                                                     monkeypatch):
    import layerzo.sweep.run as sweep_mod
    from layerzo.model.layers import get_layer
    from layerzo.model.prefix_cache import SharedLowerOutputs

    calls = [0]
    get_layer(tiny.model, tiny.layout, 0).register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    config = _config(data_dir, layers="0-3", full=False, steps=2, eval_every=2)
    runs = {}
    for shared in (True, False):
        if not shared:
            monkeypatch.setattr(sweep_mod, "SharedLowerOutputs", lambda: SharedLowerOutputs(max_bytes=0))
        calls[0] = 0
        run_sweep(config, tmp_path / str(shared), loaded=tiny, progress=False)
        records = [json.loads(x) for x in (tmp_path / str(shared) / "sweep.jsonl").read_text().splitlines()]
        runs[shared] = ([{k: r[k] for k in ("layer", "loss_curve", "dev_acc", "test_acc", "final_dev_acc")}
                         for r in records if r["kind"] == "layer"], calls[0])
    assert runs[True][0] == runs[False][0]  # bit-identical losses and accuracies
    assert len(runs[True][0]) == 4
    assert runs[True][1] < runs[False][1]  # layer 0 ran in run 1 only, not again in runs 2 and 3


def test_merge_folds_two_half_sweeps_into_the_whole_and_refuses_disagreeing_copies(tiny, data_dir, tmp_path):
    from layerzo.sweep.run import merge_records

    whole = run_sweep(_config(data_dir, layers="0-2"), tmp_path / "whole", loaded=tiny, progress=False)
    run_sweep(_config(data_dir, layers="0", full=False), tmp_path / "a", loaded=tiny, progress=False)
    run_sweep(_config(data_dir, layers="1-2"), tmp_path / "b", loaded=tiny, progress=False)
    calls = []
    import layerzo.sweep.run as sweep_mod

    real = sweep_mod.run_one
    sweep_mod.run_one = lambda *a, **k: calls.append(a[2]) or real(*a, **k)
    try:
        merged = run_sweep(_config(data_dir, layers="0-2"), tmp_path / "m", loaded=tiny, progress=False,
                           merge=[tmp_path / "a", tmp_path / "b"])
    finally:
        sweep_mod.run_one = real
    assert calls == []  # every run came from the two halves: nothing was tuned again
    assert merged["verdict"] == whole["verdict"]
    def numbers(doc):
        return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in doc["tasks"]["sst2"]["layers"]]

    assert numbers(merged) == numbers(whole) and len(numbers(merged)) == 3
    records = [json.loads(x) for x in (tmp_path / "b" / "sweep.jsonl").read_text().splitlines()]
    records[-1]["test_acc"] = 0.123  # a tampered copy of a run
    (tmp_path / "b" / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ConfigError, match="disagree on"):
        merge_records([tmp_path / "whole", tmp_path / "b"])
    with pytest.raises(ConfigError, match="no sweep.jsonl"):
        merge_records([tmp_path / "nowhere"])


def test_resume_skips_done_layers_and_refuses_a_changed_recipe(tiny, data_dir, tmp_path, monkeypatch):
    import layerzo.sweep.run as sweep_mod

    out = tmp_path / "s"
    run_sweep(_config(data_dir, layers="0-1", full=False), out, loaded=tiny, progress=False)
    with pytest.raises(OutputExistsError, match="--resume"):
        run_sweep(_config(data_dir, layers="0-1", full=False), out, loaded=tiny, progress=False)

    ran = []
    real_tune = sweep_mod.tune
    monkeypatch.setattr(sweep_mod, "tune", lambda config, *a, **k: ran.append(config.layers) or real_tune(config, *a, **k))
    doc = run_sweep(_config(data_dir, layers="0-2", full=False), out, resume=True, loaded=tiny, progress=False)
    assert ran == ["2"]
    assert [r["layer"] for r in doc["tasks"]["sst2"]["layers"]] == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"lr=0\.01 but this run has lr=0\.02"):
        run_sweep(_config(data_dir, layers="0-2", full=False, lr=2e-2), out, resume=True, loaded=tiny, progress=False)


def test_two_tasks_report_whether_the_best_layer_is_shared(tiny, data_dir, tmp_path):
    doc = run_sweep(_config(data_dir, tasks=("sst2", "rte"), layers="1,3", full=False, steps=2, eval_every=2),
                    tmp_path / "s", loaded=tiny, progress=False)
    ta = doc["task_agnostic"]
    assert set(ta["best_layer_per_task"]) == {"sst2", "rte"}
    assert ta["same_best_layer"] == (ta["best_layer_per_task"]["sst2"] == ta["best_layer_per_task"]["rte"])
    assert ("same best layer across tasks" if ta["same_best_layer"] else "best layer differs") in doc["verdict"]
    with open(tmp_path / "s" / "sweep.csv") as f:
        assert sorted({r["task"] for r in csv.DictReader(f)}) == ["rte", "sst2"]


def test_layer_ranges_and_bad_configs():
    assert layer_ranges("0-3,7", 10) == (0, 1, 2, 3, 7)
    assert layer_ranges("all", 3) == (0, 1, 2)
    with pytest.raises(LayerIndexError, match="out of range"):
        layer_ranges("8-12", 10)
    with pytest.raises(LayerIndexError, match="backwards"):
        layer_ranges("5-3", 10)
    with pytest.raises(ConfigError, match="full_lr"):
        SweepConfig(full_lr=-1.0)
    with pytest.raises(ConfigError, match="twice"):
        SweepConfig(tasks=("sst2", "sst2"))
    assert SweepConfig.from_dict({"lr": 3e-3}).resolved(30, 10**6).full_lr == pytest.approx((1e-4,))
    with pytest.raises(ConfigError, match="distinct"):
        SweepConfig(full_lr=(1e-3, 1e-3))
    with pytest.raises(ConfigError, match="full-lr"):
        parse_full_lr("fast")
    assert parse_full_lr("auto") == "auto" and parse_full_lr("1e-5") == 1e-5
    assert parse_full_lr("1e-5,3e-5") == (1e-5, 3e-5) and parse_full_lr(None) is None
    assert rate_key(3e-4 / 30) == 1e-5 != 3e-4 / 30  # an older sweep's lr / num_layers is the grid's 1e-5


def test_a_whole_model_rate_grid_runs_every_rate_keeps_the_best_dev_and_resumes(tiny, data_dir, tmp_path):
    from layerzo.tune.lr_search import lr_grid

    config = _config(data_dir, layers="1", full_lr=[1e-9, 3e-2], steps=4, eval_every=2)
    doc = run_sweep(config, tmp_path / "s", loaded=tiny, progress=False)
    records = [json.loads(line) for line in (tmp_path / "s" / "sweep.jsonl").read_text().splitlines()]
    full = [r for r in records if r["kind"] == "full"]
    assert sorted(r["lr"] for r in full) == [1e-9, 3e-2]
    s = doc["tasks"]["sst2"]
    assert [g["lr"] for g in s["full_grid"]] == [1e-9, 3e-2]
    best = max(full, key=lambda r: (r["dev_acc"], -r["lr"]))
    assert s["full"]["lr"] == best["lr"] and s["full"]["dev_acc"] == best["dev_acc"]
    assert doc["config"]["full_lr"] == [1e-9, 3e-2]
    assert "Whole-model MeZO grid" in (tmp_path / "s" / "sweep.md").read_text()
    again = run_sweep(config, tmp_path / "s", loaded=tiny, progress=False, resume=True)  # nothing left to run
    assert len((tmp_path / "s" / "sweep.jsonl").read_text().splitlines()) == len(records)
    assert again["tasks"]["sst2"]["full_grid"] == s["full_grid"]
    wider = run_sweep(_config(data_dir, layers="1", full_lr=[1e-9, 3e-2, 1e-3], steps=4, eval_every=2), tmp_path / "s",
                      loaded=tiny, progress=False, resume=True)  # a later, wider grid runs only the new rate
    assert len((tmp_path / "s" / "sweep.jsonl").read_text().splitlines()) == len(records) + 1
    assert [g["lr"] for g in wider["tasks"]["sst2"]["full_grid"]] == [1e-9, 1e-3, 3e-2]
    n, d = 4, sum(p.numel() for p in tiny.model.model.layers.parameters())
    assert SweepConfig(full_lr="auto").resolved(n, d).full_lr == lr_grid(d)


def test_cli_sweep_json_and_one_line_errors(tiny_llama_dir, data_dir, tmp_path):
    from layerzo.cli.main import app

    common = ["sweep", "--model", str(tiny_llama_dir), "--data-dir", str(data_dir), "--steps", "2", "--batch-size",
              "4", "--num-train", "16", "--num-dev", "8", "--num-test", "8", "--eval-every", "2", "--quiet"]
    res = CliRunner().invoke(app, [*common, "--layers", "0-1", "--no-full", "--json", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [r["layer"] for r in data["tasks"]["sst2"]["layers"]] == [0, 1] and data["tasks"]["sst2"]["full"] is None
    assert data["command"].startswith("layerzo ")
    bad = CliRunner().invoke(app, [*common, "--layers", "2-9", "--out", str(tmp_path / "t")])
    assert bad.exit_code == 1 and "out of range" in bad.output and "Traceback" not in bad.output
    assert FULL == "all"


def test_a_diverging_layer_is_recorded_restored_and_the_sweep_goes_on(tiny, data_dir, tmp_path):
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    doc = run_sweep(_config(data_dir, layers="1-2", full=False, steps=10, eval_every=10, lr=1e30), tmp_path / "s",
                    loaded=tiny, progress=False)
    rows = doc["tasks"]["sst2"]["layers"]
    assert [r["layer"] for r in rows] == [1, 2]
    assert any(r["diverged"] and "diverged" in r["diverged"] for r in rows)
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())


def test_a_bfloat16_sweep_restores_every_layer_bit_exactly(tiny_llama_dir, data_dir, tmp_path):
    """tune casts its fp32 master layers back, so a bf16 model comes back bit-identical after every run."""
    loaded = load_model(str(tiny_llama_dir), dtype="bfloat16")
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    doc = run_sweep(_config(data_dir, layers="1-2", full=True, steps=2, eval_every=2, dtype="bfloat16"),
                    tmp_path / "s", loaded=loaded, progress=False)
    assert [r["layer"] for r in doc["tasks"]["sst2"]["layers"]] == [1, 2] and doc["tasks"]["sst2"]["full"]
    assert doc["config"]["dtype"] == "bfloat16"
    after = dict(loaded.model.named_parameters())
    assert all(after[n].dtype == torch.bfloat16 and torch.equal(after[n], t) for n, t in before.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in loaded.model.modules())


def test_the_sweep_cli_runs_in_bfloat16(tiny_llama_dir, data_dir, tmp_path):
    from layerzo.cli.main import app

    result = CliRunner().invoke(app, [
        "sweep", "--model", str(tiny_llama_dir), "--data-dir", str(data_dir), "--layers", "2", "--no-full",
        "--steps", "1", "--eval-every", "1", "--batch-size", "2", "--num-train", "8", "--num-dev", "4",
        "--num-test", "4", "--dtype", "bfloat16", "--quiet", "--json", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["config"]["dtype"] == "bfloat16" and [r["layer"] for r in doc["tasks"]["sst2"]["layers"]] == [2]


def test_an_unknown_task_fails_before_the_model_loads_and_leaves_no_out_folder(data_dir, tmp_path, monkeypatch):
    import layerzo.sweep.run as sweep_mod
    from layerzo.errors import TaskError

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded for a task that does not exist")

    monkeypatch.setattr(sweep_mod, "load_model", no_loading)
    with pytest.raises(TaskError, match="unknown task 'nosuch'"):
        run_sweep(_config(data_dir, tasks=("nosuch",)), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_failure_before_the_first_record_removes_the_out_folder_it_made(tiny, data_dir, tmp_path, monkeypatch):
    import layerzo.sweep.run as sweep_mod

    def failing_profile(*args, **kwargs):
        raise ConfigError("the profile failed")

    monkeypatch.setattr(sweep_mod, "_profile_record", failing_profile)
    with pytest.raises(ConfigError):
        run_sweep(_config(data_dir), tmp_path / "out", loaded=tiny, progress=False)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()  # a folder the user made is never removed
    with pytest.raises(ConfigError):
        run_sweep(_config(data_dir), tmp_path / "mine", loaded=tiny, progress=False)
    assert (tmp_path / "mine").is_dir()


def test_out_that_is_a_file_or_inside_an_input_is_refused(tiny_llama_dir, data_dir, tmp_path):
    from layerzo.errors import OutputPathError

    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        run_sweep(_config(data_dir), tmp_path / "file", progress=False)
    with pytest.raises(OutputExistsError, match="sits inside the input"):
        run_sweep(_config(data_dir, model=str(tiny_llama_dir)), tiny_llama_dir / "sweep", progress=False)
    assert not (tiny_llama_dir / "sweep").exists()


def test_standard_errors_use_the_test_examples_the_task_really_has(tiny, data_dir, tmp_path):
    from layerzo.data.tasks import load_task

    doc = run_sweep(_config(data_dir, layers="1", full=False, steps=2, eval_every=2, num_test=10**6), tmp_path / "s",
                    loaded=tiny, progress=False)
    real = len(load_task("sst2", data_dir, num_train=16, num_dev=8, num_test=10**6, seed=0).test)
    assert 0 < real < 10**6 and doc["tasks"]["sst2"]["test_examples"] == real
    assert f"({real} examples)" in (tmp_path / "s" / "sweep.md").read_text()


def test_a_generative_sweep_records_f1_and_its_generation_options(tiny, data_dir, tmp_path):
    out = tmp_path / "s"
    doc = run_sweep(_config(data_dir, tasks=("squad",), layers="1", steps=2, eval_every=2, num_dev=3, num_test=3,
                            max_length=256, max_new_tokens=4, full_lr=1e-4), out, loaded=tiny, progress=False)
    s = doc["tasks"]["squad"]
    assert s["metric"] == "f1" and s["metric_label"] == "F1"
    records = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    runs = [r for r in records if r["kind"] != "profile"]
    assert [r["metric"] for r in runs] == ["f1", "f1"]
    for r in runs:  # the F1 tune wrote is what the record holds, not a missing accuracy
        metrics = r["zero_shot_test_acc"], r["test_acc"], r["dev_acc"]
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in metrics)
        assert "test_em" in r and r["recipe"]["max_new_tokens"] == 4
        assert "objective" not in r["recipe"]  # left at its default: recorded as older sweeps did (not at all)
    md = (out / "sweep.md").read_text()
    assert "| layer | dev F1 | test F1 |" in md and "test F1" in s["verdict"]
    with pytest.raises(ConfigError, match="max_new_tokens=4 but this run has max_new_tokens=5"):
        run_sweep(_config(data_dir, tasks=("squad",), layers="1-2", steps=2, eval_every=2, num_dev=3, num_test=3,
                          max_length=256, max_new_tokens=5, full_lr=1e-4), out, resume=True, loaded=tiny,
                  progress=False)


def test_recipe_keys_added_later_are_recorded_only_off_their_default():
    from layerzo.data.generation import DEFAULT_MAX_NEW_TOKENS

    plain = _config("d").recipe(4)
    assert not {"dtype", "objective", "max_new_tokens"} & set(plain)  # a classification sweep's recipe as before
    changed = _config("d", objective="ce", max_new_tokens=DEFAULT_MAX_NEW_TOKENS + 1, dtype="bfloat16").recipe(4)
    assert (changed["objective"], changed["max_new_tokens"], changed["dtype"]) == (
        "ce", DEFAULT_MAX_NEW_TOKENS + 1, "bfloat16")
