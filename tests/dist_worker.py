"""Worker for tests/test_distributed.py: a few ZO steps on a tiny model, three ways.

    --mode dist     under torchrun: layerzo.zo.distributed.DataParallel.zo_step (q per rank)
    --mode zo       one process: layerzo.zo.engine.zo_step with q = q·world (the reference)
    --mode emulate  one process: layerzo.zo.distributed.emulate_step over ``--world`` virtual ranks

Every rank writes its tuned tensors to ``<out>/rank<r>.safetensors``; rank 0
also writes ``<out>/trajectory.json`` (applied steps: seeds, grads, lr) and
``<out>/results.json`` (every step's applied flag). ``--nan-rank R --nan-step S``
makes (virtual) rank R's loss non-finite at step S, to check that every rank
rejects the same step.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from layerzo.zo.distributed import DataParallel, emulate_step, init_data_parallel, shutdown
from layerzo.errors import ConfigError
from layerzo.model.layers import layer_parameter_names
from layerzo.model.prefix_cache import cached_lower_layers
from layerzo.model.loading import load_model
from layerzo.data.scoring import batch_loss, encode_batch
from layerzo.data.tasks import load_task
from layerzo.tune.batches import EvalSet, train_batches
from layerzo.zo.engine import TunedParams, ZOConfig, ZOState, zo_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("dist", "zo", "emulate"), required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--q", type=int, default=1, help="directions per (virtual) rank")
    ap.add_argument("--world", type=int, default=2, help="virtual ranks for --mode zo/emulate")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--shard", action="store_true")
    ap.add_argument("--nan-rank", type=int, default=-1)
    ap.add_argument("--nan-step", type=int, default=-1)
    args = ap.parse_args()
    torch.set_num_threads(1)  # same kernels and reduction order in every process

    dp = init_data_parallel(shard_batch=args.shard) if args.mode == "dist" else DataParallel()
    dp.check_same("probe", "identical on every rank")
    try:  # must fail on every rank, naming rank 1
        dp.check_same("rank id", str(dp.rank if args.mode == "dist" else "virtual"))
        mismatch = ""
    except ConfigError as exc:
        mismatch = str(exc)
    loaded = load_model(args.model)
    model, tok, layout = loaded.model, loaded.tokenizer, loaded.layout
    train = load_task("sst2", args.data_dir, num_train=16, num_dev=0, num_test=0, seed=0).train
    params = TunedParams.from_model(model, layer_parameter_names(model, layout, args.layer))
    world = dp.world_size if args.mode == "dist" else args.world
    q = args.q * world if args.mode == "zo" else args.q
    config = ZOConfig(lr=1e-2, eps=1e-3, q=q, weight_decay=0.01)
    state = ZOState()
    seed_rng = random.Random(0)
    batches = train_batches(len(train), args.batch_size, 0)
    trajectory, applied = [], []

    def loss_of(examples, rank, step):
        batch = encode_batch(tok, examples, max_length=64)

        def fn():
            if rank == args.nan_rank and step == args.nan_step:
                return math.nan
            return batch_loss(model, batch)
        return fn

    with torch.no_grad():
        for step in range(args.steps):
            examples = [train[i] for i in next(batches)]
            step_seed = seed_rng.getrandbits(63)
            if args.mode == "dist":
                with cached_lower_layers(model, layout, args.layer):
                    fn = loss_of(dp.shard(examples), dp.rank, step)
                    result = dp.zo_step(params, fn, step_seed, config, state)
            elif args.mode == "zo":
                with cached_lower_layers(model, layout, args.layer):
                    result = zo_step(params, loss_of(examples, 0, step), step_seed, config, state)
            else:  # no lower-layer cache: virtual ranks may score different shards in one context
                parts = [examples[r::world] if args.shard else examples for r in range(world)]
                fns = [loss_of(p, r, step) for r, p in enumerate(parts)]
                result = emulate_step(params, fns, step_seed, config, state)
            applied.append(result.applied)
            if result.applied:
                trajectory.append({"seeds": list(result.seeds), "grads": list(result.grads), "lr": result.lr})

    with torch.no_grad():  # dist: each rank scores half the examples, the counts are summed
        evaluation = dp.eval_set(lambda ex: EvalSet(tok, ex, batch_size=4, max_length=64), train[:7])
        acc = evaluation.evaluate(model, layout, args.layer)["acc"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in zip(params.names, params.tensors)}, out / f"rank{dp.rank}.safetensors")
    if dp.is_main:
        (out / "trajectory.json").write_text(json.dumps(trajectory))
        (out / "results.json").write_text(json.dumps({"applied": applied, "names": list(params.names), "accuracy": acc,
                                                        "mismatch": mismatch}))
    shutdown(dp)


if __name__ == "__main__":
    main()
