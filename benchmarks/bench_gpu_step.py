"""Benchmark: ZO step time on a Llama-2-7B-shaped model built from its config (random weights, no download).

Weights do not matter for step time, so the model is built from the config on
the device (``--shape llama2-7b``: hidden 4096, 32 layers, 32 heads, MLP 11008,
vocab 32000), frozen weights in bf16, each tuned layer as an fp32 master copy
(as ``layerzo tune --dtype bfloat16`` runs it). One batch of ``--batch-size`` ×
``--tokens`` random token rows, the teacher-forced ce of one target token per
row. Variants, interleaved ``--rounds`` times after a warm-up, medians:

* ``two_forwards``  two plain forwards (the floor of a two-point ZO step);
* ``layer2``, ``layer16``  the dominant-layer step on layer 2 / layer 16 as tune
  runs it after the first epoch: layers below read the per-example cache;
* ``layer16_paired`` the same with + and − as one forward of 2×16 rows (``tune --paired-forward``:
  the frozen layers above run once; on CPU it measured 1.00× the two forwards, so it is off there);
* ``lora``          LoRA-ZO r=8 on q/v of every layer (MeZO's LoRA baseline);
* ``full``          full-model MeZO (every decoder-layer tensor, z regenerated per use: MeZO's seed trick).

    bash benchmarks/gpu_step.sh                                     # on a GPU machine
    python benchmarks/bench_gpu_step.py --shape tiny --device cpu   # the CPU smoke test CI runs

Writes <results-dir>/gpu_step.{json,md} (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import RESULTS, header, interleaved, medians, stamp, write_report  # noqa: E402

SHAPES = {  # LlamaConfig keyword arguments
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=18, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512, max_position_embeddings=512),
}
VARIANTS = ("two_forwards", "layer2", "layer16", "layer16_paired", "lora", "full")


def random_batch(vocab: int, rows: int, tokens: int, seed: int = 0):
    """A left-padded-free ScoringBatch of random rows, one target token per row (the last position)."""
    from layerzo.data.scoring import ScoringBatch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, tokens), generator=gen)
    arange = torch.arange(rows)
    return ScoringBatch(input_ids=ids, attention_mask=torch.ones_like(ids),
                        position_ids=torch.arange(tokens).expand(rows, tokens).clone(), keep=1,
                        tok_row=arange, tok_pos=torch.zeros(rows, dtype=torch.long),
                        tok_id=torch.randint(0, vocab, (rows,), generator=gen), tok_pair=arange,
                        pair_example=arange, pair_candidate=torch.zeros(rows, dtype=torch.long),
                        labels=torch.zeros(rows, dtype=torch.long), num_candidates=1)


def build(args):
    """The model on the device, the batch, and one step function (with untimed set-up) per variant."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from layerzo.data.objectives import Objective
    from layerzo.model.layers import find_layer_layout, get_layer, layer_parameter_names
    from layerzo.model.lora import add_lora, model_parameter_name, remove_lora
    from layerzo.model.precision import fp32_master_layers
    from layerzo.model.prefix_cache import ExampleCache
    from layerzo.zo.engine import TunedParams, ZOConfig, ZOState, z_cache_budget, zo_step

    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[args.shape], tie_word_embeddings=False)).to(dtype).eval()
    model.requires_grad_(False)
    layout = find_layer_layout(model)
    batch = random_batch(model.config.vocab_size, args.batch_size, args.tokens)
    objective = Objective("ce", tokenizer=None, max_length=args.tokens)
    loss = lambda: objective.loss(model, batch)  # noqa: E731
    budget, seeds, config = z_cache_budget(model), iter(range(10**9)), ZOConfig(lr=0.0, eps=1e-3)
    n = layout.num_layers
    state: dict = {}

    def layer_step(layer: int):
        def setup():
            masters = fp32_master_layers([get_layer(model, layout, layer)], dtype)
            masters.__enter__()
            state["params"] = TunedParams.from_model(model, layer_parameter_names(model, layout, layer))
            cache = ExampleCache(max_bytes=2**40)  # after the first epoch: every row is in the cache
            cache.fill(model, layout, layer, [batch], lambda b: objective.loss(model, b))
            state["cache"] = cache
            return lambda: (masters.__exit__(None, None, None), get_layer(model, layout, layer).to(dtype))
        run = lambda: step(layer)  # noqa: E731
        return setup, run

    def step(first: int, paired: bool = False):
        with objective.step_loss(model, layout, first, batch, examples=state.get("cache"), paired=paired) as fn:
            zo_step(state["params"], fn, next(seeds), config, ZOState(), z_cache_max_bytes=budget, pair_loss=fn.pair)

    def lora_setup():
        names = add_lora(model, layout, range(n), r=8, alpha=16, seed=0)
        state["params"] = TunedParams.from_model(model, [model_parameter_name(x) for x in names])
        state.pop("cache", None)
        return lambda: remove_lora(model)

    def full_setup():
        state["params"] = TunedParams.from_model(model, [p for i in range(n) for p in layer_parameter_names(model, layout, i)])
        state.pop("cache", None)
        return lambda: None

    setups, runs = {}, {}
    for name, layer in (("layer2", min(2, n - 1)), ("layer16", min(16, n - 1))):
        setups[name], runs[name] = layer_step(layer)
    setups["layer16_paired"] = layer_step(min(16, n - 1))[0]
    runs["layer16_paired"] = lambda: step(min(16, n - 1), paired=True)
    setups.update(lora=lora_setup, full=full_setup)
    runs.update(two_forwards=lambda: (loss(), loss()), lora=lambda: step(0), full=lambda: step(0))
    return model, {k: runs[k] for k in VARIANTS}, setups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.manual_seed(0)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model, runs, setups = build(args)
    with torch.no_grad():
        times = interleaved({k: (lambda f=f: (f(), sync())) for k, f in runs.items()}, repeats=args.rounds,
                            warmup=1, setup=setups)
    med = medians(times)
    result = stamp({"shape": args.shape, "config": model.config.to_dict() if args.shape == "tiny" else SHAPES[args.shape],
                    "device": args.device, "dtype": args.dtype, "batch": [args.batch_size, args.tokens],
                    "rounds": args.rounds, "median_s": med, "all_s": times,
                    "vs_two_forwards": {k: v / med["two_forwards"] for k, v in med.items()},
                    "full_over": {k: med["full"] / med[k] for k in ("layer2", "layer16", "layer16_paired", "lora")},
                    "paired_over_two": med["layer16_paired"] / med["layer16"],
                    "peak_cuda_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None})
    rows = "\n".join(f"| {k} | {med[k]:.4f} | {result['vs_two_forwards'][k]:.2f}x |" for k in VARIANTS)
    text = (header(f"ZO step on a {args.shape}-shaped model ({args.device}, {args.dtype} frozen, fp32 master layer)",
                   result)
            + f"\nBatch {args.batch_size} x {args.tokens} random tokens; median of {args.rounds} interleaved rounds.\n\n"
            "| variant | median s | vs two forwards |\n|---|---|---|\n" + rows + "\n\n"
            + "; ".join(f"full / {k} = **{v:.2f}x**" for k, v in result["full_over"].items())
            + (f"; peak CUDA {result['peak_cuda_gb']:.1f} GiB" if cuda else "")
            + f"\n\nOne forward for + and - / two forwards (layer 16): **{result['paired_over_two']:.2f}x** "
            "(below 1: make --paired-forward the default for this device in layerzo.tune.loop.PAIRED_FORWARD_DEFAULT)\n")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_report("gpu_step", result, text, results_dir=args.results_dir)
    print(text)


if __name__ == "__main__":
    main()
