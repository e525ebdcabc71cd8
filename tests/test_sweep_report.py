"""Sweep results: sweep.jsonl records, ranking, verdict, and the json/csv/md/png outputs."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest

from layerzo.errors import ConfigError
from layerzo.sweep.report import (append_record, csv_text, markdown_text, mean_loss, pct, rank_of, read_records,
                                  summarize, verdict, write_outputs)
from layerzo.sweep.run import SweepConfig


def sweep_records(task: str = "t") -> list[dict]:
    """A profile pick (layer 1), three layer runs and a whole-model run of one task."""
    records = [{"kind": "profile", "task": task, "pick": 1, "confidence": "high"}]
    for layer, (test, dev) in enumerate([(0.55, 0.6), (0.75, 0.7), (0.65, 0.8)]):
        records.append({"kind": "layer", "task": task, "layer": layer, "test_acc": test, "dev_acc": dev,
                        "final_dev_acc": dev, "best_step": 3, "final_loss": 0.5, "loss_curve": [0.7, 0.5],
                        "wall_seconds": 1.5, "is_profiled_pick": layer == 1, "zero_shot_dev_acc": 0.5,
                        "zero_shot_test_acc": 0.5})
    records.append({"kind": "full", "task": task, "test_acc": 0.6, "dev_acc": 0.6, "final_dev_acc": 0.6, "best_step": 3,
                    "final_loss": 0.55, "loss_curve": [0.7, 0.6], "wall_seconds": 4.0, "zero_shot_dev_acc": 0.5,
                    "zero_shot_test_acc": 0.5})
    return records


def sweep_doc(records=None) -> dict:
    config = SweepConfig.from_dict({"tasks": ("t",), "steps": 4, "batch_size": 2, "lr": 1e-3, "num_test": 100})
    return summarize(records or sweep_records(), config, [0, 1, 2], 4, model_name="tiny/llama",
                     command="layerzo sweep --model tiny/llama")


# ----------------------------------------------------------------------------- sweep.jsonl
def test_records_are_appended_one_json_line_at_a_time(tmp_path):
    path = tmp_path / "sweep.jsonl"
    assert read_records(path) == []
    append_record(path, {"kind": "layer", "layer": 0, "pair": (1, 2)})  # tuples are written as lists
    append_record(path, {"kind": "layer", "layer": 1})
    assert read_records(path) == [{"kind": "layer", "layer": 0, "pair": [1, 2]}, {"kind": "layer", "layer": 1}]
    assert len(path.read_text().splitlines()) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.jsonl"]  # the atomic rewrite leaves no temp file


def test_a_record_that_is_not_strict_json_is_refused_and_the_file_kept(tmp_path):
    path = tmp_path / "sweep.jsonl"
    append_record(path, {"layer": 0})
    with pytest.raises(ValueError):
        append_record(path, {"layer": 1, "test_acc": float("nan")})
    with pytest.raises(TypeError, match="not JSON serialisable"):
        append_record(path, {"layer": 1, "where": object()})
    assert read_records(path) == [{"layer": 0}]


def test_a_broken_line_names_its_line_number(tmp_path):
    path = tmp_path / "sweep.jsonl"
    path.write_text('{"layer": 0}\n\n{"layer": 1\n')
    with pytest.raises(ConfigError, match=r"sweep.jsonl:3 is not valid JSON") as info:
        read_records(path)
    assert "delete the broken line" in info.value.one_line()


# ----------------------------------------------------------------------------- ranking and verdict
def test_mean_loss_and_pct():
    assert mean_loss([1.0, None, 0.5]) == 0.75
    assert mean_loss([]) is None and mean_loss([None]) is None
    assert pct(0.1234) == "12.3%" and pct(None) == "-"


def test_rank_and_verdict_name_the_profiled_layer_and_the_gap():
    rows = [{"layer": i, "test_acc": acc, "dev_acc": acc, "final_loss": 0.5, "mean_loss": 0.6}
            for i, acc in enumerate([0.6, 0.8, 0.7, 0.8])]
    assert [rank_of(rows, i) for i in range(4)] == [4, 1, 3, 1]
    s = {"task": "t", "best_layer": 1, "best_tied_with": [3], "profiled_pick": 2, "profiled_rank": 3,
         "num_layers_run": 4, "layers": rows, "zero_shot": {"test_acc": 0.5},
         "full": {"test_acc": 0.75}}
    line = verdict(s, 10)
    assert "layer 1 dominated" in line and "tied with layer(s) 3" in line
    assert "profiled layer 2 ranks 3/4" in line and "beats full-model MeZO (test 75.0%) by 5.0 pts" in line


def test_near_best_uses_the_test_sets_standard_error_and_the_verdict_says_so():
    from layerzo.sweep.report import standard_error, task_summary

    assert standard_error(0.5, 100) == pytest.approx(0.05) and standard_error(None, 100) is None
    records = [{"kind": "profile", "task": "t", "pick": 2, "confidence": "high"}]
    for layer, acc in enumerate([0.60, 0.70, 0.66, 0.50]):
        records.append({"kind": "layer", "task": "t", "layer": layer, "test_acc": acc, "dev_acc": acc,
                        "is_profiled_pick": layer == 2, "loss_curve": [1.0]})
    s = task_summary("t", records, steps=10, num_test=500)
    se = math.sqrt(0.7 * 0.3 / 500)  # 2.05 pts at the best layer's 70%
    assert s["test_standard_error"] == pytest.approx(se)
    assert s["near_best"] == [1, 2]  # 66% is 4 pts < 2 SE (4.1) below 70%; 60% and 50% are not
    assert "profiled layer 2 ranks 2/4 (test 66.0%; within 2 standard errors (4.1 pts) of the best)" in s["verdict"]
    assert task_summary("t", records, steps=10, num_test=50_000)["near_best"] == [1]  # a bigger test set separates them


def test_when_every_layer_ties_on_test_the_verdict_says_so_and_final_dev_decides():
    from layerzo.sweep.report import task_summary

    records = [{"kind": "profile", "task": "t", "pick": 1, "confidence": "high"}] + [
        {"kind": "layer", "task": "t", "layer": i, "test_acc": 0.5, "dev_acc": 0.7, "final_dev_acc": fd,
         "final_loss": 0.6, "loss_curve": [0.7, 0.6], "zero_shot_dev_acc": 0.7, "zero_shot_test_acc": 0.5, "is_profiled_pick": i == 1}
        for i, fd in enumerate([0.6, 0.65, 0.75])]
    s = task_summary("t", records, steps=12)
    assert s["best_layer"] == 2 and s["profiled_rank"] == 1
    assert "no layer dominated - all 3 layers tie on test" in s["verdict"]
    assert "layer 2 leads (final dev 75.0%" in s["verdict"]
    assert s["profiled_position"] == 2 and "profiled layer 1 ties for best on test (rank 1/3; 2nd" in s["verdict"]


def test_summarize_picks_the_best_layer_and_compares_with_the_whole_model():
    doc = sweep_doc()
    s = doc["tasks"]["t"]
    assert (s["best_layer"], s["profiled_pick"], s["profiled_rank"]) == (1, 1, 1)
    assert s["zero_shot"] == {"dev_acc": 0.5, "test_acc": 0.5} and s["zero_shot_identical_across_runs"]
    assert s["full"]["mean_loss"] == pytest.approx(0.65)
    assert "that IS the profiled layer 1 (rank 1/3)" in doc["verdict"]
    assert "beats full-model MeZO (test 60.0%) by 15.0 pts at 4 steps each" in doc["verdict"]
    assert "task_agnostic" not in doc  # one task only


# ----------------------------------------------------------------------------- output files
def test_csv_has_one_row_per_layer_and_one_for_the_whole_model():
    rows = list(csv.DictReader(io.StringIO(csv_text(sweep_doc()))))
    assert [r["layer"] for r in rows] == ["0", "1", "2", "all"]
    assert rows[1]["test_acc"] == "0.7500" and rows[1]["is_profiled_pick"] == "True"
    assert rows[3]["is_profiled_pick"] == "False" and rows[3]["wall_s"] == "4.0"


def test_markdown_has_the_table_and_the_verdict():
    doc = sweep_doc()
    md = markdown_text(doc)
    assert md.startswith("# layerzo sweep: tiny/llama\n") and "`layerzo sweep --model tiny/llama`" in md
    assert "| **1** (pick) | 70.0% | 75.0% | 1 |" in md
    assert "| all (MeZO) | 60.0% | 60.0% | - |" in md
    assert f"**Verdict:** {doc['tasks']['t']['verdict']}" in md


def test_markdown_states_each_tasks_real_split_sizes_and_a_missing_baseline():
    # a small task's files hold fewer rows than the recipe asks for (CB: 250 training rows, 56 validation rows)
    config = SweepConfig.from_dict({"tasks": ("t",), "steps": 4, "batch_size": 2, "lr": 1e-3, "num_test": 100,
                                    "full": False})
    records = [r for r in sweep_records() if r["kind"] != "full"]
    doc = summarize(records, config, [0, 1, 2], 4, model_name="tiny/llama",
                    split_sizes={"t": {"train": 150, "dev": 100, "test": 56}})
    md = markdown_text(doc)
    assert "Splits: 150 train / 100 dev / 56 test examples." in md
    assert "no whole-model MeZO baseline (--no-full)" in md and "whole-model MeZO baseline with lr" not in md
    assert doc["tasks"]["t"]["splits"] == {"train": 150, "dev": 100, "test": 56}
    # the standard error uses the real test size: 56 rows, not the configured 100
    assert "(56 examples)" in md
    assert "Splits:" not in markdown_text(sweep_doc())  # no sizes given: nothing invented


def test_write_outputs_writes_json_csv_md_and_png(tmp_path):
    doc = sweep_doc()
    paths = write_outputs(doc, tmp_path)
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(doc))
    assert paths["csv"].read_text() == csv_text(doc) and paths["md"].read_text() == markdown_text(doc)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.csv", "sweep.json", "sweep.md", "sweep.png"]


def test_a_best_layer_within_noise_of_zero_shot_is_not_called_dominant():
    from layerzo.sweep.report import task_summary

    records = [{"kind": "profile", "task": "t", "pick": 1, "confidence": "high"}]
    for layer, acc in enumerate([0.63, 0.61, 0.60]):
        records.append({"kind": "layer", "task": "t", "layer": layer, "test_acc": acc, "dev_acc": acc,
                        "zero_shot_test_acc": 0.61, "zero_shot_dev_acc": 0.6, "loss_curve": [1.0]})
    s = task_summary("t", records, steps=10, num_test=100)  # 2 SE = 9.7 pts at 63%: +2 pts is noise
    assert s["separates_from_zero_shot"] is False
    assert s["verdict"].startswith("t: no layer separates from zero-shot - the best, layer 0 (test 63.0%")
    assert "dominated" not in s["verdict"]
    big = task_summary("t", records, steps=10, num_test=100_000)  # 2 SE = 0.3 pts: now +2 pts is real
    assert big["separates_from_zero_shot"] is True and big["verdict"].startswith("t: layer 0 dominated")
