"""Benchmark: a fair time-to-accuracy race - dominant layer vs full-model MeZO vs LoRA-ZO, each at its best lr.

Every method gets its own learning-rate grid, the 4 values of
``layerzo.tune.lr_search.lr_grid`` for its number of tuned weights (the same
grid ``tune --lr auto`` searches), one full-budget run per value (seed 0); the
value with the best dev accuracy is kept and run again with seed 1. Every run
is ``layerzo.tune.loop.tune`` on ONE loaded demo model, SST-2, batch 16, the
same steps, dev set and seeds, the base restored bit-exactly between runs
(``layerzo.sweep.run.snapshot``/``restore``); the runs are ordered
dominant, full, LoRA, dominant, ... so load drift hits all three alike.

The clock of a run is its training time without the dev evaluations: the
per-example cache fill and other set-up inside the training phase are counted
at t = 0, then each ZO step's seconds (from ``metrics.jsonl``). Time-to-accuracy
for seed s: the first time a method's dev accuracy reaches the best dev
accuracy full-model MeZO reached within the budget with seed s.

    python benchmarks/bench_race.py --phase grid --part 0/2 &    # two processes share the grid
    python benchmarks/bench_race.py --phase grid --part 1/2
    python benchmarks/bench_race.py --phase seeds --part 0/2 &   # the best lr of each method, seed 1
    python benchmarks/bench_race.py --phase seeds --part 1/2
    python benchmarks/bench_race.py --phase report

Runs append to ``benchmarks/results/race_sst2_smollm2.jsonl`` (a finished run
is skipped when the command is repeated: resumable across processes);
``--phase report`` writes ``race_sst2_smollm2.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import RESULTS, header, stamp, write_report  # noqa: E402

METHODS = ("dominant", "full", "lora")
STEM = "race_sst2_smollm2"


def settings(args) -> dict:
    return {"task": "sst2", "data_dir": args.data_dir, "steps": args.steps, "batch_size": args.batch_size,
            "eps": args.eps, "eval_every": args.eval_every, "num_dev": args.num_dev, "num_test": 0,
            "eval_batch_size": 32, "max_length": 256}


def method_spec(method: str, loaded, layer: int) -> tuple[dict, int]:
    """The tune keys of a method and its number of tuned weights (the lr grid's d)."""
    from layerzo.model.layers import layer_parameter_names

    model, layout = loaded.model, loaded.layout
    params = dict(model.named_parameters())
    count = lambda layers: sum(params[n].numel() for i in layers for n in layer_parameter_names(model, layout, i))  # noqa: E731
    if method == "dominant":
        return {"layers": str(layer)}, count([layer])
    if method == "full":
        return {"layers": "all"}, count(range(layout.num_layers))
    d_lora = sum(8 * (m.in_features + m.out_features) for name, m in model.named_modules()  # r=8: A [8,in] + B [out,8]
                 if name.rsplit(".", 1)[-1] in ("q_proj", "v_proj") and isinstance(m, torch.nn.Linear))
    return {"layers": "all", "lora": True}, d_lora


def run(method: str, lr: float, seed: int, args, loaded, layer: int, work: Path, zero_shot) -> dict:
    from layerzo.errors import DivergenceError
    from layerzo.patch.manifest import MANIFEST_NAME
    from layerzo.sweep.run import restore, snapshot
    from layerzo.tune.config import TuneConfig
    from layerzo.tune.loop import METRICS_NAME, tune

    keys, d = method_spec(method, loaded, layer)
    config = TuneConfig.from_dict({**settings(args), **keys, "lr": lr, "seed": seed})
    saved = snapshot(loaded.model, loaded.layout, range(loaded.layout.num_layers))
    out = work / f"{method}-{lr:g}-{seed}"
    t0 = time.perf_counter()
    try:
        result = tune(config, out, overwrite=True, progress=False, loaded=loaded, zero_shot_cache=zero_shot)
        metrics, diverged = result.metrics, None
    except DivergenceError as exc:  # tune wrote its best patch and metrics before raising
        metrics, diverged = json.loads((out / MANIFEST_NAME).read_text())["metrics"], exc.one_line()
    finally:
        restore(loaded.model, saved)
    rows = [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines() if line.strip()]
    evals = sum(r.get("eval_seconds", 0.0) for r in rows)
    step_seconds = [r["seconds"] for r in rows]
    # the training phase's set-up (per-example cache fill, first batches): at t = 0 of the clock
    setup = max(0.0, metrics.get("train_seconds", 0.0) - sum(step_seconds) - evals) if diverged is None else 0.0
    curve, clock = [[round(setup, 3), metrics["zero_shot_dev_acc"], 0]], setup
    for r in rows:
        clock += r["seconds"]
        if r.get("dev_acc") is not None:
            curve.append([round(clock, 3), r["dev_acc"], r["step"]])
    return {"method": method, "lr": lr, "seed": seed, "d": d, "layers": keys["layers"], "curve": curve,
            "best_dev_acc": metrics["best_dev_acc"], "zero_shot_dev_acc": metrics["zero_shot_dev_acc"],
            "best_step": metrics["best_step"], "median_step_seconds": statistics.median(step_seconds),
            "setup_seconds": round(setup, 3), "train_clock_seconds": round(clock, 3), "diverged": diverged,
            "wall_seconds": round(time.perf_counter() - t0, 1), "steps": args.steps}


def read_runs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def best_lr(runs: list[dict], method: str) -> float | None:
    """The grid value with the best dev accuracy (seed 0); ties: the one that got there first."""
    grid = [r for r in runs if r["method"] == method and r["seed"] == 0]
    if not grid:
        return None
    return max(grid, key=lambda r: (r["best_dev_acc"] or 0.0, -first_time(r, r["best_dev_acc"] or 0.0)))["lr"]


def first_time(run: dict, target: float) -> float:
    """Seconds on the run's clock until its dev accuracy first reaches ``target`` (inf: never)."""
    return next((t for t, acc, _ in run["curve"] if acc is not None and acc >= target - 1e-12), float("inf"))


def first_step(run: dict, target: float) -> int | None:
    """The first evaluated step at which the run's dev accuracy reaches ``target`` (None: never)."""
    return next((step for _, acc, step in run["curve"] if acc is not None and acc >= target - 1e-12), None)


def jobs(phase: str, grids: dict, runs: list[dict], seeds: list[int]) -> list[tuple[str, float, int]]:
    if phase == "grid":
        return [(m, grids[m][i], seeds[0]) for i in range(len(grids[METHODS[0]])) for m in METHODS]
    return [(m, best_lr(runs, m), s) for s in seeds[1:] for m in METHODS if best_lr(runs, m) is not None]


def ratio_of(times: dict, a: str, b: str) -> float | None:
    """times[a] / times[b], None when either is missing, zero or never reached."""
    x, y = times.get(a), times.get(b)
    return x / y if x and y and y != float("inf") and x != float("inf") else None


def report(runs: list[dict], meta: dict, results_dir: Path = RESULTS) -> None:
    seeds = sorted({r["seed"] for r in runs})
    step_file = results_dir / "step.json"  # bench_step.py's interleaved medians (variants named as here)
    step_medians = json.loads(step_file.read_text())["median_s"] if step_file.exists() else {}
    meta = {**meta, "step_medians": {m: step_medians.get(m) for m in METHODS}}
    best = {m: best_lr(runs, m) for m in METHODS}
    chosen = {(r["method"], r["seed"]): r for r in runs if r["lr"] == best[r["method"]]}
    races = []
    for s in seeds:
        full = chosen.get(("full", s))
        if full is None:
            continue
        target = full["best_dev_acc"]
        times = {m: first_time(chosen[(m, s)], target) for m in METHODS if (m, s) in chosen}
        steps = {m: first_step(chosen[(m, s)], target) for m in METHODS if (m, s) in chosen}
        # the same race on a quiet clock: steps to the target x the interleaved per-step medians of
        # step.json (same batch size), plus the run's own measured set-up (the dominant layer's cache fill)
        quiet = {m: (chosen[(m, s)]["setup_seconds"] + steps[m] * step_medians[m])
                 if steps.get(m) is not None and m in step_medians else None for m in steps}
        races.append({"seed": s, "target_dev_acc": target, "zero_shot_dev_acc": full["zero_shot_dev_acc"],
                      "seconds_to_target": times, "steps_to_target": steps, "quiet_seconds_to_target": quiet,
                      "quiet_full_over_dominant": ratio_of(quiet, "full", "dominant"),
                      "full_over_dominant": ratio_of(times, "full", "dominant"),
                      "full_over_lora": ratio_of(times, "full", "lora")})
    step = {m: statistics.median(r["median_step_seconds"] for r in runs if r["method"] == m) for m in METHODS
            if any(r["method"] == m for r in runs)}
    result = stamp({**meta, "best_lr": best, "races": races, "median_step_seconds": step, "runs": runs})
    write_report(STEM, result, markdown(result), results_dir=results_dir)
    plot(result, results_dir / f"{STEM}.png")
    print(markdown(result))


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = [header("Time-to-accuracy: dominant layer vs full-model MeZO vs LoRA-ZO (SST-2, demo model)", r),
             f"{r['model']}; dominant layer {r['layer']}; {s['steps']} ZO steps per run, batch {s['batch_size']}, "
             f"eps {s['eps']:g}, dev accuracy on {s['num_dev']} examples every {s['eval_every']} steps. Each method's "
             "lr grid is `lr_grid(d)` (d = its tuned weights), one seed-0 run per value; the best is run again with "
             "seed 1. Clock: training time without dev evaluations (the cache fill counted at t = 0).", "",
             "## Learning-rate grids (seed 0: best dev accuracy, step, diverged)", "",
             "| method | d | lr | best dev acc | best step | median s/step | note |", "|---|---|---|---|---|---|---|"]
    for run in sorted((x for x in r["runs"] if x["seed"] == 0), key=lambda x: (METHODS.index(x["method"]), x["lr"])):
        mark = " **kept**" if run["lr"] == r["best_lr"][run["method"]] else ""
        lines.append(f"| {run['method']} | {run['d'] / 1e6:.2f}M | {run['lr']:g}{mark} | "
                     f"{100 * (run['best_dev_acc'] or 0):.1f}% | {run['best_step']} | {run['median_step_seconds']:.3f} | "
                     f"{'diverged' if run['diverged'] else ''} |")
    lines += ["", "## Time to full-model MeZO's best dev accuracy", "",
              "| seed | target (full MeZO best) | zero-shot | dominant s | full s | LoRA s | full / dominant | "
              "full / LoRA |", "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "never" if v is None or v == float("inf") else f"{v:.0f}"  # noqa: E731
    ratio = lambda v: "-" if v is None or v != v else f"{v:.1f}x"  # noqa: E731
    for race in r["races"]:
        t = race["seconds_to_target"]
        lines.append(f"| {race['seed']} | {100 * race['target_dev_acc']:.1f}% | {100 * race['zero_shot_dev_acc']:.1f}% | "
                     f"{fmt(t.get('dominant'))} | {fmt(t.get('full'))} | {fmt(t.get('lora'))} | "
                     f"{ratio(race['full_over_dominant'])} | {ratio(race['full_over_lora'])} |")
        if race["target_dev_acc"] <= race["zero_shot_dev_acc"]:
            lines.append(f"| | full-model MeZO never beat zero-shot with seed {race['seed']}: the target is the base "
                         "model's own accuracy, reached at t = 0 (plus set-up) | | | | | | |")
    lines += ["", "The same race on a quiet clock (steps to the target x the interleaved per-step medians of "
              "[step.md](step.md) at the same batch size, + the measured set-up):", "",
              "| seed | dominant steps | full steps | LoRA steps | dominant s | full s | LoRA s | full / dominant |",
              "|---|---|---|---|---|---|---|---|"]
    for race in r["races"]:
        st, q = race["steps_to_target"], race["quiet_seconds_to_target"]
        lines.append(f"| {race['seed']} | {st.get('dominant')} | {st.get('full')} | {st.get('lora')} | "
                     f"{fmt(q.get('dominant'))} | {fmt(q.get('full'))} | {fmt(q.get('lora'))} | "
                     f"{ratio(race['quiet_full_over_dominant'])} |")
    lines += ["", "Median seconds per ZO step (all runs): "
              + ", ".join(f"{m} {v:.3f}" for m, v in r["median_step_seconds"].items()),
              "", f"Dev accuracy vs seconds of every kept-lr run: `{STEM}.png`."]
    return "\n".join(lines) + "\n"


def plot(r: dict, out: Path) -> None:
    from layerzo.core.plotting import pyplot, save_figure_atomic

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"dominant": "tab:red", "full": "tab:blue", "lora": "tab:green"}
    for run in r["runs"]:
        if run["lr"] != r["best_lr"][run["method"]]:
            continue
        t, acc = zip(*[(c[0], 100 * c[1]) for c in run["curve"]])
        ax.plot(t, acc, marker="o", ms=3, color=colors[run["method"]], ls="-" if run["seed"] == 0 else "--",
                label=f"{run['method']} lr {run['lr']:g} seed {run['seed']}")
    for race in r["races"]:
        ax.axhline(100 * race["target_dev_acc"], color="grey", lw=0.6, ls=":")
    ax.set_xlabel("training seconds (dev evaluations excluded)")
    ax.set_ylabel("dev accuracy (%)")
    ax.set_title(f"SST-2, {r['model'].rsplit('/', 1)[-1]}: dominant layer {r['layer']} vs full MeZO vs LoRA-ZO")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, out, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=("grid", "seeds", "report"), required=True)
    p.add_argument("--part", default="0/1", help="i/n: this process runs every n-th job from the i-th")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--num-dev", type=int, default=200)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default=str(RESULTS / f"{STEM}.jsonl"), help="the resumable per-run records")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    part, parts = (int(x) for x in args.part.split("/"))
    seeds = [int(s) for s in args.seeds.split(",")]

    from layerzo.core.atomic import atomic_write_text
    from layerzo.model.loading import load_model
    from layerzo.tune.batches import ZeroShotCache
    from layerzo.tune.config import TuneConfig
    from layerzo.tune.loop import resolve_layers
    from layerzo.tune.lr_search import lr_grid

    loaded = load_model(None)
    (layer,), _ = resolve_layers(TuneConfig(task="sst2", data_dir=args.data_dir, layers="dominant"), loaded)
    grids = {m: lr_grid(method_spec(m, loaded, layer)[1]) for m in METHODS}
    path = Path(args.runs)
    meta = {"model": loaded.source.name, "layer": layer, "grids": grids, "settings": settings(args)}
    if args.phase == "report":
        return report(read_runs(path), meta)
    todo = jobs(args.phase, grids, read_runs(path), seeds)[part::parts]
    zero_shot = ZeroShotCache()
    with tempfile.TemporaryDirectory(prefix="bench-race-") as tmp:
        for method, lr, seed in todo:
            runs = read_runs(path)  # another process may have finished it meanwhile
            if any((r["method"], r["lr"], r["seed"]) == (method, lr, seed) for r in runs):
                continue
            record = run(method, lr, seed, args, loaded, layer, Path(tmp), zero_shot)
            print(json.dumps({k: v for k, v in record.items() if k != "curve"}), file=sys.stderr, flush=True)
            # append = rewrite atomically: a killed process never leaves half a line
            runs = read_runs(path)
            atomic_write_text(path, "".join(json.dumps(x) + "\n" for x in [*runs, record]))


if __name__ == "__main__":
    main()
