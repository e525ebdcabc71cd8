"""--lr auto: the grid rule, the search budget, a search that drops diverging rates, and its record in the patch."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import crash_after_a_checkpoint_then_resume
from layerzo.data.objectives import Objective
from layerzo.data.tasks import load_task
from layerzo.errors import ConfigError, DivergenceError
from layerzo.model.layers import layer_parameter_names
from layerzo.model.loading import load_model
from layerzo.patch.manifest import MANIFEST_NAME
from layerzo.tune.config import TuneConfig, build_config, parse_lr_search
from layerzo.tune.loop import tune
from layerzo.tune.lr_search import SEARCH_FRACTION, half_decade_value, lr_grid, search_lr, snap_half_decade
from layerzo.tune.race import RaceConfig, first_round_steps
from layerzo.zo.engine import TunedParams, ZOConfig


def test_the_grid_follows_lr_times_d_about_1000_on_the_1_3_series():
    assert lr_grid(3_540_096) == (1e-4, 3e-4, 1e-3, 3e-3)  # the demo's layer 11: its measured 3e-4 in the middle
    assert lr_grid(106_202_880) == (3e-6, 1e-5, 3e-5, 1e-4)  # the whole demo model
    assert lr_grid(460_800) == (1e-3, 3e-3, 1e-2, 3e-2)  # LoRA r=8 on q/v of every layer
    assert lr_grid(13_000_000_000)[1] == 1e-7  # MeZO's OPT-13B rate
    assert [half_decade_value(k) for k in (-8, -7, -6, 0, 1)] == [1e-4, 3e-4, 1e-3, 1.0, 3.0]
    assert snap_half_decade(2.9e-4) == -7 and snap_half_decade(1.4e-4) == -8
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ConfigError):
            lr_grid(bad)
    with pytest.raises(ConfigError):
        snap_half_decade(float("nan"))


def test_lr_search_values_parse_or_fail_in_one_line():
    assert parse_lr_search("off") == "off" and parse_lr_search(" AUTO ") == "auto"
    assert parse_lr_search("1e-4,3e-4") == (1e-4, 3e-4)
    for bad in ("1e-4", "1e-4,1e-4", "1e-4,-1", "1e-4,nan", "fast", "1e-4,,3e-4"):
        with pytest.raises(ConfigError, match="lr_search"):
            parse_lr_search(bad)
    with pytest.raises(ConfigError, match="lr_search"):
        TuneConfig(lr_search="sometimes")


def test_lr_auto_in_a_recipe_or_option_means_lr_search_auto_and_a_fixed_lr_wins():
    assert build_config({"lr": "auto"}).lr_search == "auto"
    assert build_config(None, {"lr": "AUTO"}).lr_search == "auto"
    fixed = build_config({"lr": "auto"}, {"lr": "3e-4"})
    assert fixed.lr_search == "off" and fixed.zo.lr == 3e-4
    kept = build_config({"lr": "auto", "lr_search": "auto"}, {"steps": 5})
    assert kept.lr_search == "auto"
    with pytest.raises(ConfigError, match="contradicts"):
        build_config({"lr": "auto", "lr_search": "off"})


def test_the_search_budget_is_about_a_tenth_of_the_run():
    for steps, c in ((300, 4), (1000, 4), (20000, 5), (30, 3)):
        first = first_round_steps(steps, c, SEARCH_FRACTION)
        total, alive, s = 0, c, first
        while True:
            total += alive * s
            alive, s = math.ceil(alive / 2), 2 * s
            if alive == 1:
                break
        assert first >= 2 and total <= max(0.15 * steps, 2 * c * 3), (steps, c, total)


def setup(tiny_llama_dir, data_dir, layer: int = 2):
    loaded = load_model(str(tiny_llama_dir))
    splits = load_task("sst2", data_dir, num_train=32, num_dev=16, num_test=0)
    objective = Objective("choice", loaded.tokenizer, max_length=64)
    params = TunedParams.from_model(loaded.model, layer_parameter_names(loaded.model, loaded.layout, layer))
    return loaded, splits, objective, params


def test_the_search_drops_a_diverging_rate_and_leaves_the_weights_as_they_were(tiny_llama_dir, data_dir):
    loaded, splits, objective, params = setup(tiny_llama_dir, data_dir)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    result = search_lr(loaded, objective, splits.train, splits.dev, params, 2, ZOConfig(lr=1.0, eps=1e-2),
                       (1e-9, 3e-2, 1e30), RaceConfig(first_steps=3, dev_examples=16, batch_size=8))
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    first = result.rounds[0].dev_loss
    assert not math.isfinite(first[1e30])  # blown up: scored last
    assert result.rounds[0].kept == (1e-9, 3e-2)  # the better half of 3, rounded up
    last = result.rounds[1].dev_loss
    assert last[3e-2] < result.zero_shot_dev_loss and last[3e-2] < last[1e-9] and result.lr == 3e-2
    assert result.steps == 3 * 3 + 2 * 6  # 3 rates x 3 steps, then 2 x 6
    record = result.to_dict()
    assert record["rounds"][0]["dev_loss"]["1e+30"] is None and record["grid"] == [1e-9, 3e-2, 1e30]
    assert "seconds" not in record and "diverged: 1e+30" in record["reason"]
    json.dumps(record, allow_nan=False)  # strict JSON: the manifest takes it as is


def test_a_search_where_every_rate_diverges_fails_in_one_line(tiny_llama_dir, data_dir):
    loaded, splits, objective, params = setup(tiny_llama_dir, data_dir)
    with pytest.raises(DivergenceError, match="every learning rate of the search diverged"):
        search_lr(loaded, objective, splits.train, splits.dev, params, 2, ZOConfig(lr=1.0, eps=1e-2, max_bad_steps=1),
                  (1e30, 1e31), RaceConfig(first_steps=4, dev_examples=16, batch_size=8))


def test_tune_lr_auto_records_the_grid_and_pick_and_is_deterministic(tiny_llama_dir, data_dir, tmp_path):
    common = dict(model=str(tiny_llama_dir), data_dir=str(data_dir), task="sst2", steps=120, batch_size=8,
                  num_train=64, num_dev=16, num_test=8, eval_every=60, eps=1e-2, layers="2", lr_search="1e-9,1e-2,3e-2,1e-1")
    notes: list[str] = []
    first = tune(TuneConfig.from_dict(common), tmp_path / "a", progress=False, note=notes.append)
    manifest = json.loads((tmp_path / "a" / MANIFEST_NAME).read_text())
    search = manifest["metrics"]["lr_search"]
    assert search["grid"] == [1e-9, 1e-2, 3e-2, 1e-1] and len(search["rounds"]) == 2
    assert search["lr"] == 1e-2  # lowers the dev loss below the near-zero rate's; 3e-2 and 1e-1 overshoot
    assert first.metrics["best_dev_acc"] > first.metrics["zero_shot_dev_acc"]  # and the run with it learns
    assert manifest["recipe"]["lr"] == 1e-2 and manifest["recipe"]["lr_search"] == "1e-9,1e-2,3e-2,1e-1"
    assert all(step["lr"] == 1e-2 for step in (json.loads(x) for x in (tmp_path / "a" / "trajectory.jsonl")
                                               .read_text().splitlines()))
    assert any(n.startswith("--lr auto: lr 0.01 won a search over 1e-09, 0.01, 0.03, 0.1") for n in notes)
    assert "Learning rate chosen by `--lr auto`: **0.01**" in (tmp_path / "a" / "README.md").read_text()
    tune(TuneConfig.from_dict(common), tmp_path / "b", progress=False)
    for name in ("layer_patch.safetensors", MANIFEST_NAME, "trajectory.jsonl", "README.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert first.metrics["lr_search"]["steps"] == search["steps"]


def test_the_cli_takes_lr_auto_prints_the_search_and_records_the_grid_of_the_rule(tiny_llama_dir, data_dir, tmp_path):
    from typer.testing import CliRunner

    from layerzo.cli.main import app

    out = tmp_path / "p"
    result = CliRunner().invoke(app, ["tune", "--model", str(tiny_llama_dir), "--task", "sst2", "--data-dir",
                                      str(data_dir), "--layers", "1", "--lr", "auto", "--steps", "20", "--num-train",
                                      "48", "--num-dev", "16", "--num-test", "8", "--eval-every", "10", "--json",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["metrics"]
    loaded = load_model(str(tiny_llama_dir))
    d = sum(dict(loaded.model.named_parameters())[n].numel()
            for n in layer_parameter_names(loaded.model, loaded.layout, 1))
    assert tuple(metrics["lr_search"]["grid"]) == lr_grid(d) and metrics["lr_search"]["lr"] in lr_grid(d)
    assert "--lr auto: lr " in result.stderr and "won a search over" in result.stderr
    assert json.loads((out / MANIFEST_NAME).read_text())["recipe"]["lr"] == metrics["lr_search"]["lr"]


def test_a_resumed_lr_auto_run_searches_again_finds_the_same_rate_and_writes_the_same_bytes(
        tiny_llama_dir, data_dir, tmp_path, monkeypatch):
    config = TuneConfig.from_dict(dict(model=str(tiny_llama_dir), data_dir=str(data_dir), task="sst2", steps=40,
                                       batch_size=8, num_train=48, num_dev=8, num_test=8, eval_every=10, eps=1e-2,
                                       layers="2", lr_search="1e-9,1e-2,3e-2", checkpoint_every=20, keep="last"))
    tune(config, tmp_path / "whole", progress=False)
    notes: list[str] = []
    crash_after_a_checkpoint_then_resume(config, tmp_path / "resumed", monkeypatch, note=notes.append)  # at step 20
    assert any(n.startswith("--lr auto: lr ") for n in notes) and any("resuming" in n for n in notes)
    for name in ("layer_patch.safetensors", MANIFEST_NAME, "trajectory.jsonl", "README.md"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
