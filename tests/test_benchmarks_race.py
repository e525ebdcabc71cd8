"""The time-to-accuracy race's bookkeeping (benchmarks/bench_race.py): grid pick, jobs, times to target, report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_race  # noqa: E402


def record(method, lr, seed, curve, setup=0.0, step=1.0):
    best = max(acc for _, acc, _ in curve)
    return {"method": method, "lr": lr, "seed": seed, "d": 1, "layers": "all", "curve": curve, "best_dev_acc": best,
            "zero_shot_dev_acc": curve[0][1], "best_step": 0, "median_step_seconds": step, "setup_seconds": setup,
            "train_clock_seconds": curve[-1][0], "diverged": None, "wall_seconds": curve[-1][0] + 5, "steps": 50}


RUNS = [
    record("dominant", 1e-4, 0, [[2, .5, 0], [12, .6, 25], [22, .7, 50]], setup=2),
    record("dominant", 3e-4, 0, [[2, .5, 0], [12, .7, 25], [22, .7, 50]], setup=2),  # same best, sooner: kept
    record("full", 1e-5, 0, [[0, .5, 0], [50, .55, 25], [100, .6, 50]], step=2),
    record("full", 3e-5, 0, [[0, .5, 0], [50, .5, 25], [100, .5, 50]], step=2),
    record("lora", 1e-3, 0, [[0, .5, 0], [30, .6, 25], [60, .6, 50]]),
]


def test_the_kept_rate_is_the_best_dev_accuracy_and_ties_go_to_the_one_that_got_there_first():
    assert bench_race.best_lr(RUNS, "dominant") == 3e-4
    assert bench_race.best_lr(RUNS, "full") == 1e-5 and bench_race.best_lr(RUNS, "nosuch") is None
    assert bench_race.first_time(RUNS[2], 0.6) == 100 and bench_race.first_time(RUNS[3], 0.6) == float("inf")
    assert bench_race.first_step(RUNS[0], 0.6) == 25 and bench_race.first_step(RUNS[3], 0.6) is None
    assert bench_race.ratio_of({"a": 10, "b": 2}, "a", "b") == 5
    assert bench_race.ratio_of({"a": float("inf"), "b": 2}, "a", "b") is None
    assert bench_race.ratio_of({"a": 3}, "a", "b") is None


def test_jobs_interleave_the_methods_and_the_seed_phase_runs_each_kept_rate():
    grids = {"dominant": (1, 2), "full": (3, 4), "lora": (5, 6)}
    assert bench_race.jobs("grid", grids, [], [0, 1]) == [("dominant", 1, 0), ("full", 3, 0), ("lora", 5, 0),
                                                          ("dominant", 2, 0), ("full", 4, 0), ("lora", 6, 0)]
    assert bench_race.jobs("seeds", grids, RUNS, [0, 1]) == [("dominant", 3e-4, 1), ("full", 1e-5, 1),
                                                             ("lora", 1e-3, 1)]


def test_the_report_times_every_method_to_full_mezos_best(tmp_path):
    (tmp_path / "step.json").write_text(json.dumps({"median_s": {"dominant": 0.5, "full": 2.0, "lora": 1.0}}))
    meta = {"model": "demo/x", "layer": 11, "grids": {}, "settings": {"steps": 50, "batch_size": 16, "eps": 1e-3,
                                                                        "num_dev": 200, "eval_every": 25}}
    bench_race.report(RUNS, meta, results_dir=tmp_path)  # a scratch results folder, not the repo's
    text = (tmp_path / f"{bench_race.STEM}.md").read_text()
    # target 60% (full's best): dominant at 12 s (step 25), full at 100 s, LoRA at 30 s
    assert "| 0 | 60.0% | 50.0% | 12 | 100 | 30 | 8.3x | 3.3x |" in text
    # quiet clock: dominant 2 + 25 x 0.5 = 14.5 s, full 50 x 2 = 100 s, LoRA 25 x 1 = 25 s
    assert "| 0 | 25 | 50 | 25 | 14 | 100 | 25 | 6.9x |" in text
    assert "| 3e-05 | 50.0% | 0 | 2.000 |" in text and "| 0.0003 **kept** | 70.0% |" in text
    assert (tmp_path / f"{bench_race.STEM}.png").stat().st_size > 1000
    with pytest.raises(KeyError):  # a malformed record is not silently skipped
        bench_race.best_lr([{"method": "full"}], "full")
