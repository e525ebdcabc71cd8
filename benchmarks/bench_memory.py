"""Benchmark: peak memory of one ZO tune step vs plain inference on the same batch (MeZO's promise).

Each variant runs in its OWN subprocess (torch's CPU allocations are invisible
to tracemalloc, and a process's peak RSS never goes down): load the model (a
plain safetensors copy saved once by the parent), set the variant up, trim the
heap, record the baseline RSS, then run ONE call while a thread samples RSS
every 1 ms (psutil). Reported: peak RSS (total, what the machine must hold)
and peak minus baseline (the step's working memory; the baseline is taken
after one warm-up forward, because the safetensors weights are mmapped and
only become resident when first read). On CUDA the peak
allocated GPU memory is reported as well.

* ``inference``  one scoring forward of the batch (``batch_loss``);
* ``dominant``   a ``zo_step`` on the profiled layer inside ``cached_lower_layers`` (as tune runs it);
* ``full``       a ``zo_step`` on every decoder-layer tensor (MeZO);
* ``lora``       a ``zo_step`` on LoRA r=8 q/v adapters of every layer;
* ``tune_run``   a whole ``layerzo.tune.loop.tune`` run of the dominant layer (``--tune-steps``, default one
                 epoch of the 1000 training examples, so the per-example cache of the lower layers' output
                 holds every training row; a dev evaluation at the end): the call sampled is the run.

Targets: a tune step's peak <= 1.2x the inference peak (total RSS); a whole tune run's peak
<= 1.2x the inference peak + the bytes its per-example cache reports.

    python benchmarks/bench_memory.py --quick
    python benchmarks/bench_memory.py --device cuda

Writes benchmarks/results/memory.json and memory.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, rss_sampler, stamp, trim_heap, write_report  # noqa: E402

VARIANTS = ("inference", "dominant", "full", "full_zkept", "lora", "tune_run")
TARGET = 1.2


def child(args) -> None:
    import torch

    from layerzo.model.layers import layer_parameter_names
    from layerzo.model.lora import add_lora, model_parameter_name
    from layerzo.model.prefix_cache import cached_lower_layers
    from layerzo.model.loading import load_model
    from layerzo.data.scoring import batch_loss, encode_batch
    from layerzo.data.tasks import load_task
    from layerzo.zo.engine import TunedParams, ZOConfig, ZOState, z_cache_budget, zo_step

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model_dir, device=args.device)
    model, layout, n = loaded.model, loaded.layout, loaded.layout.num_layers
    splits = load_task(args.task, args.data_dir, num_train=max(64, args.batch_size), num_dev=0, num_test=0, seed=0)
    batch = encode_batch(loaded.tokenizer, splits.train[: args.batch_size], max_length=args.max_length)
    loss = lambda: batch_loss(model, batch)  # noqa: E731
    v, layer = args.child, args.layer
    budget = z_cache_budget(model)  # what tune() passes to the engine
    if v == "inference":
        run = loss
    elif v == "dominant":
        params = TunedParams.from_model(model, layer_parameter_names(model, layout, layer))

        def run():
            with cached_lower_layers(model, layout, layer):
                zo_step(params, loss, 1, ZOConfig(lr=1e-3), ZOState(), z_cache_max_bytes=budget)
    elif v in ("full", "full_zkept"):  # tune --layers all (seed trick) / z kept for the step (4 bytes per weight)
        params = TunedParams.from_model(model, [nm for i in range(n) for nm in layer_parameter_names(model, layout, i)])
        keep = budget if v == "full" else 4 * sum(t.numel() for t in params.tensors)
        run = lambda: zo_step(params, loss, 1, ZOConfig(lr=1e-3 / n), ZOState(), z_cache_max_bytes=keep)  # noqa: E731
    elif v == "lora":
        names = add_lora(model, layout, range(n), r=8, alpha=16, seed=0)  # patch key names: peft's carry the adapter
        params = TunedParams.from_model(model, [model_parameter_name(x) for x in names])
        run = lambda: zo_step(params, loss, 1, ZOConfig(lr=1e-3), ZOState(), z_cache_max_bytes=budget)  # noqa: E731
    else:  # a whole tune run of the dominant layer, per-example cache included
        import tempfile

        from layerzo.tune.config import TuneConfig
        from layerzo.tune.loop import tune

        config = TuneConfig(task=args.task, data_dir=args.data_dir, layers=str(layer), steps=args.tune_steps,
                            batch_size=args.batch_size, num_dev=64, num_test=0, eval_every=args.tune_steps,
                            eval_batch_size=args.batch_size, max_length=args.max_length, checkpoint_every=0,
                            device=args.device)
        work, metrics = tempfile.mkdtemp(prefix="bench-memory-tune-"), {}
        run = lambda: metrics.update(tune(config, Path(work) / "patch", loaded=loaded, progress=False).metrics)  # noqa: E731
    cuda = args.device.startswith("cuda")
    with torch.no_grad():
        loss()  # touch every weight first: safetensors are mmapped, so the baseline must include them
    trim_heap()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    with torch.no_grad(), rss_sampler() as rss:
        run()
        if cuda:
            torch.cuda.synchronize()
    out = {"variant": v, "baseline_rss_mb": rss["base"] / 2**20, "peak_rss_mb": rss["peak"] / 2**20,
           "delta_rss_mb": (rss["peak"] - rss["base"]) / 2**20}
    if v == "tune_run":
        out.update(cache_mb=metrics["prefix_cache"]["bytes"] / 2**20, cache_rows=metrics["prefix_cache"]["rows"],
                   steps=metrics["steps"], hit_rate=metrics["prefix_cache"]["hit_rate"])
    if cuda:
        out.update(cuda_base_mb=cuda_base / 2**20, cuda_peak_mb=torch.cuda.max_memory_allocated() / 2**20)
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint dir / .gguf / Hub id (default: the demo)")
    p.add_argument("--task", "--tasks", dest="task", default="sst2")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--layer", type=int, default=None, help="dominant layer (default: what profile picks)")
    p.add_argument("--quick", action="store_true", help="1 torch thread (shared 2-core CPU)")
    p.add_argument("--steps", type=int, default=1, help="(accepted for a uniform CLI; one step is measured)")
    p.add_argument("--tune-steps", type=int, default=63, help="steps of the tune_run variant (63 x 16 = one epoch)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.threads = args.threads or (1 if args.quick else None)
    if args.child:
        return child(args)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from common import save_plain_copy
    from layerzo.model.loading import load_model
    from layerzo.tune.loop import resolve_layers
    from layerzo.tune.config import TuneConfig

    loaded = load_model(args.model)
    if args.layer is None:
        (args.layer,), _ = resolve_layers(TuneConfig(task=args.task, data_dir=args.data_dir, layers="dominant"), loaded)
    memory = {}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        model_dir = save_plain_copy(loaded, Path(tmp))
        name, num_layers = loaded.source.name, loaded.num_layers
        weights_mb = sum(t.numel() * t.element_size() for t in loaded.model.parameters()) / 2**20
        del loaded
        for v in VARIANTS:
            cmd = [sys.executable, __file__, "--child", v, "--model-dir", model_dir, "--task", args.task,
                   "--data-dir", args.data_dir, "--batch-size", str(args.batch_size), "--max-length",
                   str(args.max_length), "--layer", str(args.layer), "--device", args.device,
                   "--tune-steps", str(args.tune_steps)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            res = subprocess.run(cmd, check=True, capture_output=True, text=True)
            memory[v] = json.loads(res.stdout.strip().splitlines()[-1])
            print(json.dumps(memory[v]), file=sys.stderr)
    inf = memory["inference"]
    ratios = {v: memory[v]["peak_rss_mb"] / inf["peak_rss_mb"] for v in VARIANTS}
    if "cuda_peak_mb" in inf:
        ratios_cuda = {v: memory[v]["cuda_peak_mb"] / inf["cuda_peak_mb"] for v in VARIANTS}
    else:
        ratios_cuda = None
    run = memory["tune_run"]
    run_ratio = run["peak_rss_mb"] / (inf["peak_rss_mb"] + run["cache_mb"])
    result = stamp({"model": name, "num_layers": num_layers, "layer": args.layer, "batch_size": args.batch_size,
                    "tune_run_peak_vs_inference_plus_cache": run_ratio,
                    "device": args.device, "weights_mb": weights_mb, "memory": memory,
                    "peak_ratio_vs_inference": ratios, "cuda_peak_ratio_vs_inference": ratios_cuda, "target": TARGET})
    write_report("memory", result, markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    m, ratios = r["memory"], r["peak_ratio_vs_inference"]
    cuda = r.get("cuda_peak_ratio_vs_inference")
    rows = []
    for v in VARIANTS:
        extra = f" | {m[v]['cuda_peak_mb']:.0f} | {cuda[v]:.2f}x" if cuda else ""
        rows.append(f"| {v} | {m[v]['baseline_rss_mb']:.0f} | {m[v]['peak_rss_mb']:.0f} | {m[v]['delta_rss_mb']:.0f} | "
                    f"**{ratios[v]:.2f}x**{extra} |")
    cuda_head = " cuda peak MB | cuda vs inference |" if cuda else ""
    worst = max(ratios[v] for v in VARIANTS if v not in ("inference", "full_zkept", "tune_run"))  # tune's steps
    run, run_ratio = m["tune_run"], r["tune_run_peak_vs_inference_plus_cache"]
    return (
        header("Peak memory: one ZO tune step vs plain inference", r)
        + f"\n{r['model']} ({r['num_layers']} layers, {r['weights_mb']:.0f} MB of fp32 weights), dominant layer "
        f"{r['layer']}, batch {r['batch_size']}, device {r['device']}. One subprocess per variant; RSS sampled every "
        "1 ms during one call, baseline = RSS after loading, setup and one warm-up forward (so every mmapped weight "
        "is resident), heap trimmed.\n\n"
        f"| variant | baseline RSS MB | peak RSS MB | peak - baseline MB | peak vs inference |{cuda_head}\n"
        f"|---|---|---|---|---|{'---|---|' if cuda else ''}\n" + "\n".join(rows) + "\n\n"
        f"Largest tune/inference peak ratio: **{worst:.2f}x** (target <= {TARGET}x: "
        f"{'met' if worst <= TARGET else 'MISSED'}; dominant, full and lora as `tune` runs them). `full_zkept` "
        f"keeps the full model's z for the step instead of MeZO's seed trick ({ratios['full_zkept']:.2f}x: the "
        "memory that trick saves). The LoRA baseline's setup (adapters) is part of its baseline.\n\n"
        f"Whole tune run (`tune_run`: {run['steps']} steps of layer {r['layer']}, per-example cache of "
        f"{run['cache_rows']} rows = {run['cache_mb']:.1f} MB, hit rate {100 * (run['hit_rate'] or 0):.0f}%): peak "
        f"{run['peak_rss_mb']:.0f} MB = **{run_ratio:.2f}x** (inference peak + cache bytes) (target <= {TARGET}x: "
        f"{'met' if run_ratio <= TARGET else 'MISSED'}).\n"
    )


if __name__ == "__main__":
    main()
