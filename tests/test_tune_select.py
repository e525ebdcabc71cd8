"""Layer selection on a task's own loss (layerzo.tune.select)."""

from __future__ import annotations

import pytest

from layerzo.errors import TaskError
from layerzo.model.loading import load_model
from layerzo.tune.select import task_sensitivity
from layerzo.zo.sensitivity import SensitivityConfig


def test_task_sensitivity_measures_every_layer_on_the_tasks_training_batches(tiny_llama_dir, data_dir):
    loaded = load_model(str(tiny_llama_dir))
    report = task_sensitivity(loaded, "sst2", data_dir, config=SensitivityConfig(directions=2), num_batches=2,
                              batch_size=4, num_train=16)
    assert [s.layer for s in report.layers] == list(range(loaded.layout.num_layers))
    assert report.num_batches == 2 and 0 <= report.pick < loaded.layout.num_layers
    assert all(s.grad_rms > 0 for s in report.layers)
    again = task_sensitivity(loaded, "sst2", data_dir, config=SensitivityConfig(directions=2), num_batches=2,
                             batch_size=4, num_train=16)
    assert [s.grad_rms for s in again.layers] == [s.grad_rms for s in report.layers]  # seeded: same numbers
    with pytest.raises(TaskError, match="1 batch"):
        task_sensitivity(loaded, "sst2", data_dir, num_batches=0)


def test_tune_select_sensitivity_tunes_the_sensitivity_pick_and_records_why(tiny_llama_dir, data_dir, tmp_path):
    import json

    from layerzo.errors import ConfigError
    from layerzo.tune.config import TuneConfig
    from layerzo.tune.loop import tune

    config = TuneConfig.from_dict({"model": str(tiny_llama_dir), "data_dir": str(data_dir), "select": "sensitivity",
                                   "steps": 1, "batch_size": 4, "num_train": 16, "num_dev": 0, "num_test": 0})
    result = tune(config, tmp_path / "p", progress=False)
    profile = json.loads((tmp_path / "p" / "layerzo_patch.json").read_text())["profile"]
    loaded = load_model(str(tiny_llama_dir))
    expected = task_sensitivity(loaded, "sst2", data_dir, batch_size=4, num_train=16, max_length=config.max_length)
    assert result.layers == (expected.pick,) and profile["dominant_layer"] == expected.pick
    assert profile["selection"] == "sensitivity" and profile["reason"] == expected.reason
    assert len(profile["sensitivity"]["layers"]) == loaded.layout.num_layers
    assert "seconds" not in profile["sensitivity"]  # no wall time: the same run gives the same manifest bytes
    tune(config, tmp_path / "q", progress=False)
    assert (tmp_path / "q" / "layerzo_patch.json").read_bytes() == (tmp_path / "p" / "layerzo_patch.json").read_bytes()
    with pytest.raises(ConfigError, match="select must be one of outlier, sensitivity"):
        TuneConfig.from_dict({"select": "vibes"})


def test_profile_sensitivity_cli_prints_the_table_and_json(tiny_llama_dir, data_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from layerzo.cli.main import app

    result = CliRunner().invoke(app, ["profile", "--model", str(tiny_llama_dir), "--task", "sst2", "--data-dir",
                                      str(data_dir), "--sensitivity", "--directions", "2", "--sensitivity-batches",
                                      "2", "--batch-size", "4", "--json", "--sensitivity-plot",
                                      str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert len(doc["sensitivity"]["layers"]) == 4 and doc["sensitivity"]["pick"] in range(4)
    assert "sensitivity pick: layer" in result.stderr and (tmp_path / "s.png").is_file()
    refused = CliRunner().invoke(app, ["profile", "--model", str(tiny_llama_dir), "--sensitivity"])
    assert refused.exit_code == 1 and "pass --task" in refused.stderr
    cheap = CliRunner().invoke(app, ["profile", "--model", str(tiny_llama_dir), "--task", "sst2", "--data-dir",
                                     str(data_dir), "--sensitivity", "--directions", "2", "--sensitivity-batches", "2",
                                     "--sensitivity-batch-size", "2", "--one-sided", "--json"])
    assert cheap.exit_code == 0, cheap.output
    sens = json.loads(cheap.stdout)["sensitivity"]
    assert sens["config"]["one_sided"] is True and len(sens["layers"]) == 4
    # one-sided: per batch one plain pass + K passes a layer (central: 2K); the batches hold 2 examples, not 4
    assert sens["forwards"] == 2 * (1 + 4 * 2) < doc["sensitivity"]["forwards"] == 2 * (1 + 4 * 2 * 2)
    empty = CliRunner().invoke(app, ["profile", "--model", str(tiny_llama_dir), "--task", "sst2", "--data-dir",
                                     str(data_dir), "--sensitivity", "--sensitivity-batch-size", "0"])
    assert empty.exit_code == 1 and "needs ≥ 1 batch of ≥ 1 example, got 2 × 0" in empty.stderr  # not --batch-size
