"""Benchmark: ``profile_model`` vs a bare forward over the same tokens.

Time: one process, the variants interleaved ``--repeats`` times, median
wall time of each (so machine-load drift hits every variant alike):

* ``bare``    ``model(input_ids, attention_mask, use_cache=False)`` - the whole model, LM head included;
* ``trunk``   the same forward stopped after the last decoder layer (what profile runs, minus statistics);
* ``profile`` ``layerzo.profile.run.profile_model`` end to end (tokenize, hooked forward, stats, fingerprint).

Peak memory: torch's CPU allocations are invisible to tracemalloc, so each
variant runs once in its OWN subprocess that loads the model, trims the heap
(``malloc_trim``), records the RSS, then runs the variant while a thread
samples RSS every 1 ms (psutil); the reported figure is peak RSS minus the
baseline. Sampling can miss a spike shorter than 1 ms, but the big buffers
here (attention scores, logits) live for a whole layer or head. ``ru_maxrss``
deltas are reported too; they read 0 when loading already set a higher mark.

    python benchmarks/bench_profile.py --quick         # 4 x 128 tokens, 3 repeats (CPU)
    python benchmarks/bench_profile.py                 # 8 x 512 tokens, 5 repeats

Writes benchmarks/results/profile.json and profile.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (header, interleaved, medians, peak_rss_bytes, rss_sampler, save_plain_copy,  # noqa: E402
                    stamp, trim_heap, write_report)

from layerzo.model.loading import load_model
from layerzo.data.calibration import DEFAULT_CALIBRATION_TEXTS
from layerzo.profile.rule import ProfileConfig
from layerzo.profile.run import _encode, _pad, _StopForward, profile_model
from layerzo.model.layers import get_layers

VARIANTS = ("bare", "trunk", "profile")


def long_texts(n: int) -> list[str]:
    """n distinct texts, each long enough to fill max_length tokens (the built-in sentences, rotated)."""
    base = list(DEFAULT_CALIBRATION_TEXTS)
    return [" ".join((base[i:] + base[:i]) * 12) for i in range(n)]


def make_runner(loaded, texts: list[str], config: ProfileConfig, variant: str):
    model, tok = loaded.model, loaded.tokenizer
    ids, mask = _pad(_encode(tok, texts, config.max_length), tok.pad_token_id or 0, "cpu")
    if variant == "bare":
        return lambda: model(input_ids=ids, attention_mask=mask, use_cache=False)
    if variant == "trunk":
        last = get_layers(model, loaded.layout)[-1]

        def stop(*_):
            raise _StopForward

        def run():
            handle = last.register_forward_hook(stop)
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _StopForward:
                pass
            finally:
                handle.remove()

        return run
    return lambda: profile_model(model, tok, texts, config, loaded.layout)


def child(args) -> None:
    loaded = load_model(args.model_dir)
    config = ProfileConfig(num_sequences=args.num_sequences, max_length=args.max_length,
                           batch_size=args.num_sequences)
    run = make_runner(loaded, long_texts(args.num_sequences), config, args.child)
    trim_heap()  # hand freed load-time memory back so the baseline is honest
    hwm_before = peak_rss_bytes()
    with torch.no_grad(), rss_sampler() as rss:
        run()
    print(json.dumps({"variant": args.child, "baseline_rss_mb": rss["base"] / 2**20,
                      "peak_rss_delta_mb": (rss["peak"] - rss["base"]) / 2**20,
                      "hwm_delta_mb": (peak_rss_bytes() - hwm_before) / 2**20}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint dir / .gguf / Hub id (default: the demo)")
    p.add_argument("--quick", action="store_true", help="4 sequences x 128 tokens, 3 repeats")
    p.add_argument("--num-sequences", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.num_sequences = args.num_sequences or (4 if args.quick else 8)
    args.max_length = args.max_length or (128 if args.quick else 512)
    args.repeats = args.repeats or (3 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)

    loaded = load_model(args.model)
    config = ProfileConfig(num_sequences=args.num_sequences, max_length=args.max_length,
                           batch_size=args.num_sequences)
    texts = long_texts(args.num_sequences)
    runners = {v: make_runner(loaded, texts, config, v) for v in VARIANTS}
    with torch.no_grad():
        times = interleaved(runners, repeats=args.repeats, warmup=1)
    report = profile_model(loaded.model, loaded.tokenizer, texts, config, loaded.layout)
    from layerzo.profile.run import model_fingerprint

    t0 = time.perf_counter()
    model_fingerprint(loaded.model, loaded.layout)
    fingerprint_s = time.perf_counter() - t0

    print(json.dumps({"median_s": medians(times)}), file=sys.stderr)
    memory = {}
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        model_dir = save_plain_copy(loaded, Path(tmp))
        for v in VARIANTS:
            cmd = [sys.executable, __file__, "--child", v, "--model-dir", model_dir,
                   "--num-sequences", str(args.num_sequences), "--max-length", str(args.max_length)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            memory[v] = json.loads(out.strip().splitlines()[-1])

    med = medians(times)
    result = stamp({
        "model": loaded.source.name,
        "num_layers": loaded.num_layers,
        "num_sequences": args.num_sequences,
        "tokens": report.num_tokens,
        "repeats": args.repeats,
        "median_s": med,
        "all_s": times,
        "ratio_profile_vs_bare": med["profile"] / med["bare"],
        "ratio_profile_vs_trunk": med["profile"] / med["trunk"],
        "fingerprint_s": fingerprint_s,
        "target_ratio": 1.2,
        "memory": memory,
        "pick": report.to_dict()["pick"],
    })
    write_report("profile", result, _markdown(result))
    print(_markdown(result))


def _markdown(r: dict) -> str:
    rows = "\n".join(
        f"| {v} | {r['median_s'][v]:.3f} | {r['median_s'][v] / r['median_s']['bare']:.2f}x | "
        f"{r['memory'][v]['peak_rss_delta_mb']:.1f} | {r['memory'][v]['hwm_delta_mb']:.1f} |"
        for v in VARIANTS
    )
    return (
        header("profile benchmark: profile_model vs a bare forward", r)
        + f"\n{r['model']} ({r['num_layers']} layers), {r['num_sequences']} sequences, {r['tokens']} tokens, "
        f"median of {r['repeats']} interleaved repeats after one warm-up.\n\n"
        "| variant | median s | vs bare | peak RSS delta MB (1 ms sampling) | VmHWM delta MB |\n"
        "|---|---|---|---|---|\n"
        f"{rows}\n\n"
        f"profile / bare = **{r['ratio_profile_vs_bare']:.2f}x** (target <= {r['target_ratio']}x); "
        f"profile / trunk (hook + stats overhead) = {r['ratio_profile_vs_trunk']:.2f}x; "
        f"of which the model fingerprint takes {r['fingerprint_s']:.3f} s.\n\n"
        "bare = full forward incl. LM head; trunk = forward stopped after the last decoder layer; "
        "profile = profile_model end to end. Memory: one subprocess per variant, RSS above the post-load, "
        "malloc_trim'd baseline.\n"
    )


if __name__ == "__main__":
    main()
