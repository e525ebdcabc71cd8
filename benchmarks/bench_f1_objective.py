"""Benchmark: the non-differentiable ``f1`` objective on the demo model (SQuAD), a few ZO steps.

MeZO's ``--non_diff``: the loss of a batch is minus the mean SQuAD F1 of its
greedy answers, so a step is two greedy generations (θ ± εz) of the batch,
and the projected gradient is the F1 difference / 2ε. Every ``--every`` steps the
F1 of the current weights is measured on a fixed monitor set: the training
batches' examples drawn so far are a moving target, so the monitor holds the
first ``--monitor`` training examples (all of them are also trained on).

    python benchmarks/bench_f1_objective.py --steps 30 --lr 1e-4 --eps 1e-3

Writes benchmarks/results/f1_objective.{json,md}.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from common import header, stamp, write_report
from layerzo.data.generation import Generator, batch_scores
from layerzo.data.objectives import Objective
from layerzo.data.tasks import load_task
from layerzo.model.layers import layer_parameter_names
from layerzo.model.loading import load_model
from layerzo.tune.batches import train_batches
from layerzo.zo.engine import TunedParams, ZOConfig, ZOState, zo_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--layer", type=int, default=11)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--monitor", type=int, default=32)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    loaded = load_model(None)
    model, layout, tok = loaded.model, loaded.layout, loaded.tokenizer
    splits = load_task("squad", args.data_dir, num_train=1000, num_dev=0, num_test=0, seed=0)
    generator = Generator(tok, stop=splits.stop, max_new_tokens=args.max_new_tokens)
    objective = Objective("f1", tok, max_length=512, generator=generator)
    # the monitor: the examples of the first training batches, so every monitored example is trained on
    stream = train_batches(len(splits.train), args.batch_size, 0)
    order = [i for _ in range(args.steps) for i in next(stream)]
    monitor = objective.encode([splits.train[i] for i in order[:args.monitor]])
    params = TunedParams.from_model(model, layer_parameter_names(model, layout, args.layer))
    config, state, seeds = ZOConfig(lr=args.lr, eps=args.eps), ZOState(), random.Random(0)

    def monitor_scores() -> dict:
        return batch_scores(generator.generate(model, monitor), monitor)

    curve = [{"step": 0, **monitor_scores()}]
    rows, t0 = [], time.perf_counter()
    for step in range(args.steps):
        batch = objective.encode([splits.train[i] for i in order[step * args.batch_size:(step + 1) * args.batch_size]])
        t = time.perf_counter()
        with objective.step_loss(model, layout, args.layer, batch) as loss:
            r = zo_step(params, loss, seeds.getrandbits(63), config, state, total_steps=args.steps)
        rows.append({"step": step + 1, "f1_plus": -r.losses_plus[0], "f1_minus": -r.losses_minus[0],
                     "grad": r.grads[0], "seconds": time.perf_counter() - t})
        if (step + 1) % args.every == 0:
            curve.append({"step": step + 1, **monitor_scores()})
            print(curve[-1], flush=True)
    moved = sum(1 for r in rows if r["grad"] != 0.0)
    out = stamp({"model": loaded.source.name, "layer": args.layer, "task": "squad", "objective": "f1",
                 "lr": args.lr, "eps": args.eps, "batch_size": args.batch_size, "steps": args.steps,
                 "max_new_tokens": args.max_new_tokens, "monitor_examples": args.monitor, "curve": curve,
                 "steps_with_nonzero_gradient": moved, "rows": rows,
                 "seconds_per_step": sum(r["seconds"] for r in rows) / len(rows),
                 "wall_seconds": time.perf_counter() - t0})
    lines = [header("The f1 objective on the demo model (SQuAD, layer %d)" % args.layer, out), "",
             f"{args.steps} ZO steps of batch {args.batch_size} on the non-differentiable F1 of greedy answers "
             f"(lr {args.lr}, eps {args.eps}, max {args.max_new_tokens} new tokens); F1/EM of the current "
             f"weights on the first {args.monitor} training examples (all trained on):", "",
             "| step | monitor F1 | monitor EM |", "|---|---|---|",
             *[f"| {c['step']} | {100 * c['f1']:.1f} | {100 * c['em']:.1f} |" for c in curve], "",
             f"{moved} of {args.steps} steps had a non-zero projected gradient (the ± generations differed in F1); "
             f"{out['seconds_per_step']:.1f} s per step."]
    write_report("f1_objective", out, "\n".join(lines))
    print("\n".join(lines[2:]))


if __name__ == "__main__":
    main()
