"""Benchmark: accuracy at EQUAL steps - zero-shot vs dominant-layer ZO vs full-model MeZO vs LoRA-ZO.

One process, one loaded model; every run is ``layerzo.tune.loop.tune`` with the
same recipe, steps and seed, then the model is put back bit-exactly
(``layerzo.sweep.run.snapshot``/``restore``; LoRA wrappers removed), so all
methods start from the same base. Several seeds give mean ± std.

* ``dominant``  the profiled layer alone, ``--lr``;
* ``full``      every decoder layer (MeZO), lr = ``--lr`` / num_layers (the sweep's ``full_lr`` rule:
                ZO noise grows with the number of tuned weights, so the stable lr scales like 1/d);
* ``lora``      LoRA r=8 on q/v of every layer (MeZO's LoRA baseline), lr = ``--lr`` x d_layer / d_lora
                (same 1/d rule), eps as the others;
* ``zero_shot`` the base model (no step).

Test accuracy is that of the best-dev checkpoint (tune's protocol; step 0 included).

    python benchmarks/bench_accuracy.py --quick                  # sst2+rte, 10 steps, 1 seed, small dev/test
    python benchmarks/bench_accuracy.py --steps 1000 --seeds 0,1,2 --device cuda

Writes benchmarks/results/accuracy.json and accuracy.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import header, stamp, write_report  # noqa: E402

METHODS = ("zero_shot", "dominant", "full", "lora")


def run_method(method: str, task: str, seed: int, args, loaded, layer: int, work: Path, cache) -> dict:
    from layerzo.model.layers import layer_parameter_names
    from layerzo.sweep.run import restore, snapshot
    from layerzo.tune.config import TuneConfig
    from layerzo.tune.loop import tune

    model, layout, n = loaded.model, loaded.layout, loaded.layout.num_layers
    d_layer = sum(dict(model.named_parameters())[nm].numel() for nm in layer_parameter_names(model, layout, layer))
    d_lora = sum(8 * (m.in_features + m.out_features) for name, m in model.named_modules()  # r=8: A [8,in] + B [out,8]
                 if name.rsplit(".", 1)[-1] in ("q_proj", "v_proj") and isinstance(m, torch.nn.Linear))
    spec = {"dominant": (str(layer), False, args.lr), "full": ("all", False, args.lr / n),
            "lora": ("all", True, args.lr * d_layer / d_lora)}[method]
    cfg = TuneConfig.from_dict(dict(task=task, data_dir=args.data_dir, layers=spec[0], lora=spec[1], lr=spec[2], eps=args.eps,
                     steps=args.steps, batch_size=args.batch_size, seed=seed, eval_every=args.steps,
                     num_dev=args.num_dev, num_test=args.num_test, eval_batch_size=32, max_length=args.max_length,
                     device=args.device))
    layers = list(range(n)) if spec[0] == "all" else [layer]
    saved = snapshot(model, layout, layers)
    t0 = time.perf_counter()
    try:  # every run starts from the restored base: its zero-shot accuracies come from the shared cache
        m = tune(cfg, work / f"{task}-{method}-{seed}", overwrite=True, progress=False, loaded=loaded,
                 zero_shot_cache=cache).metrics
    finally:
        restore(model, saved)
    return {"task": task, "method": method, "seed": seed, "lr": spec[2], "dev_acc": m["best_dev_acc"],
            "test_acc": m["test_acc"], "best_step": m["best_step"], "zero_shot_dev_acc": m["zero_shot_dev_acc"],
            "zero_shot_test_acc": m["zero_shot_test_acc"], "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--tasks", default="sst2,rte")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--steps", type=int, default=None, help="ZO steps per run (default 300; --quick 10)")
    p.add_argument("--seeds", default=None, help="comma list (default 0,1,2; --quick 0)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--num-dev", type=int, default=None)
    p.add_argument("--num-test", type=int, default=None)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--quick", action="store_true", help="10 steps, seed 0, 32 dev / 64 test, 1 torch thread")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--stem", default="accuracy", help="result file name stem in benchmarks/results/")
    args = p.parse_args()
    args.steps = args.steps or (10 if args.quick else 300)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    args.num_dev = args.num_dev if args.num_dev is not None else (32 if args.quick else 200)
    args.num_test = args.num_test if args.num_test is not None else (64 if args.quick else 500)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)

    from layerzo.model.loading import load_model
    from layerzo.tune.loop import resolve_layers
    from layerzo.tune.batches import ZeroShotCache
    from layerzo.tune.config import TuneConfig

    loaded = load_model(args.model, device=args.device)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-acc-") as tmp:
        for task in tasks:
            (layer,), _ = resolve_layers(TuneConfig(task=task, data_dir=args.data_dir, layers="dominant"), loaded)
            cache = ZeroShotCache()  # base-model accuracies, measured once per task
            for seed in seeds:
                for method in METHODS[1:]:
                    row = run_method(method, task, seed, args, loaded, layer, Path(tmp), cache)
                    row["layer"] = layer
                    rows.append(row)
                    print(row, file=sys.stderr, flush=True)
                rows.append({"task": task, "method": "zero_shot", "seed": seed, "layer": layer,
                             "dev_acc": row["zero_shot_dev_acc"], "test_acc": row["zero_shot_test_acc"]})
    summary = {}
    for task in tasks:
        for method in METHODS:
            accs = [r["test_acc"] for r in rows if r["task"] == task and r["method"] == method
                    and r["test_acc"] is not None]
            summary[f"{task}/{method}"] = {"mean": statistics.fmean(accs) if accs else None,
                                           "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "n": len(accs)}
    result = stamp({"model": loaded.source.name, "tasks": tasks, "seeds": seeds, "steps": args.steps,
                    "batch_size": args.batch_size, "lr": args.lr, "eps": args.eps, "num_dev": args.num_dev,
                    "num_test": args.num_test, "runs": rows, "summary": summary})
    write_report(args.stem, result, markdown(result))
    print(markdown(result))


def _se_pts(r: dict) -> float:
    from layerzo.sweep.report import standard_error

    accs = [row["test_acc"] for row in r["runs"] if row.get("test_acc") is not None] or [0.5]
    return 100 * standard_error(statistics.fmean(accs), max(1, r["num_test"]))


def markdown(r: dict) -> str:
    lines = [header("Accuracy at equal steps: dominant layer vs full-model MeZO vs LoRA-ZO", r),
             f"{r['model']}; {r['steps']} ZO steps per run, batch {r['batch_size']}, lr {r['lr']:g} (full: lr / "
             f"num_layers; LoRA: lr x d_layer / d_lora), eps {r['eps']:g}; {r['num_dev']} dev / {r['num_test']} test "
             f"examples; seeds {r['seeds']}. Test accuracy of the best-dev checkpoint, mean ± std over seeds "
             f"(binomial standard error of one run: about {_se_pts(r):.1f} pts).", "",
             "| task | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for task in r["tasks"]:
        cells = []
        for m in METHODS:
            s = r["summary"][f"{task}/{m}"]
            spread = f" ± {100 * s['std']:.1f}" if s["n"] > 1 else ""  # one seed has no spread to show
            cells.append("-" if s["mean"] is None else f"{100 * s['mean']:.1f}{spread}")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += ["", "Per run (lr, best step, seconds):", ""]
    for row in r["runs"]:
        if row["method"] != "zero_shot":
            lines.append(f"- {row['task']} {row['method']} seed {row['seed']}: test {100 * (row['test_acc'] or 0):.1f}%, "
                         f"dev {100 * (row['dev_acc'] or 0):.1f}%, lr {row['lr']:.3g}, best step {row['best_step']}, "
                         f"{row['seconds']} s")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
