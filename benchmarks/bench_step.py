"""Benchmark: one ZO step on the demo model - dominant layer vs full-model MeZO vs LoRA-ZO vs the 2-forward floor.

Same batch (SST-2 training examples, batch 16), same process, variants
INTERLEAVED (ABCDE ABCDE ...) ``--steps`` rounds after one warm-up round; the
median of each is reported, with ratios:

* ``floor``     two plain forwards of the batch with the same scoring (``batch_loss``: left padding,
                ``logits_to_keep``) - what any two-point ZO step must pay at least;
* ``dominant``  ``zo_step`` on the profiled layer's tensors as ``layerzo.tune.loop.tune`` runs it after
                the first epoch: the layers below read every row from the per-example cache
                (``ExampleCache``, filled once per run), functional perturbation;
* ``dominant_paired``  the same with + and - as ONE forward of the batch twice (2B rows: layer 11
                run once under +eps, once under -eps, the frozen layers above once on all rows;
                ``tune --paired-forward``);
* ``dominant_batchcache``  the same with the lower layers run once per step (the per-batch cache, what
                tune did before the per-example cache, and still does for rows it has not cached);
* ``dominant_nocache``  the same without any lower-layer cache;
* ``full``      ``zo_step`` on every decoder-layer tensor as ``tune --layers all`` runs it: MeZO's seed
                trick (z regenerated for +eps, -eps and the update, never stored; no lower-layer cache possible);
* ``full_zkept`` the same with z drawn once and kept for the step (+4 bytes per weight: ~1.4x inference
                memory on the demo, see bench_memory.py) - the fastest full-model step this engine can do;
* ``lora``      ``zo_step`` on LoRA r=8 adapters on q/v of EVERY layer (MeZO's LoRA baseline; the
                wrappers are added before and removed after each call, untimed).
* ``mezo_reference``  MeZO's own step as princeton-nlp/MeZO ``large_models/trainer.py`` writes it
                (``zo_perturb_parameters`` +1, -2, +1 in place with ``param.data = param.data + s*z*eps``
                after ``torch.manual_seed``, then ``zo_update`` draws z a fourth time), over the same
                decoder weights as ``full``: the baseline the paper's speed-ups are measured against.

``--variants`` runs a subset (still interleaved): the variants that allocate
and free the whole model's z (``full*``, ``mezo_reference``) or add and
remove LoRA wrappers change the allocator's and caches' state for the others,
so each ratio can also be measured with only its two sides interleaved.

Targets: full / dominant >= 3.0 and dominant / floor <= 0.70. ``--profile``
adds a torch.profiler table of one dominant and one full step (top ops by
self CPU time) to explain where the time goes.

    python benchmarks/bench_step.py --quick            # 3 rounds, 1 torch thread (shared 2-core CPU)
    python benchmarks/bench_step.py --steps 10 --device cuda

    python benchmarks/bench_step.py --steps 5 --threads 1 --variants floor,dominant,full,mezo_reference --stem step_core

Writes benchmarks/results/step.json and step.md (``--stem`` names another pair).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import header, interleaved, medians, peak_rss_bytes, stamp, write_report  # noqa: E402

VARIANTS = ("floor", "dominant", "dominant_paired", "dominant_batchcache", "dominant_nocache", "full", "full_zkept", "lora",
            "mezo_reference")
TARGET_FULL_OVER_DOMINANT = 3.0
TARGET_DOMINANT_OVER_FLOOR = 0.70


def build(args):
    """Load the model, the batch, the profiled layer and one step function per variant."""
    from layerzo.model.layers import layer_parameter_names
    from layerzo.model.lora import add_lora, model_parameter_name, remove_lora
    from layerzo.model.prefix_cache import ExampleCache, cached_lower_layers, replayed_lower_output
    from layerzo.model.loading import load_model
    from layerzo.data.objectives import Objective
    from layerzo.data.scoring import batch_loss, encode_batch, kept_logits
    from layerzo.data.tasks import load_task
    from layerzo.tune.loop import resolve_layers
    from layerzo.tune.config import TuneConfig
    from layerzo.zo.engine import TunedParams, ZOConfig, ZOState, z_cache_budget, zo_step

    loaded = load_model(args.model, device=args.device)
    model, layout, n = loaded.model, loaded.layout, loaded.layout.num_layers
    splits = load_task(args.task, args.data_dir, num_train=max(64, args.batch_size), num_dev=0, num_test=0, seed=0)
    batch = encode_batch(loaded.tokenizer, splits.train[: args.batch_size], max_length=args.max_length)
    if args.layer is None:
        (args.layer,), _ = resolve_layers(TuneConfig(task=args.task, data_dir=args.data_dir, layers="dominant"), loaded)
    layer = args.layer
    loss = lambda: batch_loss(model, batch)  # noqa: E731
    p_dom = TunedParams.from_model(model, layer_parameter_names(model, layout, layer))
    full_names = [nm for i in range(n) for nm in layer_parameter_names(model, layout, i)]
    p_full = TunedParams.from_model(model, full_names)
    budget = z_cache_budget(model)  # what tune() passes: one layer / LoRA keep z, the full model regenerates it
    cfg_dom, cfg_full = ZOConfig(lr=1e-3, eps=1e-3), ZOConfig(lr=1e-3 / n, eps=1e-3)
    zkept = 4 * sum(t.numel() for t in p_full.tensors)  # the full model's z kept for the step
    seeds = iter(range(10**9))
    lora_state: dict = {}

    def lora_setup():
        names = add_lora(model, layout, range(n), r=8, alpha=16, seed=0)
        lora_state["params"] = TunedParams.from_model(model, [model_parameter_name(x) for x in names])

        def teardown():
            remove_lora(model)
            lora_state.clear()

        return teardown

    examples = ExampleCache(max_bytes=2**34)
    examples.fill(model, layout, layer, [batch], lambda b: kept_logits(model, b))

    def dominant():
        with replayed_lower_output(model, layout, layer, examples.assemble(batch)):
            zo_step(p_dom, loss, next(seeds), cfg_dom, ZOState(), z_cache_max_bytes=budget)

    objective = Objective("choice", loaded.tokenizer, max_length=args.max_length)

    def dominant_paired():
        with objective.step_loss(model, layout, layer, batch, examples=examples, paired=True) as step_loss:
            zo_step(p_dom, step_loss, next(seeds), cfg_dom, ZOState(), z_cache_max_bytes=budget,
                    pair_loss=step_loss.pair)

    named = dict(model.named_parameters())
    full_params = [named[nm] for nm in full_names]  # what MeZO perturbs, in place

    def mezo_perturb(seed: int, scaling: float) -> None:  # MeZO's zo_perturb_parameters, verbatim in effect
        torch.manual_seed(seed)
        for param in full_params:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            param.data = param.data + scaling * z * cfg_full.eps

    def mezo_reference():  # MeZO's zo_step + zo_update (weight decay 0); the update stays, as in the other variants
        seed = next(seeds)
        mezo_perturb(seed, 1)
        loss1 = loss()
        mezo_perturb(seed, -2)
        loss2 = loss()
        grad = (loss1 - loss2) / (2 * cfg_full.eps)
        mezo_perturb(seed, 1)
        torch.manual_seed(seed)
        for param in full_params:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            param.data = param.data - cfg_full.lr * (grad * z)

    def dominant_batchcache():
        with cached_lower_layers(model, layout, layer):
            zo_step(p_dom, loss, next(seeds), cfg_dom, ZOState(), z_cache_max_bytes=budget)

    variants = {
        "floor": lambda: (loss(), loss()),
        "dominant": dominant,
        "dominant_paired": dominant_paired,
        "dominant_batchcache": dominant_batchcache,
        "dominant_nocache": lambda: zo_step(p_dom, loss, next(seeds), cfg_dom, ZOState(), z_cache_max_bytes=budget),
        "full": lambda: zo_step(p_full, loss, next(seeds), cfg_full, ZOState(), z_cache_max_bytes=budget),
        "full_zkept": lambda: zo_step(p_full, loss, next(seeds), cfg_full, ZOState(), z_cache_max_bytes=zkept),
        "lora": lambda: zo_step(lora_state["params"], loss, next(seeds), cfg_dom, ZOState(), z_cache_max_bytes=budget),
        "mezo_reference": mezo_reference,
    }
    variants = {k: v for k, v in variants.items() if k in args.variants}
    info = {"model": loaded.source.name, "num_layers": n, "layer": layer, "batch_size": args.batch_size,
            "batch_shape": list(batch.input_ids.shape), "tokens_per_forward": int(batch.attention_mask.sum()),
            "tuned_params": {"dominant": sum(t.numel() for t in p_dom.tensors),
                             "full": sum(t.numel() for t in p_full.tensors)}}
    return loaded, variants, {"lora": lora_setup}, info, (p_dom, p_full, cfg_dom, cfg_full, loss, dominant)


def profile_steps(loaded, extra) -> dict[str, str]:
    """torch.profiler tables (top ops by self CPU time) of one dominant and one full step."""
    from torch.profiler import ProfilerActivity, profile

    from layerzo.zo.engine import ZOState, z_cache_budget, zo_step

    p_dom, p_full, cfg_dom, cfg_full, loss, dominant = extra
    budget = z_cache_budget(loaded.model)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    tables = {}
    full = lambda: zo_step(p_full, loss, 123, cfg_full, ZOState(), z_cache_max_bytes=budget)  # noqa: E731
    for name, fn in (("dominant", dominant), ("full", full)):
        with torch.no_grad(), profile(activities=acts) as prof:
            fn()
        tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return tables


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint dir / .gguf / Hub id (default: the demo)")
    p.add_argument("--task", "--tasks", dest="task", default="sst2", help="task whose training batch is used")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--layer", type=int, default=None, help="dominant layer (default: what profile picks)")
    p.add_argument("--steps", type=int, default=None, help="timed interleaved rounds (default 7; --quick 3)")
    p.add_argument("--quick", action="store_true", help="3 rounds, 1 torch thread: for the shared 2-core CPU")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 with --quick)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--profile", action="store_true", help="add torch.profiler tables of a dominant and a full step")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of the variants to interleave")
    p.add_argument("--stem", default="step", help="report name: benchmarks/results/STEM.{json,md}")
    args = p.parse_args()
    args.steps = args.steps or (3 if args.quick else 7)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown or "floor" not in args.variants or "dominant" not in args.variants:
        p.error(f"--variants takes floor, dominant and any of {', '.join(VARIANTS[2:])}; got {unknown or args.variants}")
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)

    loaded, variants, setup, info, extra = build(args)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    timed = {k: (lambda f=f: (f(), sync())) for k, f in variants.items()}
    with torch.no_grad():
        times = interleaved(timed, repeats=args.steps, warmup=1, setup=setup)
    med = medians(times)
    tokens = 2 * info["tokens_per_forward"]
    result = stamp({
        **info, "device": args.device, "rounds": args.steps, "median_s": med, "all_s": times,
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "variants": args.variants,
        "ratios": ratios_of(med),
        "targets": {"full/dominant >=": TARGET_FULL_OVER_DOMINANT, "dominant/floor <=": TARGET_DOMINANT_OVER_FLOOR},
        "peak_rss_mb": peak_rss_bytes() / 2**20,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    })
    if args.profile:
        result["profiler"] = profile_steps(loaded, extra)
    write_report(args.stem, result, markdown(result))
    print(markdown(result))


RATIOS = (("dominant", "floor"), ("full", "dominant"), ("full_zkept", "dominant"), ("mezo_reference", "dominant"),
          ("lora", "dominant"), ("dominant_nocache", "dominant"), ("dominant_paired", "dominant"),
          ("full", "dominant_paired"), ("dominant_batchcache", "floor"), ("full", "dominant_batchcache"))


def ratios_of(med: dict) -> dict:
    """Every ratio of :data:`RATIOS` whose two variants ran."""
    return {f"{a}/{b}": med[a] / med[b] for a, b in RATIOS if a in med and b in med}


def markdown(r: dict) -> str:
    med, ratios = r["median_s"], r["ratios"]
    rows = "\n".join(f"| {v} | {med[v]:.3f} | {med[v] / med['floor']:.2f}x | {r['tokens_per_s'][v]:.0f} |"
                      for v in VARIANTS if v in med)

    def ratio(key: str, fmt: str = "{:.2f}x") -> str:
        return fmt.format(ratios[key]) if key in ratios else "(not run)"

    ok_full = ratios.get("full/dominant", 0) >= TARGET_FULL_OVER_DOMINANT
    ok_floor = ratios["dominant/floor"] <= TARGET_DOMINANT_OVER_FLOOR
    ok_ref = ratios.get("mezo_reference/dominant", 0) >= TARGET_FULL_OVER_DOMINANT
    text = (
        header("ZO step time: dominant layer vs full-model MeZO vs LoRA-ZO vs two forwards", r)
        + f"\n{r['model']} ({r['num_layers']} layers), dominant layer {r['layer']} "
        f"({r['tuned_params']['dominant'] / 1e6:.2f}M tuned weights vs {r['tuned_params']['full'] / 1e6:.1f}M for "
        f"the full model), batch {r['batch_size']} rows {r['batch_shape']} ({r['tokens_per_forward']} real tokens per "
        f"forward), device {r['device']}; median of {r['rounds']} interleaved rounds after one warm-up.\n\n"
        "| variant | median s/step | vs floor | tokens/s (2 forwards) |\n|---|---|---|---|\n" + rows + "\n\n"
        f"- dominant / floor = **{ratios['dominant/floor']:.2f}x** (target <= {TARGET_DOMINANT_OVER_FLOOR}: "
        f"{'met' if ok_floor else 'MISSED'})\n"
        + (f"- full / dominant = **{ratio('full/dominant')}** (target >= {TARGET_FULL_OVER_DOMINANT}: "
           f"{'met' if ok_full else 'MISSED'}; layerzo's own full-model step); with z kept in memory instead of "
           f"the seed trick: {ratio('full_zkept/dominant')}\n" if "full" in med else "")
        + (f"- MeZO's reference step (4 draws of z, in-place perturbation) / dominant = "
           f"**{ratio('mezo_reference/dominant')}** (target >= {TARGET_FULL_OVER_DOMINANT}: "
           f"{'met' if ok_ref else 'MISSED'}); / layerzo's full step = "
           + (f"{med['mezo_reference'] / med['full']:.2f}x" if "full" in med else "(not run)") + "\n"
           if "mezo_reference" in med else "")
        + (f"- one forward for + and - (2B rows, `--paired-forward`) / two forwards = "
           f"**{ratio('dominant_paired/dominant')}**; full / dominant_paired = {ratio('full/dominant_paired')}\n"
           if "dominant_paired" in med else "")
        + (f"- lora / dominant = **{ratio('lora/dominant')}**\n" if "lora" in med else "")
        + (f"- dominant without the lower-layer cache / with it = {ratio('dominant_nocache/dominant')}\n"
           if "dominant_nocache" in med else "")
        + (f"- with the per-batch cache instead (lower layers once per step): dominant / floor = "
           f"{ratio('dominant_batchcache/floor')}, full / dominant = {ratio('full/dominant_batchcache')}\n"
           if "dominant_batchcache" in med else "")
        + f"- variants interleaved in this run: {', '.join(r.get('variants', VARIANTS))}\n"
        f"- bound: with the per-example cache a step runs layers {r['layer']}..{r['num_layers'] - 1} twice, so "
        f"dominant / floor is about {(r['num_layers'] - r['layer']) / r['num_layers']:.2f}x at best (layer compute "
        f"only; {(2 * r['num_layers'] - r['layer']) / (2 * r['num_layers']):.2f}x with the per-batch cache); "
        f"full / dominant is then (floor + z draw/perturb/update of every weight) / that bound\n"
        f"- peak RSS of the whole benchmark process: {r['peak_rss_mb']:.0f} MB"
        + (f"; peak CUDA allocated {r['peak_cuda_mb']:.0f} MB" if r.get("peak_cuda_mb") else "")
        + " (per-variant peaks: bench_memory.py)\n"
    )
    for name, table in r.get("profiler", {}).items():
        text += f"\n### torch.profiler: one {name} step (top ops by self CPU time)\n\n```\n{table}\n```\n"
    return text


if __name__ == "__main__":
    main()
