"""Benchmark: ZO step cost on a generative task — ``ce`` vs two plain forwards, and ``f1`` vs ``ce``.

One process, the variants interleaved ``--repeats`` times on ONE SQuAD training
batch (MeZO's batch size 16), median wall time of each:

* ``two_forwards`` the teacher-forced ce of the batch twice, no perturbation (the
                   floor a two-sided SPSA step cannot beat without skipping work);
* ``ce_step``      ``zo_step`` on the tuned layer with ``--objective ce``, as ``layerzo
                   tune`` runs it (layers below the tuned one run once per step);
* ``f1_step``      ``zo_step`` with ``--objective f1``: a + and a − greedy generation of
                   the batch (KV cache, stop at "\\n", at most ``--max-new-tokens``), the
                   lower layers' prompt prefill shared between the two;
* ``f1_step_unshared`` the same without the shared prefill (every generation runs all layers).

lr is 0, so every repeat sees the same weights (and the same generations).

    python benchmarks/bench_generative.py --layer 11 --batch-size 16 --repeats 3

Writes benchmarks/results/generative_step.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import header, interleaved, medians, stamp, write_report
from layerzo.data.generation import Generator
from layerzo.data.objectives import Objective
from layerzo.data.tasks import load_task
from layerzo.model.layers import layer_parameter_names
from layerzo.model.loading import load_model
from layerzo.zo.engine import TunedParams, ZOConfig, ZOState, zo_step

VARIANTS = ("two_forwards", "ce_step", "f1_step", "f1_step_unshared")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the SmolLM2-135M demo")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--layer", type=int, default=11)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    loaded = load_model(args.model)
    model, layout, tok = loaded.model, loaded.layout, loaded.tokenizer
    splits = load_task("squad", args.data_dir, num_train=args.batch_size, num_dev=0, num_test=0)
    generator = Generator(tok, stop=splits.stop, max_new_tokens=args.max_new_tokens)
    ce = Objective("ce", tok, max_length=args.max_length)
    f1 = Objective("f1", tok, max_length=args.max_length, generator=generator)
    ce_batch, f1_batch = ce.encode(splits.train), f1.encode(splits.train)
    params = TunedParams.from_model(model, layer_parameter_names(model, layout, args.layer))
    config, state = ZOConfig(lr=0.0, eps=1e-3), ZOState()

    def step(objective, batch, first):
        with objective.step_loss(model, layout, first, batch) as loss:
            return zo_step(params, loss, 1, config, state)

    answers = {}

    def f1_step():
        answers["f1"] = step(f1, f1_batch, args.layer)

    times = interleaved({
        "two_forwards": lambda: (ce.loss(model, ce_batch), ce.loss(model, ce_batch)),
        "ce_step": lambda: step(ce, ce_batch, args.layer),
        "f1_step": f1_step,
        "f1_step_unshared": lambda: step(f1, f1_batch, 0),
    }, repeats=args.repeats)
    med = medians(times)
    new_tokens = [len(ids) for ids in generator.generate_ids(model, f1_batch)]
    result = stamp({
        "model": loaded.source.name, "num_layers": layout.num_layers, "layer": args.layer, "task": "squad",
        "batch_size": args.batch_size, "ce_rows_x_tokens": list(ce_batch.input_ids.shape),
        "target_tokens": int(ce_batch.tok_id.shape[0]), "prompt_rows_x_tokens": list(f1_batch.input_ids.shape),
        "max_new_tokens": args.max_new_tokens, "generated_tokens_per_row": new_tokens,
        "repeats": args.repeats, "median_seconds": med, "all_seconds": times,
        "ratio_ce_step_vs_two_forwards": med["ce_step"] / med["two_forwards"],
        "ratio_f1_step_vs_ce_step": med["f1_step"] / med["ce_step"],
        "ratio_f1_unshared_vs_shared": med["f1_step_unshared"] / med["f1_step"],
        "expected_ce_ratio": (layout.num_layers + (layout.num_layers - args.layer)) / (2 * layout.num_layers),
        "f1_of_the_batch": -answers["f1"].losses_plus[0],
    })
    lines = [header("ZO step on SQuAD: ce vs two forwards, f1 vs ce", result), "",
             f"{result['model']} ({layout.num_layers} layers), tuned layer {args.layer}; SQuAD batch of "
             f"{args.batch_size}: ce rows x tokens {result['ce_rows_x_tokens']} ({result['target_tokens']} target "
             f"tokens), prompts {result['prompt_rows_x_tokens']}, greedy answers of {min(new_tokens)}-"
             f"{max(new_tokens)} tokens (max {args.max_new_tokens}); median of {args.repeats} interleaved rounds.",
             "", "| variant | median s | vs two forwards |", "|---|---|---|",
             *[f"| {v} | {med[v]:.2f} | {med[v] / med['two_forwards']:.2f}x |" for v in VARIANTS], "",
             f"- ce step / two forwards = **{result['ratio_ce_step_vs_two_forwards']:.2f}x** (bound with the "
             f"lower layers run once: (L + L - k) / 2L = {result['expected_ce_ratio']:.2f})",
             f"- f1 step / ce step = **{result['ratio_f1_step_vs_ce_step']:.2f}x**; the shared prefill saves "
             f"{result['ratio_f1_unshared_vs_shared']:.2f}x on the f1 step"]
    write_report("generative_step", result, "\n".join(lines))
    print("\n".join(lines[2:]))


if __name__ == "__main__":
    main()
