"""Multi-task layer sweep report: is the dominant layer the same on every task, and do the pickers find it?

The runs are ``layerzo sweep`` folders, one per task, all with the demo sweep's recipe
(each layer ALONE, 100 steps, batch 8, lr 3e-4, eps 1e-3; whole-model MeZO at every rate
of its own grid ``--full-lr auto``, the best dev kept). This script only reads their
``sweep.jsonl`` records, adds each task's ZO sensitivity profile (``profile --sensitivity``'s
K = 8 directions on 2 batches of 8, the task's own loss; measured once and kept in the
JSON, so a rerun reuses it) and writes, per task: zero-shot, the best layer, whether
tuning beats zero-shot, the rank of the outlier pick and of the sensitivity pick, MeZO at
its best rate; and across tasks the Spearman correlation of the layers' test
accuracies, each task's accuracies with the sensitivity scores, and what one task's best
layer scores on every other task that learns (the task-agnostic claim taken literally).

A task may come with several sweeps, one per seed (``--sweep sst2=runs/s0 --sweep sst2=runs/s1``;
a seed redraws train/dev/test and the ZO directions, MeZO's protocol). The tables above use
each task's lowest seed; the seed section gives every seed's best layer and picks' ranks, the
best layer of the seeds' mean score, and the Spearman correlation between the seeds' layer
rankings: how far a task's ranking agrees with itself, the ceiling its correlation with
another task can be read against.

    layerzo sweep --task cb --data-dir ../shared/data --steps 100 --batch-size 8 --lr 3e-4 --eps 1e-3 \\
        --eval-every 50 --num-dev 200 --num-test 500 --max-length 256 --full-lr auto --out runs/mt_cb --quiet
    python benchmarks/bench_multitask.py --data-dir ../shared/data --sweep sst2=runs/mt_sst2 --sweep cb=runs/mt_cb ...

Writes benchmarks/results/multitask_smollm2.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import RESULTS, header, stamp, write_report  # noqa: E402

from layerzo.core.stats import spearman  # noqa: E402
from layerzo.sweep.report import pct, rank_of, read_records, task_summary  # noqa: E402

STEM = "multitask_smollm2"


def task_row(task: str, records: list[dict], sensitivity: dict, test_n: int) -> dict:
    recipe = next(r["recipe"] for r in records if "recipe" in r)
    s = task_summary(task, records, recipe["steps"], test_n)
    by_layer = {r["layer"]: r for r in s["layers"]}
    layers = sorted(by_layer)
    sens = {d["layer"]: d for d in sensitivity["layers"]}
    acc = [by_layer[i]["test_acc"] for i in layers]
    return {
        "task": task, "seed": recipe["seed"], "recipe": recipe, "metric": s["metric_label"], "test_examples": test_n,
        "zero_shot_test_acc": s["zero_shot"].get("test_acc"),
        "best_layer": s["best_layer"], "best_test_acc": by_layer[s["best_layer"]]["test_acc"],
        # the best layer's test score is more than 2 standard errors above zero-shot (the sweep's own test)
        "beats_zero_shot": bool(s["separates_from_zero_shot"]), "near_best": s["near_best"],
        "outlier_pick": s["profiled_pick"], "outlier_rank": s["profiled_rank"],
        "sensitivity_pick": sensitivity["pick"], "sensitivity_rank": rank_of(s["layers"], sensitivity["pick"]),
        "full": s["full"] and {k: s["full"].get(k) for k in ("lr", "dev_acc", "test_acc")},
        "full_grid": s["full_grid"], "layers": layers, "test_acc": acc,
        "spearman_acc_vs_final_change": spearman(acc, [sens[i]["final_change"] for i in layers]),
        "spearman_acc_vs_grad_per_weight": spearman(acc, [sens[i]["grad_per_weight"] for i in layers]),
        "spearman_acc_vs_earliness": spearman(acc, [-float(i) for i in layers]),
        "num_layers_run": len(layers), "verdict": s["verdict"],
        "sensitivity_config": sensitivity.get("config", {}), "sensitivity_batches": sensitivity.get("num_batches"),
        "sensitivity_batch_size": sensitivity.get("batch_size"),
    }


def between_tasks(a: dict, b: dict) -> float | None:
    """Spearman of two tasks' layer test scores over the layers both sweeps ran (None below 3 such layers)."""
    common = sorted(set(a["layers"]) & set(b["layers"]))
    if len(common) < 3:
        return None
    score = [{i: v for i, v in zip(t["layers"], t["test_acc"])} for t in (a, b)]
    return spearman([score[0][i] for i in common], [score[1][i] for i in common])


def transfer(a: dict, b: dict) -> dict | None:
    """Task ``b`` tuned at task ``a``'s best layer: ``b``'s score there, its gap to ``b``'s best, and whether that layer
    is within 2 standard errors of ``b``'s best (``b``'s near-best band) -- what carrying one task's dominant layer to
    another task costs. None when ``b``'s sweep has not run that layer."""
    layer = a["best_layer"]
    if layer not in b["layers"]:
        return None
    score = b["test_acc"][b["layers"].index(layer)]
    return {"layer": layer, "test_acc": score, "gap": score - b["best_test_acc"], "within_2se": layer in b["near_best"]}


def transfer_lines(rows: list[dict]) -> list[str]:
    """The transfer table over the tasks that leave zero-shot (a task that learns nothing has no dominant layer)."""
    learn = [t for t in rows if t["beats_zero_shot"]]
    if len(learn) < 2:
        return []
    lines = ["", "Is the dominant layer task-agnostic? Each row's best layer tuned on each column's task: the column's "
             "score at that layer, its gap to the column's best layer, and whether it is within 2 standard errors of "
             "it (yes/no):", "",
             "| best layer of | " + " | ".join(f"on {t['task']}" for t in learn) + " |", "|---|" + "---|" * len(learn)]
    for a in learn:
        cells = []
        for b in learn:
            x = transfer(a, b)
            cells.append("not run" if x is None else f"{x['layer']}: {pct(x['test_acc'])} ({100 * x['gap']:+.1f} pts, "
                                                      f"{'yes' if x['within_2se'] else 'no'})")
        lines.append(f"| {a['task']} ({a['best_layer']}) | " + " | ".join(cells) + " |")
    return lines


def seed_agreement(rows: list[dict]) -> dict:
    """One task's rows, one per seed (the lowest first): each seed's best layer and picks' ranks, the seeds' mean
    score per layer (over the layers every seed ran) and its best layer, and each later seed's Spearman with the
    first over the layers both ran."""
    first, *later = sorted(rows, key=lambda r: r["seed"])
    common = sorted(set(first["layers"]).intersection(*(r["layers"] for r in later)))
    score = [dict(zip(r["layers"], r["test_acc"])) for r in (first, *later)]
    mean = [sum(s[i] for s in score) / len(score) for i in common]
    return {
        "task": first["task"], "seeds": [r["seed"] for r in (first, *later)],
        "per_seed": [{k: r[k] for k in ("seed", "zero_shot_test_acc", "best_layer", "best_test_acc", "near_best",
                                        "outlier_pick", "outlier_rank", "sensitivity_rank", "full",
                                        "num_layers_run")} for r in (first, *later)],
        "layers": common, "mean_test_acc": mean,
        "best_layer_of_mean": common[max(range(len(common)), key=lambda k: mean[k])] if common else None,
        "spearman_with_first_seed": [between_tasks(first, r) for r in later],
    }


def test_size(task: str, recipe: dict, data_dir: str) -> int:
    """Test examples the runs really had (a task's validation file may hold fewer than --num-test)."""
    from layerzo.data.tasks import load_task

    return len(load_task(task, data_dir, num_train=recipe["num_train"], num_dev=recipe["num_dev"],
                         num_test=recipe["num_test"], seed=recipe["seed"]).test)


def task_sensitivity_doc(task: str, recipe: dict, data_dir: str, loaded, args) -> dict:
    from layerzo.tune.select import task_sensitivity
    from layerzo.zo.sensitivity import SensitivityConfig

    report = task_sensitivity(loaded, task, data_dir, config=SensitivityConfig(one_sided=args.one_sided),
                              num_batches=args.sensitivity_batches, batch_size=args.sensitivity_batch_size,
                              max_length=recipe["max_length"], seed=recipe["seed"])
    return {**report.to_dict(), "batch_size": args.sensitivity_batch_size}


def markdown(r: dict) -> str:
    rows = r["tasks"]
    lines = [header("Multi-task layer sweep: demo model", r),
             "Each layer tuned ALONE with its task's recipe (below; the task's lowest seed, see Seeds; the test score of the best-dev checkpoint: "
             "accuracy, F1 for SQuAD); whole-model MeZO at the best dev of its own lr grid. Sensitivity: "
             "`profile --sensitivity`'s rule on the task's loss (per task below). Ranks are competition ranks by test "
             "score (ties share a rank). 'beats zero-shot': the best layer is more than 2 standard errors above "
             "zero-shot on the test set.", "",
             "| task | metric | zero-shot | best layer | beats zero-shot | outlier pick (rank) | sensitivity pick (rank) | "
             "MeZO best lr: test | best layer - MeZO |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in rows:
        full = t["full"] or {}
        gap = (f"{100 * (t['best_test_acc'] - full['test_acc']):+.1f} pts"
               if full.get("test_acc") is not None else "-")
        lines.append(f"| {t['task']} | {t.get('metric', 'acc')} | {pct(t['zero_shot_test_acc'])} | {t['best_layer']} "
                     f"({pct(t['best_test_acc'])}) | {'yes' if t['beats_zero_shot'] else 'no'} | {t['outlier_pick']} ({_rank(t['outlier_rank'])}/"
                     f"{t['num_layers_run']}) | {t['sensitivity_pick']} ({_rank(t['sensitivity_rank'])}/{t['num_layers_run']}) | "
                     + (f"{full['lr']:g}: {pct(full.get('test_acc'))}" if full else "not run yet") + f" | {gap} |")
    lines += ["", "Recipes:", ""] + [
        f"- {t['task']}: {t['recipe']['steps']} steps, batch {t['recipe']['batch_size']}, lr {t['recipe']['lr']:g}, "
        f"eps {t['recipe']['eps']:g}, {t['recipe']['num_dev']} dev / {t['test_examples']} test, max length "
        f"{t['recipe']['max_length']}" + (f", {t['recipe']['max_new_tokens']} new tokens"
                                         if "max_new_tokens" in t["recipe"] else "")
        + f"; sensitivity K = {t['sensitivity_config']['directions']}, {t['sensitivity_batches']} batches"
        + (f" of {t['sensitivity_batch_size']}" if t.get("sensitivity_batch_size") else "")
        + (", one-sided" if t["sensitivity_config"].get("one_sided") else ", central") for t in rows]
    lines += ["", "Whole-model MeZO grids: " + "; ".join(
        f"{t['task']}: " + (", ".join(f"{g['lr']:g} -> test {pct(g['test_acc'])}" for g in t["full_grid"])
                            or "not run yet") for t in rows),
        "", "Spearman correlation of the layers' test scores between tasks (over the layers both swept: "
        + ", ".join(f"{t['task']} {t['num_layers_run']}" for t in rows) + " layers run; ties averaged):", ""]
    names = [t["task"] for t in rows]
    lines += ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for a in names:
        lines.append(f"| {a} | " + " | ".join(_fmt(r["spearman_between_tasks"][a][b]) for b in names) + " |")
    lines += ["", "Spearman correlation of each task's layer test accuracies with the layer's sensitivity scores "
              "and with earliness (−layer index):", "",
              "| task | final-state change (the pick's score) | gradient per weight | earliness |", "|---|---|---|---|"]
    for t in rows:
        lines.append(f"| {t['task']} | {_fmt(t['spearman_acc_vs_final_change'])} | "
                     f"{_fmt(t['spearman_acc_vs_grad_per_weight'])} | {_fmt(t['spearman_acc_vs_earliness'])} |")
    lines += transfer_lines(rows)
    lines += seed_lines(r.get("seeds", {}))
    lines += ["", "Per-task verdicts (the sweep's own):", ""] + [f"- {t['verdict']}" for t in rows]
    lines += ["", "![per-layer gains](multitask_smollm2.png)", ""]
    return "\n".join(lines) + "\n"


def seed_lines(seeds: dict) -> list[str]:
    """The seed section of the report: nothing when every task ran one seed."""
    several = [a for a in seeds.values() if len(a["seeds"]) > 1]
    if not several:
        return []
    lines = ["", "Seeds: each seed redraws train/dev/test and the ZO directions (MeZO's protocol). Spearman of a "
             "later seed's layer test scores with the first seed's, over the layers both ran: how far a task's layer "
             "ranking agrees with itself, the ceiling for reading its correlation with another task.", "",
             "| task | seed | zero-shot | best layer | within 2 SE of the best | outlier pick (rank) | MeZO best lr: test "
             "| Spearman with the first seed |", "|---|---|---|---|---|---|---|---|"]
    for a in several:
        for k, row in enumerate(a["per_seed"]):
            full = row["full"]
            rho = "-" if k == 0 else _fmt(a["spearman_with_first_seed"][k - 1])
            lines.append(f"| {a['task']} | {row['seed']} | {pct(row['zero_shot_test_acc'])} | {row['best_layer']} "
                         f"({pct(row['best_test_acc'])}) | {', '.join(map(str, row['near_best'])) or '-'} | "
                         f"{row['outlier_pick']} ({_rank(row['outlier_rank'])}/{row['num_layers_run']}) | "
                         + (f"{full['lr']:g}: {pct(full.get('test_acc'))}" if full else "not run") + f" | {rho} |")
    lines += [""] + [f"- {a['task']}, mean of seeds {', '.join(map(str, a['seeds']))} over {len(a['layers'])} layers: "
                     f"best layer {a['best_layer_of_mean']} "
                     f"({pct(a['mean_test_acc'][a['layers'].index(a['best_layer_of_mean'])])})" for a in several]
    return lines


def _rank(r) -> str:
    return "not run" if r is None else str(r)


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.2f}"


def plot(r: dict, out: Path) -> None:
    from layerzo.core.plotting import joined, pyplot, save_figure_atomic

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    try:
        for t in r["tasks"]:
            gains = [100 * (a - t["zero_shot_test_acc"]) for a in t["test_acc"]]
            line, = ax.plot(t["layers"], gains, marker="o", markersize=3, label=f"{t['task']} (seed {t['seed']})",
                            linestyle=joined(t["layers"]))
            if t["outlier_pick"] in t["layers"]:  # a partial sweep may not have run it yet
                ax.plot([t["outlier_pick"]], [gains[t["layers"].index(t["outlier_pick"])]], marker="*", markersize=12,
                        color=line.get_color())
            for later in (x for x in r.get("replicates", []) if x["task"] == t["task"]):
                ax.plot(later["layers"], [100 * (a - later["zero_shot_test_acc"]) for a in later["test_acc"]],
                        linestyle=joined(later["layers"], "--"), marker="x", markersize=6,
                        color=line.get_color(),
                        label=f"{t['task']} (seed {later['seed']})")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xlabel("decoder layer tuned alone (star: the outlier pick)")
        ax.set_ylabel("test score - zero-shot (pts; F1 for SQuAD)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure_atomic(fig, out, dpi=120)
    finally:
        plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--sweep", action="append", required=True, metavar="TASK=DIR",
                   help="a task and its sweep folder (or sweep.jsonl); repeat per task, and per seed of a task")
    p.add_argument("--sensitivity", action="append", default=[], metavar="TASK=JSON",
                   help="reuse a task's saved sensitivity report (bench_sensitivity.py's JSON) instead of measuring")
    p.add_argument("--sensitivity-batches", type=int, default=2, help="for tasks measured now: training batches")
    p.add_argument("--sensitivity-batch-size", type=int, default=8, help="for tasks measured now: examples a batch")
    p.add_argument("--one-sided", action="store_true", help="for tasks measured now: one-sided differences (K forwards "
                                                             "a layer instead of 2K; long-sequence tasks)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sweeps = [tuple(item.split("=", 1)) for item in args.sweep]
    old = json.loads((RESULTS / f"{STEM}.json").read_text()) if (RESULTS / f"{STEM}.json").is_file() else {}
    kept = old.get("sensitivity", {})
    for doc in kept.values():  # measured before the batch size was kept: task_sensitivity_doc's default then
        doc.setdefault("batch_size", 8)
    for item in args.sensitivity:
        task, where = item.split("=", 1)
        saved = json.loads(Path(where).read_text())
        kept[task] = {**saved["sensitivity"], "max_length": 128, "from": where,  # bench_sensitivity's max_length
                      "batch_size": saved.get("batch_size", 8)}
    loaded, sensitivity, rows = None, {}, []
    for task, where in sweeps:
        path = Path(where) / "sweep.jsonl" if Path(where).is_dir() else Path(where)
        records = [r for r in read_records(path) if r.get("task") == task]
        if not records:
            raise SystemExit(f"{path} holds no records of task {task}")
        recipe = next(r["recipe"] for r in records if "recipe" in r)
        if task in kept and kept[task].get("max_length") == recipe["max_length"]:
            sensitivity[task] = kept[task]
        else:
            if loaded is None:
                from layerzo.model.loading import load_model
                loaded = load_model(None)
            sensitivity[task] = {**task_sensitivity_doc(task, recipe, args.data_dir, loaded, args),
                                 "max_length": recipe["max_length"]}
        if any(r["task"] == task and r["seed"] == recipe["seed"] for r in rows):
            raise SystemExit(f"two sweeps of task {task} with seed {recipe['seed']}: merge them with layerzo sweep --merge")
        rows.append(task_row(task, records, sensitivity[task], test_size(task, recipe, args.data_dir)))
    by_task = {t: sorted((r for r in rows if r["task"] == t), key=lambda r: r["seed"]) for t, _ in sweeps}
    first = [seeds[0] for seeds in by_task.values()]  # the tables read each task's lowest seed
    between = {a["task"]: {b["task"]: between_tasks(a, b) for b in first} for a in first}
    result = stamp({"sweeps": [{"task": t, "path": w} for t, w in sweeps], "tasks": first,
                    "replicates": [r for seeds in by_task.values() for r in seeds[1:]],
                    "seeds": {t: seed_agreement(seeds) for t, seeds in by_task.items()},
                    "spearman_between_tasks": between,
                    "transfer": {a["task"]: {b["task"]: transfer(a, b) for b in first} for a in first},
                    "sensitivity": sensitivity})
    plot(result, RESULTS / f"{STEM}.png")
    write_report(STEM, result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
