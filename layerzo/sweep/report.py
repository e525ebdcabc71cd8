"""Sweep results: the ``sweep.jsonl`` records, per-task summary, ranking, verdict, json/csv/md/png files.

``sweep.jsonl`` holds one JSON record per line (``kind`` = profile | layer |
full), appended atomically (the file is rewritten to a temp file and renamed)
so an interrupted sweep resumes from the last finished run. Everything else
here is a pure function of those records (see :mod:`layerzo.sweep.run`).

Ranking: by test accuracy of the best-dev checkpoint (the larger held-out
set), ties broken by that checkpoint's dev accuracy, then the FINAL weights'
dev accuracy, then lower mean training loss over the run (the same batches
and direction seeds for every layer, so a paired comparison), then lower index. A layer's RANK is competition
style: 1 + the number of layers with strictly higher test accuracy, so tied
layers share a rank and a verdict never claims a win a tie does not give.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
from pathlib import Path
from typing import Any, Sequence

from layerzo.core.atomic import atomic_write_text
from layerzo.errors import ConfigError

CSV_COLUMNS = ("task", "layer", "dev_acc", "test_acc", "final_dev_acc", "best_step", "final_loss", "wall_s",
               "is_profiled_pick")


# ----------------------------------------------------------------------------- records (sweep.jsonl)
def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{lineno} is not valid JSON ({exc.msg})", "delete the broken line") from None
    return records


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line; the whole file is rewritten to a temp file and renamed (atomic)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    line = json.dumps(record, allow_nan=False, default=_json_default) + "\n"
    atomic_write_text(path, text + line)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ----------------------------------------------------------------------------- ranking and verdict
def _key(row: dict) -> tuple:
    """Sort key, best first."""
    def neg(v):
        return -v if v is not None else float("inf")

    loss = row.get("mean_loss")
    return (neg(row.get("test_acc")), neg(row.get("dev_acc")), neg(row.get("final_dev_acc")),
            loss if loss is not None else float("inf"), int(row["layer"]))


def mean_loss(curve: Sequence[float | None]) -> float | None:
    """Mean training loss over all steps: every run sees the same batches, so this is a paired comparison."""
    values = [v for v in curve if v is not None]
    return sum(values) / len(values) if values else None


def rank_of(rows: Sequence[dict], layer: int) -> int | None:
    """Competition rank (1 = best) of ``layer`` by test accuracy; None if it was not run or has no test acc."""
    mine = next((r for r in rows if r["layer"] == layer), None)
    if mine is None or mine.get("test_acc") is None:
        return None
    return 1 + sum(1 for r in rows if r.get("test_acc") is not None and r["test_acc"] > mine["test_acc"])


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def standard_error(acc: float | None, n: int | None) -> float | None:
    """Binomial standard error of an accuracy measured on ``n`` examples (the test set's sampling noise).

    For a mean of per-example scores in [0, 1] (F1) it is an upper bound: their variance is at most acc(1 − acc).
    """
    if acc is None or not n:
        return None
    return math.sqrt(max(acc * (1 - acc), 0.0) / n)


def task_summary(task: str, records: Sequence[dict], steps: int, num_test: int | None = None) -> dict:
    """Everything about one task: rows by layer, the best layer, the pick's rank, the full baseline, verdict."""
    rows = sorted(({**r, "mean_loss": mean_loss(r.get("loss_curve") or [])} for r in records
                   if r.get("task") == task and r.get("kind") == "layer"), key=lambda r: r["layer"])
    grid = [r for r in records if r.get("task") == task and r.get("kind") == "full"]
    full = best_full(grid)
    prof = next((r for r in records if r.get("task") == task and r.get("kind") == "profile"), None)
    pick = prof["pick"] if prof else None
    ranked = sorted(rows, key=_key)
    best = ranked[0] if ranked else None
    first = rows[0] if rows else full
    zero = {"dev_acc": first.get("zero_shot_dev_acc"), "test_acc": first.get("zero_shot_test_acc")} if first else {}
    zs_consistent = all(
        (r.get("zero_shot_dev_acc"), r.get("zero_shot_test_acc")) == (zero.get("dev_acc"), zero.get("test_acc"))
        for r in [*rows, *([full] if full else [])]
    )
    summary = {
        "task": task,
        # the score the *_acc fields hold: accuracy, or the generative tasks' F1 (records name it)
        "metric": (metric := next((r["metric"] for r in [*rows, *grid] if r.get("metric")), "acc")),
        "metric_label": "acc" if metric == "acc" else metric.upper(),  # F1: how tables and verdicts name it
        "profiled_pick": pick,
        "profile_confidence": prof.get("confidence") if prof else None,
        "zero_shot": zero,
        "zero_shot_identical_across_runs": zs_consistent,  # every run started from the same (restored) base
        "best_layer": best["layer"] if best else None,
        "best_tied_with": [r["layer"] for r in ranked[1:] if best and r.get("test_acc") == best.get("test_acc")],
        "profiled_rank": rank_of(rows, pick) if pick is not None else None,
        # position with every tie-breaker applied (1 = the best layer)
        "profiled_position": next((k + 1 for k, r in enumerate(ranked) if r["layer"] == pick), None),
        "num_layers_run": len(rows),
        "layers": [{k: r.get(k) for k in ("layer", "dev_acc", "test_acc", "final_dev_acc", "best_step",
                                          "final_loss", "mean_loss", "wall_seconds", "is_profiled_pick", "rejected_steps",
                                          "diverged", "loss_curve", "dev_curve", "restored_sha256")}
                   for r in rows],
        "full": None if full is None else {k: full.get(k) for k in (
            "dev_acc", "test_acc", "final_dev_acc", "best_step", "final_loss", "wall_seconds", "rejected_steps",
            "diverged", "loss_curve", "dev_curve")} | {"mean_loss": mean_loss(full.get("loss_curve") or []),
                                                        "lr": full_rate(full)},
        # every rate of the whole-model grid (one entry without a grid), the best by dev accuracy above
        "full_grid": sorted(({"lr": full_rate(r), "dev_acc": r.get("dev_acc"), "test_acc": r.get("test_acc"),
                              "diverged": r.get("diverged")} for r in grid), key=lambda g: g["lr"] or 0.0),
    }
    se = standard_error(best.get("test_acc") if best else None, num_test)
    summary["test_standard_error"], summary["test_examples"] = se, num_test
    # within two standard errors of the best layer's test accuracy: not distinguishable from it on this test set
    summary["near_best"] = [] if se is None else [r["layer"] for r in rows if r.get("test_acc") is not None
                                                   and best["test_acc"] - r["test_acc"] <= 2 * se + 1e-12]
    zs = zero.get("test_acc")
    # the best layer is no further from zero-shot than the test set's noise: no run is shown to have learned
    summary["separates_from_zero_shot"] = (None if se is None or zs is None or best.get("test_acc") is None
                                           else best["test_acc"] - zs > 2 * se + 1e-12)
    summary["verdict"] = verdict(summary, steps)
    return summary


def rate_key(lr: float) -> float:
    """A rate compared at 12 significant digits: lr / num_layers = 9.999999999999999e-06 is the grid's 1e-05."""
    return float(f"{float(lr):.12g}")


def full_rate(rec: dict) -> float | None:
    """The learning rate of a whole-model record (records from before rate grids: their recipe's ``full_lr``)."""
    lr = rec.get("lr", rec.get("recipe", {}).get("full_lr"))
    return None if lr is None or isinstance(lr, list) else rate_key(lr)


def best_full(grid: Sequence[dict]) -> dict | None:
    """The whole-model run with the best dev accuracy (ties: the smaller rate); a diverged run only if all did."""
    def key(r):
        return (r.get("diverged") is not None, -(r.get("dev_acc") if r.get("dev_acc") is not None else -1.0),
                full_rate(r) or 0.0)

    return min(grid, key=key) if grid else None


def verdict(s: dict, steps: int) -> str:
    """One line: which layer dominated, whether it is the profiled one (+ its rank), and the gap to full MeZO."""
    if s["best_layer"] is None:
        return f"{s['task']}: no layer runs recorded"
    rows = {r["layer"]: r for r in s["layers"]}
    best, pick = rows[s["best_layer"]], s["profiled_pick"]
    tied = s["best_tied_with"]
    label = s.get("metric_label", "acc")
    score = "" if label == "acc" else f" {label}"
    if s.get("separates_from_zero_shot") is False:
        se = s["test_standard_error"]
        parts = [f"{s['task']}: no layer separates from zero-shot - the best, layer {best['layer']} (test{score} "
                 f"{pct(best['test_acc'])}, dev {pct(best['dev_acc'])}), is within 2 standard errors "
                 f"({200 * se:.1f} pts) of zero-shot test {pct(s['zero_shot'].get('test_acc'))}"]
    elif len(tied) + 1 == s["num_layers_run"] > 1:
        parts = [f"{s['task']}: no layer dominated - all {s['num_layers_run']} layers tie on test at "
                 f"{pct(best['test_acc'])}{score} (dev {pct(best['dev_acc'])}; zero-shot test "
                 f"{pct(s['zero_shot'].get('test_acc'))}); by the tie-breakers layer {best['layer']} leads "
                 f"(final dev {pct(best.get('final_dev_acc'))}, mean train loss {_num(best.get('mean_loss'))})"]
    else:
        tie = f", tied with layer(s) {','.join(map(str, tied))}" if tied else ""
        parts = [f"{s['task']}: layer {best['layer']} dominated (test{score} {pct(best['test_acc'])}, "
                 f"dev {pct(best['dev_acc'])}{tie}; zero-shot test {pct(s['zero_shot'].get('test_acc'))})"]
    if pick is None:
        parts.append("no profile pick recorded")
    elif pick == best["layer"]:
        parts.append(f"that IS the profiled layer {pick} (rank {s['profiled_rank']}/{s['num_layers_run']})")
    elif pick in s["best_tied_with"]:
        parts.append(f"the profiled layer {pick} ties for best on test (rank {s['profiled_rank']}/{s['num_layers_run']}; "
                     f"{_ordinal(s['profiled_position'])} with the tie-breakers)")
    elif pick in rows:
        near = pick in s.get("near_best", [])
        se = s.get("test_standard_error")
        noise = f"; within 2 standard errors ({200 * se:.1f} pts) of the best" if near and se else ""
        parts.append(f"the profiled layer {pick} ranks {s['profiled_rank']}/{s['num_layers_run']} "
                     f"(test {pct(rows[pick]['test_acc'])}{noise})")
    else:
        parts.append(f"the profiled layer {pick} was not in the sweep")
    full = s["full"]
    if full is not None and full.get("test_acc") is not None and best.get("test_acc") is not None:
        gap = 100 * (best["test_acc"] - full["test_acc"])
        grid = s.get("full_grid") or []
        at_rate = (f" at its best of {len(grid)} rates, lr {full['lr']:g}" if len(grid) > 1 and full.get("lr")
                   else "")
        if gap == 0:
            parts.append(f"best layer ties full-model MeZO{at_rate} (test {pct(full['test_acc'])}) at {steps} steps each")
        else:
            parts.append(f"best layer {'beats' if gap > 0 else 'trails'} full-model MeZO{at_rate} (test "
                         f"{pct(full['test_acc'])}) by {abs(gap):.1f} pts at {steps} steps each")
    return "; ".join(parts)


def _ordinal(n: int | None) -> str:
    if n is None:
        return "-"
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def summarize(records: Sequence[dict], config, layers: Sequence[int], num_layers: int, *, model_name: str,
              command: str | None = None, split_sizes: dict[str, dict[str, int]] | None = None) -> dict:
    """The sweep.json document: config, per-task summaries, and (for several tasks) the task-agnostic check.

    ``split_sizes``: the train/dev/test examples each task really has (a task's files may hold fewer
    than ``num_train``/``num_test``: CB's 250 training rows, COPA's 100 validation rows); the
    standard errors use the test size and the report states them.
    """
    import torch

    sizes = split_sizes or {}
    tasks = {t: {**task_summary(t, records, config.tune.steps, sizes.get(t, {}).get("test", config.tune.num_test)),
                 "splits": sizes.get(t)} for t in config.tasks}
    bests = {t: s["best_layer"] for t, s in tasks.items()}
    doc: dict[str, Any] = {
        "model": model_name, "num_layers": num_layers, "layers": list(layers), "command": command,
        "config": config.to_dict(num_layers),
        "environment": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "tasks": tasks,
    }
    lines = [s["verdict"] for s in tasks.values()]
    if len(tasks) > 1:
        same = len(set(bests.values())) == 1
        doc["task_agnostic"] = {"best_layer_per_task": bests, "same_best_layer": same}
        lines.append(("same best layer across tasks: " if same else "best layer differs across tasks: ")
                     + ", ".join(f"{t} {b}" for t, b in bests.items()))
    doc["verdict"] = " | ".join(lines)
    return doc


def csv_text(doc: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for task, s in doc["tasks"].items():
        rows = [dict(r, layer=r["layer"]) for r in s["layers"]]
        if s["full"] is not None:
            rows.append({**s["full"], "layer": "all", "is_profiled_pick": False})
        for r in rows:
            w.writerow([task, r["layer"], _num(r.get("dev_acc")), _num(r.get("test_acc")), _num(r.get("final_dev_acc")),
                        r.get("best_step"), _num(r.get("final_loss")), _num(r.get("wall_seconds"), 1),
                        bool(r.get("is_profiled_pick"))])
    return buf.getvalue()


def _num(v, digits: int = 4) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def markdown_text(doc: dict) -> str:
    c = doc["config"]
    out = [f"# layerzo sweep: {doc['model']}\n"]
    if doc.get("command"):
        out.append(f"`{doc['command']}`\n")
    if not c["full"]:
        baseline = "no whole-model MeZO baseline (--no-full)"
    elif isinstance(c["full_lr"], list):
        baseline = f"whole-model MeZO baseline at each rate of the grid {', '.join(f'{r:g}' for r in c['full_lr'])}, " \
                   "the best dev kept"
    else:
        baseline = f"whole-model MeZO baseline with lr {c['full_lr']:.3g} (= lr / num_layers unless set)"
    real = any(s.get("splits") for s in doc["tasks"].values())
    out.append(f"Each of {len(doc['layers'])} layers ZO-tuned ALONE for {c['steps']} steps (batch {c['batch_size']}, "
               f"lr {c['lr']:g}, eps {c['eps']:g}, seed {c['seed']}); {baseline}. At most {c['num_train']} train / "
               f"{c['num_dev']} dev / {c['num_test']} test examples" + (" (each task's real split sizes below)" if real else "")
               + "; test score (accuracy; F1 for generative tasks) of the best-dev checkpoint (step 0 included). "
               f"{doc['environment']['platform']}, {doc['environment']['cpus']} CPUs, torch {doc['environment']['torch']}.\n")
    for task, s in doc["tasks"].items():
        out.append(f"## {task}\n")
        if s.get("splits"):
            out.append(f"Splits: {s['splits']['train']} train / {s['splits']['dev']} dev / {s['splits']['test']} test "
                       "examples.\n")
        out.append(f"Profiled pick: layer {s['profiled_pick']} ({s['profile_confidence']} confidence): rank "
                   f"{s['profiled_rank']}/{s['num_layers_run']} on test, {_ordinal(s.get('profiled_position'))} with the "
                   f"tie-breakers (dev, final dev, mean train loss). Best layer: {s['best_layer']}. "
                   f"Zero-shot: dev {pct(s['zero_shot'].get('dev_acc'))}, test {pct(s['zero_shot'].get('test_acc'))} "
                   f"(identical in every run: {s['zero_shot_identical_across_runs']}).\n")
        m = s.get("metric_label", "acc")
        out.append(f"| layer | dev {m} | test {m} | rank | final dev | best step | final loss | mean loss | wall s |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in s["layers"]:
            name = f"**{r['layer']}** (pick)" if r["is_profiled_pick"] else str(r["layer"])
            out.append(f"| {name} | {pct(r['dev_acc'])} | {pct(r['test_acc'])} | {rank_of(s['layers'], r['layer'])} | "
                       f"{pct(r['final_dev_acc'])} | {r['best_step']} | {_num(r['final_loss'])} | {_num(r['mean_loss'])} | "
                       f"{_num(r['wall_seconds'], 0)} |")
        f = s["full"]
        if f is not None:
            rate = f" lr {f['lr']:g}" if f.get("lr") else ""
            out.append(f"| all (MeZO{rate}) | {pct(f['dev_acc'])} | {pct(f['test_acc'])} | - | {pct(f['final_dev_acc'])} | "
                       f"{f['best_step']} | {_num(f['final_loss'])} | {_num(f['mean_loss'])} | {_num(f['wall_seconds'], 0)} |")
        if len(s.get("full_grid") or []) > 1:
            out.append("\nWhole-model MeZO grid (best dev kept): " + "; ".join(
                f"lr {g['lr']:g}: dev {pct(g['dev_acc'])}, test {pct(g['test_acc'])}"
                + (" (diverged)" if g.get("diverged") else "") for g in s["full_grid"]) + ".")
        if s.get("test_standard_error"):
            bound = " (for F1, a score in [0, 1], an upper bound)" if m != "acc" else ""
            out.append(f"\nTest-set noise: binomial standard error{bound} {100 * s['test_standard_error']:.1f} pts at the best "
                       f"layer's score ({s.get('test_examples') or c['num_test']} examples). Within 2 standard errors of the best: layers "
                       f"{', '.join(map(str, s['near_best']))}.")
        out.append(f"\n**Verdict:** {s['verdict']}\n")
    if "task_agnostic" in doc:
        ta = doc["task_agnostic"]
        out.append(f"Task-agnostic: best layer per task {ta['best_layer_per_task']}; same: {ta['same_best_layer']}.\n")
    return "\n".join(out)


def write_outputs(doc: dict, out: Path) -> dict[str, Path]:
    """sweep.json, sweep.csv, sweep.md and (with matplotlib) sweep.png in ``out``, each written atomically."""
    from layerzo.sweep.plot import plot_sweep

    paths = {"json": out / "sweep.json", "csv": out / "sweep.csv", "md": out / "sweep.md", "png": out / "sweep.png"}
    atomic_write_text(paths["json"], json.dumps(doc, indent=2, allow_nan=False) + "\n")
    atomic_write_text(paths["csv"], csv_text(doc))
    atomic_write_text(paths["md"], markdown_text(doc))
    try:
        plot_sweep(doc, paths["png"])
    except ConfigError:  # matplotlib missing: the numbers are written; the figure is optional (layerzo[plot])
        del paths["png"]
    return paths
