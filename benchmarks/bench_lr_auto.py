"""Benchmark: ``tune --lr auto`` on the demo (SST-2) - which rate it picks, what it costs, how good the pick is.

For each method of the time-to-accuracy race (``bench_race.py``: the dominant
layer, full-model MeZO, LoRA-ZO), the learning-rate search runs exactly as
``layerzo tune --lr auto`` runs it (``layerzo.tune.loop.tuned_model`` +
``searched_lr``: the 4 rates of ``lr_grid(d)`` raced by successive halving on
the run's first training batches, about 10 % of its steps), with the race's
settings (batch 16, 150 steps, seed 0). The pick is then scored with the race's
own full-budget grid runs (``race_sst2_smollm2.jsonl``, one run per grid value):
the pick's best dev accuracy vs the best grid value's, and the search's seconds
vs the wall time of the pick's run. With ``--time-run`` the pick's run is run
again right after the search, in the same process, and the share uses that
wall time (the machine's load then weighs on both alike).

    python benchmarks/bench_lr_auto.py          # after bench_race.py --phase grid
    python benchmarks/bench_lr_auto.py --methods dominant --time-run

Writes benchmarks/results/lr_auto_sst2_smollm2.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_race import METHODS, STEM, method_spec, read_runs, run, settings  # noqa: E402
from common import RESULTS, header, stamp, write_report  # noqa: E402

TARGET_POINTS = 2.0  # the pick's best dev accuracy within 2 points of the best grid value's
TARGET_SHARE = 0.15  # in at most 15 % of the run's time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--num-dev", type=int, default=200)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default=str(RESULTS / f"{STEM}.jsonl"), help="the race's grid runs")
    p.add_argument("--time-run", action="store_true", help="time the pick's run here, after the search")
    p.add_argument("--work", default="runs/bench_lr_auto", help="where --time-run writes its run")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from layerzo.data.objectives import Objective
    from layerzo.data.tasks import load_task
    from layerzo.model.loading import load_model
    from layerzo.tune.config import TuneConfig
    from layerzo.tune.loop import resolve_layers, searched_lr, tuned_model
    from layerzo.tune.race import RaceConfig

    loaded = load_model(None)
    (layer,), _ = resolve_layers(TuneConfig(task="sst2", data_dir=args.data_dir, layers="dominant"), loaded)
    grid_runs = [r for r in read_runs(Path(args.runs)) if r["seed"] == 0]
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        keys, d = method_spec(method, loaded, layer)
        config = TuneConfig.from_dict({**settings(args), **keys, "seed": 0, "lr_search": "auto"})
        splits = load_task(config.task, config.data_dir, num_train=config.num_train, num_dev=config.num_dev,
                           num_test=config.num_test, seed=config.seed)
        objective = Objective("choice", loaded.tokenizer, max_length=config.max_length)
        notes: list[str] = []
        with torch.no_grad(), tuned_model(config, loaded, splits, objective) as tuned:
            t0 = time.perf_counter()
            _, record = searched_lr(config, loaded, splits, objective, tuned, notes.append)
            seconds = time.perf_counter() - t0
        by_lr = {r["lr"]: r for r in grid_runs if r["method"] == method}
        best = max(by_lr.values(), key=lambda r: r["best_dev_acc"] or 0.0) if by_lr else None
        picked = by_lr.get(record["lr"])
        row = {"method": method, "d": d, "grid": record["grid"], "pick": record["lr"], "search_seconds": seconds,
               "search_steps": record["steps"], "rounds": record["rounds"], "note": notes[-1] if notes else "",
               "grid_best_dev_acc": {f"{lr:g}": r["best_dev_acc"] for lr, r in sorted(by_lr.items())}}
        if best is not None and picked is not None:
            timed = run(method, record["lr"], 0, args, loaded, layer, Path(args.work), None) if args.time_run else None
            wall = timed["wall_seconds"] if timed else picked["wall_seconds"]
            row.update(best_lr=best["lr"], pick_dev_acc=picked["best_dev_acc"], best_dev_acc=best["best_dev_acc"],
                       gap_points=100 * (best["best_dev_acc"] - picked["best_dev_acc"]),
                       run_wall_seconds=wall, run_timed_here=bool(timed), share_of_run=seconds / wall)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "rounds"}), file=sys.stderr, flush=True)
    previous = RESULTS / "lr_auto_sst2_smollm2.json"  # rows of methods not rerun now stay (with their own stamp)
    if previous.is_file():
        done = {row["method"] for row in rows}
        old = json.loads(previous.read_text())
        rows += [{**row, "measured": old.get("date")} for row in old.get("rows", []) if row["method"] not in done]
        rows.sort(key=lambda row: METHODS.index(row["method"]) if row["method"] in METHODS else len(METHODS))
    result = stamp({"model": loaded.source.name, "layer": layer, "settings": settings(args), "rows": rows,
                    "dev_examples": RaceConfig().dev_examples,
                    "targets": {"gap_points <=": TARGET_POINTS, "share_of_run <=": TARGET_SHARE}})
    write_report("lr_auto_sst2_smollm2", result, markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = [header("`tune --lr auto` on the demo model (SST-2)", r),
             f"{r['model']}, dominant layer {r['layer']}; the run: {s['steps']} steps, batch {s['batch_size']}, "
             f"eps {s['eps']:g}, seed 0. The search as `tune --lr auto` runs it (4 rates of `lr_grid(d)`, successive "
             f"halving on the teacher-forced dev loss of {r.get('dev_examples', 32)} dev examples); the pick is scored with the race's full-"
             "budget grid runs (`race_sst2_smollm2.md`, best dev accuracy on "
             f"{s['num_dev']} examples).", "",
             "| method | grid | pick | best grid value | pick's dev acc | best dev acc | gap | search | share of the run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        grid = ", ".join(f"{g:g}" for g in row["grid"])
        if "gap_points" in row:
            ok_gap = row["gap_points"] <= TARGET_POINTS
            ok_share = row["share_of_run"] <= TARGET_SHARE
            lines.append(f"| {row['method']} | {grid} | {row['pick']:g} | {row['best_lr']:g} | "
                         f"{100 * row['pick_dev_acc']:.1f}% | {100 * row['best_dev_acc']:.1f}% | "
                         f"{row['gap_points']:.1f} pts ({'met' if ok_gap else 'MISSED'}) | "
                         f"{row['search_seconds']:.0f} s, {row['search_steps']} steps | "
                         f"{100 * row['share_of_run']:.1f}% ({'met' if ok_share else 'MISSED'}) |")
        else:
            lines.append(f"| {row['method']} | {grid} | {row['pick']:g} | (no grid runs) | | | | "
                         f"{row['search_seconds']:.0f} s | |")
    here = [row["method"] for row in r["rows"] if row.get("run_timed_here")]
    lines += ["", f"Targets: gap <= {TARGET_POINTS:g} points, search <= {100 * TARGET_SHARE:.0f}% of the run's time "
              "(the pick's run: its wall time, dev evaluations included"
              + (f"; timed in this process right after the search for {', '.join(here)})." if here else
                 "; from the race's grid runs).")]
    for row in r["rows"]:
        when = f" (measured {row['measured']}, an earlier run of this script)" if row.get("measured") else ""
        lines += ["", f"- {row['method']}{when}: {row['note']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
