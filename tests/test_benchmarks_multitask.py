"""The multi-task sweep report's bookkeeping (benchmarks/bench_multitask.py): picks' ranks, chance, Spearman, report."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_multitask  # noqa: E402

RECIPE = {"steps": 100, "batch_size": 8, "lr": 3e-4, "eps": 1e-3, "num_dev": 50, "num_test": 100, "max_length": 128,
          "seed": 0}


def records(task, accs, zero=0.5, full=(), seed=0):
    recipe = {**RECIPE, "seed": seed}
    out = [{"kind": "profile", "task": task, "pick": 1, "confidence": "high", "recipe": recipe}]
    out += [{"kind": "layer", "task": task, "layer": i, "dev_acc": a, "test_acc": a, "final_dev_acc": a,
             "zero_shot_dev_acc": zero, "zero_shot_test_acc": zero, "loss_curve": [1.0 - a], "recipe": recipe}
            for i, a in enumerate(accs)]
    out += [{"kind": "full", "task": task, "layer": "all", "lr": lr, "dev_acc": a, "test_acc": a,
             "zero_shot_dev_acc": zero, "zero_shot_test_acc": zero, "loss_curve": [0.5], "recipe": recipe}
            for lr, a in full]
    return out


def sensitivity(final, pick):
    return {"pick": pick, "layers": [{"layer": i, "final_change": f, "grad_per_weight": f} for i, f in enumerate(final)],
            "config": {"directions": 8, "one_sided": True}, "num_batches": 2, "batch_size": 8}


def test_a_task_row_ranks_both_picks_finds_the_best_mezo_rate_and_correlates_with_the_scores():
    row = bench_multitask.task_row("t", records("t", [0.5, 0.8, 0.6, 0.55], full=[(1e-5, 0.55), (3e-5, 0.6)]),
                                   sensitivity([0.1, 0.4, 0.3, 0.2], pick=2), test_n=100)
    assert row["best_layer"] == 1 and row["outlier_rank"] == 1 and row["sensitivity_rank"] == 2
    assert row["full"]["lr"] == 3e-5 and [g["lr"] for g in row["full_grid"]] == [1e-5, 3e-5]
    assert row["spearman_acc_vs_final_change"] == pytest.approx(1.0)  # the same order as the accuracies
    assert row["beats_zero_shot"]  # 0.8 vs 0.5 on 100 examples: 7.5 standard errors


def test_a_task_that_stays_at_zero_shot_does_not_beat_it():
    row = bench_multitask.task_row("t", records("t", [0.5, 0.52, 0.5, 0.51]), sensitivity([1, 2, 3, 4], 0), test_n=100)
    assert not row["beats_zero_shot"] and row["full"] is None
    assert "no layer separates from zero-shot" in row["verdict"]


def test_the_report_has_a_row_per_task_and_the_between_task_matrix():
    rows = [bench_multitask.task_row(t, records(t, accs), sensitivity([0.1, 0.2, 0.3, 0.4], 1), test_n=100)
            for t, accs in (("a", [0.5, 0.8, 0.6, 0.55]), ("b", [0.5, 0.7, 0.65, 0.52]))]
    between = {x["task"]: {y["task"]: bench_multitask.between_tasks(x, y) for y in rows} for x in rows}
    text = bench_multitask.markdown(bench_multitask.stamp({"tasks": rows, "spearman_between_tasks": between}))
    assert "| a | acc | 50.0% | 1 (80.0%) | yes |" in text and "| b |" in text
    assert "| not run yet | - |" in text  # no whole-model run in these sweeps: said, not printed as lr 0
    assert "- a: 100 steps, batch 8," in text and "sensitivity K = 8, 2 batches of 8, one-sided" in text
    assert f"{between['a']['b']:+.2f}" in text and between["a"]["a"] == pytest.approx(1.0)


def test_tasks_swept_over_different_layers_correlate_over_the_layers_they_share():
    a = {"layers": [0, 1, 2, 3], "test_acc": [0.5, 0.6, 0.7, 0.8]}
    b = {"layers": [1, 2, 3], "test_acc": [0.3, 0.2, 0.1]}
    assert bench_multitask.between_tasks(a, b) == pytest.approx(-1.0)  # layers 1-3 only: reversed order
    assert bench_multitask.between_tasks(a, {"layers": [0, 5], "test_acc": [0.1, 0.2]}) is None  # one shared layer


def test_a_second_seed_is_compared_with_the_first_and_their_mean_picks_the_layer_both_favour():
    sens = sensitivity([0.1, 0.2, 0.3, 0.4], 1)
    s0 = bench_multitask.task_row("t", records("t", [0.5, 0.8, 0.6, 0.55]), sens, test_n=100)
    # seed 1: layer 2 edges out layer 1, layers 0 and 3 swap: the rankings agree only in part
    s1 = bench_multitask.task_row("t", records("t", [0.58, 0.70, 0.72, 0.5], zero=0.55, seed=1), sens, test_n=100)
    a = bench_multitask.seed_agreement([s1, s0])  # any order in: the lowest seed is the reference
    assert a["seeds"] == [0, 1] and [p["best_layer"] for p in a["per_seed"]] == [1, 2]
    assert a["spearman_with_first_seed"] == [pytest.approx(0.6)]  # ranks (1,4,3,2) vs (2,3,4,1): 1 - 6*4/60
    assert a["best_layer_of_mean"] == 1 and a["mean_test_acc"][1] == pytest.approx(0.75)
    text = "\n".join(bench_multitask.seed_lines({"t": a}))
    assert "| t | 0 | 50.0% | 1 (80.0%) |" in text and "| t | 1 | 55.0% | 2 (72.0%) |" in text
    assert "| +0.60 |" in text and "best layer 1 (75.0%)" in text
    assert bench_multitask.seed_lines({"t": bench_multitask.seed_agreement([s0])}) == []  # one seed: no section


def test_seeds_correlate_over_the_layers_every_seed_ran():
    sens = sensitivity([0.1, 0.2, 0.3, 0.4], 1)
    s0 = bench_multitask.task_row("t", records("t", [0.5, 0.8, 0.6, 0.55]), sens, test_n=100)
    s1 = bench_multitask.task_row("t", records("t", [0.5, 0.9, 0.7], seed=1), sens, test_n=100)  # layer 3 not yet
    a = bench_multitask.seed_agreement([s0, s1])
    assert a["layers"] == [0, 1, 2] and a["spearman_with_first_seed"] == [pytest.approx(1.0)]
    assert a["best_layer_of_mean"] == 1


def test_carrying_one_tasks_best_layer_to_another_reports_its_gap_and_whether_it_is_within_noise():
    sens = sensitivity([0.1, 0.2, 0.3, 0.4], 1)
    a = bench_multitask.task_row("a", records("a", [0.5, 0.9, 0.6, 0.55]), sens, test_n=100)
    b = bench_multitask.task_row("b", records("b", [0.5, 0.66, 0.7, 0.5]), sens, test_n=100)  # SE 4.6 pts at 70 %
    flat = bench_multitask.task_row("c", records("c", [0.5, 0.51, 0.5, 0.5]), sens, test_n=100)
    x = bench_multitask.transfer(a, b)
    assert x["layer"] == 1 and x["gap"] == pytest.approx(-0.04) and x["within_2se"]
    y = bench_multitask.transfer(b, a)
    assert y["layer"] == 2 and y["gap"] == pytest.approx(-0.3) and not y["within_2se"]
    text = "\n".join(bench_multitask.transfer_lines([a, b, flat]))
    assert "| a (1) | 1: 90.0% (+0.0 pts, yes) | 1: 66.0% (-4.0 pts, yes) |" in text
    assert "| b (2) | 2: 60.0% (-30.0 pts, no) | 2: 70.0% (+0.0 pts, yes) |" in text
    assert "on c" not in text  # c leaves no zero-shot: it has no dominant layer to carry
    assert bench_multitask.transfer(a, {**b, "layers": [0, 2, 3]}) is None  # b's sweep never ran layer 1
    assert bench_multitask.transfer_lines([a, flat]) == []
