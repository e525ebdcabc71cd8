"""Benchmark: ``--layers auto`` on the demo model — which layer it picks and what it costs.

Runs the selection exactly as ``layerzo tune --layers auto`` does (activation
profile, the cheap sensitivity screen, the successive-halving race of the
candidates on the run's own training batches) with the demo recipe's settings,
then, in the same process, measures what the 300-step run it precedes costs:
``--time-steps`` dominant-layer steps as tune runs them (per-example cache) and one
dev and one test evaluation; the run's time is estimated as its steps + a dev
evaluation every eval_every steps and the zero-shot one + the zero-shot and the final test.

    python benchmarks/bench_auto.py --recipe recipes/smollm2-135m.yaml
    python benchmarks/bench_auto.py --task squad --set steps=50 --set lr=1e-3 --set max_length=512 ...

Writes benchmarks/results/auto_<task>_smollm2.{json,md}.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import header, stamp, write_report  # noqa: E402


def race_seconds(notes: list[str]) -> float | None:
    """The race's wall seconds, from tune's note (the manifest keeps no wall time: patches stay byte-identical)."""
    import re

    found = [re.search(r"\((\d+(?:\.\d+)?) s\)$", n) for n in notes if "won a race" in n]
    return float(found[-1].group(1)) if found and found[-1] else None


def main() -> None:
    import yaml

    from layerzo.data.generation import Generator
    from layerzo.data.objectives import Objective, resolve_objective
    from layerzo.data.tasks import load_task
    from layerzo.model.layers import layer_parameter_names
    from layerzo.model.loading import load_model
    from layerzo.tune.batches import train_batches
    from layerzo.tune.config import build_config, load_recipe
    from layerzo.tune.loop import eval_set, resolve_layers
    from layerzo.tune.race import SCREEN_DIRECTIONS, SCREEN_EXAMPLES, RaceConfig
    from layerzo.zo.engine import TunedParams, ZOState, zo_step

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/smollm2-135m.yaml")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--task", help="the task (default: the recipe's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe key for this run (YAML value), e.g. steps=50; repeat")
    ap.add_argument("--time-steps", type=int, default=10)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    config = build_config(load_recipe(Path(args.recipe)),
                          {**overrides, "task": args.task, "data_dir": args.data_dir, "layers": "auto"})
    loaded = load_model(config.model)
    splits = load_task(config.task, config.data_dir, num_train=config.num_train, num_dev=config.num_dev,
                       num_test=config.num_test, seed=config.seed)
    generator = Generator(loaded.tokenizer, stop=splits.stop, max_new_tokens=config.max_new_tokens) \
        if splits.generative else None  # as tune builds them
    objective = Objective(resolve_objective(config.objective, generative=splits.generative, task=splits.name),
                          loaded.tokenizer, max_length=config.max_length, generator=generator)
    notes: list[str] = []
    t0 = time.perf_counter()
    (winner,), report = resolve_layers(config, loaded, splits, objective, notes.append)
    auto_seconds = time.perf_counter() - t0
    # the run it precedes, measured in the same process
    layout, model = loaded.layout, loaded.model
    params = TunedParams.from_model(model, layer_parameter_names(model, layout, winner))
    cache = objective.example_cache(model, layout, winner, splits.train, batch_size=config.eval_batch_size,
                                    max_bytes=2**34)
    stream, seeds, state = train_batches(len(splits.train), config.batch_size, config.seed), random.Random(0), ZOState()
    base = params.state()
    t = time.perf_counter()
    for _ in range(args.time_steps):
        batch = objective.encode([splits.train[i] for i in next(stream)])
        with objective.step_loss(model, layout, winner, batch, examples=cache) as loss:
            zo_step(params, loss, seeds.getrandbits(63), config.zo, state)
    step_s = (time.perf_counter() - t) / args.time_steps
    params.load(base)
    evals = {}
    for name, examples, share in (("dev", splits.dev, 0.5), ("test", splits.test, 0.25)):
        s = eval_set(config, loaded.tokenizer, examples, generator, share)
        t = time.perf_counter()
        s.evaluate(model, layout, winner)
        evals[name] = time.perf_counter() - t
    run_s = config.steps * step_s + (config.steps // config.eval_every + 1) * evals["dev"] + 2 * evals["test"]
    race = report["race"]
    result = stamp({"recipe": args.recipe, "config": config.recipe(), "winner": winner, "reason": report["reason"],
                    "race": race, "sensitivity_ranking": report["sensitivity_ranking"],
                    "outlier_pick": report["outlier_profile"]["pick"]["layer"], "auto_seconds": auto_seconds,
                    "race_seconds": race_seconds(notes), "step_seconds": step_s, "eval_seconds": evals,
                    "estimated_run_seconds": run_s, "auto_over_run": auto_seconds / run_s, "notes": notes})
    rounds = "\n".join(
        f"| {i + 1} | {r['steps']} | " + ", ".join(f"{k}: {v:.4f}" for k, v in r["dev_loss"].items())
        + f" | {', '.join(map(str, r['kept']))} |" for i, r in enumerate(race["rounds"]))
    text = (header(f"--layers auto on the demo model ({config.task})", result)
            + f"\nCandidates: " + "; ".join(f"layer {c['layer']} ({', '.join(c['sources'])})" for c in race["candidates"])
            + f". Zero-shot dev loss (the first {len(splits.dev[:RaceConfig().dev_examples])} dev examples) "
              f"{race['zero_shot_dev_loss']:.4f}. Sensitivity screen: K = {SCREEN_DIRECTIONS} one-sided directions on "
              f"{SCREEN_EXAMPLES} training examples.\n\n"
            "| round | steps each | dev loss after the round | kept |\n|---|---|---|---|\n" + rounds + "\n\n"
            f"**Tuned: layer {winner}.** {report['reason']}.\n\n"
            f"Cost: the whole selection (profile + sensitivity screen + race) {auto_seconds:.0f} s, the race "
            f"{result['race_seconds']:.0f} s. The {config.steps}-step run it precedes: {step_s:.2f} s/step (measured here, "
            f"{args.time_steps} steps), dev evaluation {evals['dev']:.0f} s, test {evals['test']:.0f} s → about "
            f"{run_s:.0f} s; auto / run = **{100 * auto_seconds / run_s:.1f} %** (target ≤ 10 %).\n")
    write_report(f"auto_{config.task}_smollm2", result, text)
    print(text)


if __name__ == "__main__":
    main()
