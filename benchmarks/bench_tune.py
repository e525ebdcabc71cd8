"""Benchmark: one ZO step vs two plain forward passes of the same batch (the MeZO floor).

One process, the variants interleaved ``--repeats`` times on the same batch,
median wall time of each (machine-load drift hits every variant alike):

* ``two_forwards``  ``batch_loss`` twice, no perturbation (the floor a two-sided SPSA step cannot beat
                    without skipping work);
* ``step_plain``    ``zo_step`` on the dominant layer, every forward runs the whole model;
* ``step_cached``   ``zo_step`` with the layers below the tuned one run once per step
                    (``cached_lower_layers``), as ``layerzo tune`` does;
* ``one_forward``   ``batch_loss`` once (for reference).

The ratio ``step_cached / two_forwards`` is the number to read: < 1 means
the step costs less than two plain forwards.

    python benchmarks/bench_tune.py                      # demo model, SST-2, batch 16, 3 repeats
    python benchmarks/bench_tune.py --batch-size 8 --repeats 5 --layer 11

Writes benchmarks/results/tune_step.json and tune_step.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from layerzo.model.layers import layer_parameter_names
from layerzo.model.prefix_cache import cached_lower_layers
from layerzo.model.loading import load_model
from layerzo.data.scoring import batch_loss, encode_batch
from layerzo.data.tasks import load_task
from layerzo.zo.engine import TunedParams, ZOConfig, ZOState, zo_step

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("two_forwards", "step_plain", "step_cached", "one_forward")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the SmolLM2-135M demo")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--layer", type=int, default=None, help="default: the profile's dominant layer")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    loaded = load_model(args.model)
    model, layout = loaded.model, loaded.layout
    layer = args.layer
    if layer is None:
        from layerzo.profile.run import profile_model
        from layerzo.data.tasks import calibration_texts

        layer = profile_model(model, loaded.tokenizer, calibration_texts(args.task, args.data_dir), layout=layout).pick.layer
    examples = load_task(args.task, args.data_dir, num_train=args.batch_size, num_dev=0, num_test=0).train
    batch = encode_batch(loaded.tokenizer, examples)
    params = TunedParams.from_model(model, layer_parameter_names(model, layout, layer))
    config, state = ZOConfig(lr=0.0, eps=1e-3), ZOState()  # lr 0: every repeat sees the same weights

    def loss() -> float:
        return batch_loss(model, batch)

    def step_cached() -> None:
        with cached_lower_layers(model, layout, layer):
            zo_step(params, loss, 1, config, state)

    runners = {
        "two_forwards": lambda: (loss(), loss()),
        "step_plain": lambda: zo_step(params, loss, 1, config, state),
        "step_cached": step_cached,
        "one_forward": loss,
    }
    loss()  # warm-up
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for v in VARIANTS:
            t0 = time.perf_counter()
            runners[v]()
            times[v].append(time.perf_counter() - t0)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    result = {
        "command": "python " + " ".join(sys.argv),
        "model": loaded.source.name, "num_layers": layout.num_layers, "layer": layer, "task": args.task,
        "batch_size": args.batch_size, "rows": batch.num_rows, "tokens_per_row": int(batch.input_ids.shape[1]),
        "repeats": args.repeats, "median_seconds": med, "all_seconds": times,
        "ratio_step_cached_vs_two_forwards": med["step_cached"] / med["two_forwards"],
        "ratio_step_plain_vs_two_forwards": med["step_plain"] / med["two_forwards"],
        "expected_cached_ratio": (layout.num_layers + (layout.num_layers - layer)) / (2 * layout.num_layers),
        "steps_per_second_cached": 1.0 / med["step_cached"],
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    import transformers

    result["machine"]["transformers"] = transformers.__version__
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tune_step.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# ZO step vs two plain forward passes", "",
        f"`{result['command']}`", "",
        f"Model {result['model']} ({layout.num_layers} layers), tuned layer {layer}, {args.task} batch of "
        f"{args.batch_size} examples ({batch.num_rows} rows x {result['tokens_per_row']} tokens), "
        f"median of {args.repeats} interleaved repeats.", "",
        "| variant | median s | vs two forwards |", "|---|---|---|",
        *[f"| {v} | {med[v]:.3f} | {med[v] / med['two_forwards']:.3f} |" for v in VARIANTS], "",
        f"Expected with lower-layer caching: (L + (L - k)) / 2L = {result['expected_cached_ratio']:.3f}.", "",
        f"Machine: {result['machine']}",
    ]
    (RESULTS / "tune_step.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({k: result[k] for k in ("median_seconds", "ratio_step_cached_vs_two_forwards",
                                             "ratio_step_plain_vs_two_forwards", "steps_per_second_cached")}, indent=2))


if __name__ == "__main__":
    main()
