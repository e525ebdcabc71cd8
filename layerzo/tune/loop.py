"""The ``tune`` training loop: data protocol, evaluation, best-dev selection, metrics, patch.

Reads top to bottom like :func:`tune`:

1. refuse a non-empty ``out`` (before any work), load the task (MeZO protocol:
   1000 train / 500 dev / 1000 test, seeded) and the model;
2. resolve ``--layers`` (``dominant`` runs the profiler and records its
   report), fingerprint the BASE tensors the patch will replace;
3. prepare the tuned tensors: fp32 master copies of the tuned layers, or
   LoRA adapters; everything runs under ``torch.no_grad`` (no graph, no optimizer);
4. zero-shot dev/test accuracy, then ``steps`` ZO steps (layers below the
   tuned one run once per step), dev accuracy every ``eval_every`` steps,
   best-dev weights kept, ``metrics.jsonl`` streamed;
5. test accuracy of the best weights, write the layer patch (weights +
   manifest + the trajectory up to the best step, so it replays exactly).

Every ``checkpoint_every`` steps (and on Ctrl-C) the loop's whole state goes to
``OUT.ckpt/`` (:mod:`layerzo.tune.checkpoint`); ``resume=True`` continues from it.

Same config and seed → byte-identical patch files (weights, trajectory,
manifest, card), also across an interruption and resume: wall-clock timing is
returned in :class:`TuneResult` metrics and logged per step in
``metrics.jsonl``, never written into the patch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from layerzo.version import __version__
from layerzo.tune.batches import EvalSet, TrainBatches, train_batches  # noqa: F401  (train.EvalSet: sweep hooks it)
from layerzo.tune.checkpoint import (RESUME_FREE_FIELDS, Checkpoint, StopOnInterrupt,
                         check_checkpoint_dir, check_resumable, check_writable, checkpoint_dir, load_checkpoint,
                         remove_checkpoint, run_identity, save_checkpoint)
from layerzo.zo.distributed import (DataParallel, check_tuned_placement, config_digest, init_data_parallel,
                          parse_device_map, placement, shutdown, weights_digest)
from layerzo.errors import CheckpointError, ConfigError, DivergenceError, OutputExistsError, TaskError, TuneInterrupted
from layerzo.core.hashing import tensor_sha256
from layerzo.model.layers import get_layer, layer_parameter_names, parse_layer_spec
from layerzo.tune.prefix_cache import cached_lower_layers
from layerzo.model.loading import DTYPES
from layerzo.core.progress import StderrBar
from layerzo.data.scoring import batch_loss, encode_batch
from layerzo.zo.engine import RNG_ALGORITHM, Z_DTYPE, TunedParams, ZOConfig, ZOState, z_cache_budget

METRICS_NAME = "metrics.jsonl"


@dataclass(frozen=True)
class TuneConfig:
    """Everything a tune run depends on. Recipe keys and CLI options map one to one onto these fields."""

    task: str = "sst2"
    model: str | None = None  # checkpoint dir, .gguf, Hub id; None = the SmolLM2-135M demo
    revision: str | None = None
    data_dir: str | None = None
    layers: str = "dominant"  # "dominant" | "all" | "5" | "3,7"
    lora: bool = False  # LoRA-ZO on the q/v projections of the selected layers
    lora_rank: int = 8
    lora_alpha: float = 16.0
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-4
    eps: float = 1e-3
    weight_decay: float = 0.0
    q: int = 1
    momentum: float = 0.0
    lr_schedule: str = "constant"
    max_abs_grad: float | None = 1e4
    max_bad_steps: int = 5
    seed: int = 0
    eval_every: int = 100
    num_train: int = 1000
    num_dev: int = 500
    num_test: int = 1000
    eval_batch_size: int = 16
    max_length: int = 512
    dtype: str = "float32"
    device: str = "cpu"
    device_map: str | None = None  # accelerate placement of the frozen model: auto, or a JSON module→device map
    shard_batch: bool = False  # under torchrun: rank r scores batch[r::W] instead of the full batch
    trust_remote_code: bool = False
    cache_lower_layers: bool = True
    checkpoint_every: int = 50  # save a resumable checkpoint in OUT.ckpt/ every N steps (0: only on Ctrl-C)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "num_train", "eval_batch_size", "lora_rank"):
            _int_at_least(name, getattr(self, name), 1)
        for name in ("num_dev", "num_test", "seed", "checkpoint_every"):
            _int_at_least(name, getattr(self, name), 0)
        _int_at_least("max_length", self.max_length, 2)
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.layers, str) or not self.layers.strip():
            raise ConfigError(f"layers must be 'dominant', 'all', an index or a list like 3,7; got {self.layers!r}")
        if not isinstance(self.task, str) or not self.task:
            raise ConfigError(f"task must be a task name or a task YAML path, got {self.task!r}")
        parse_device_map(self.device_map)
        self.zo_config()  # validates lr, eps, q, momentum, schedule, bounds with their own messages

    def zo_config(self) -> ZOConfig:
        return ZOConfig(
            lr=self.lr, eps=self.eps, weight_decay=self.weight_decay, q=self.q, momentum=self.momentum,
            lr_schedule=self.lr_schedule, total_steps=self.steps, max_abs_grad=self.max_abs_grad,
            max_bad_steps=self.max_bad_steps,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _int_at_least(name: str, value: Any, low: int) -> None:
    if type(value) is not int or value < low:
        raise ConfigError(f"{name} must be an integer ≥ {low}, got {value!r}")


@dataclass(frozen=True)
class TuneResult:
    out_dir: Path
    layers: tuple[int, ...]
    metrics: dict[str, Any]


# ----------------------------------------------------------------------------- helpers
def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty ``out`` unless ``overwrite`` (called before any work)."""
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"output folder {out} already exists and is not empty", "pass --overwrite or choose another --out")


def resolve_layers(config: TuneConfig, loaded) -> tuple[tuple[int, ...], dict | None]:
    """``--layers`` → sorted layer indices (+ the profile report for ``dominant``)."""
    spec = parse_layer_spec(config.layers, loaded.layout.num_layers)
    if spec == "all":
        return tuple(range(loaded.layout.num_layers)), None
    if spec != "dominant":
        return spec, None  # type: ignore[return-value]
    from layerzo.profile.run import ProfileConfig, profile_model
    from layerzo.data.tasks import calibration_texts

    texts = calibration_texts(config.task, config.data_dir, n=ProfileConfig().num_sequences, seed=config.seed)
    report = profile_model(
        loaded.model, loaded.tokenizer, texts, ProfileConfig(), loaded.layout,
        model_name=loaded.source.name, calibration=f"task {config.task} (training inputs, seed {config.seed})",
    )
    return (int(report.pick.layer),), report.to_dict()


def _json_line(obj: dict) -> str:
    """One strict-JSON line; a non-finite loss/grad of a rejected step is written as null."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in obj.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


# ----------------------------------------------------------------------------- the loop
def tune(config: TuneConfig, out_dir: str | os.PathLike, *, overwrite: bool = False, progress: bool = True,
         loaded=None, data_parallel: DataParallel | None = None, resume: bool = False,
         note: Callable[[str], None] | None = None) -> TuneResult:
    """Run a ZO tune and write the layer patch to ``out_dir``.

    ``loaded`` (a :class:`layerzo.model.loading.LoadedModel`) skips loading
    ``config.model``; it is modified in place (its tuned layers end at the best weights).
    ``resume`` continues from the checkpoint in ``OUT.ckpt/`` (a fresh start if
    there is none); Ctrl-C saves one and raises :class:`layerzo.tune.checkpoint.TuneInterrupted`.
    ``note`` (a callable taking one line) receives notes such as "resuming at step 12".
    """
    out = Path(out_dir).expanduser().absolute()
    check_output_dir(out, overwrite)
    ckpt_dir = checkpoint_dir(out)
    has_checkpoint = check_checkpoint_dir(ckpt_dir, resume=resume, overwrite=overwrite)
    check_writable(out.parent)  # a read-only or full disk fails now, not after training
    # Under torchrun (WORLD_SIZE > 1) every rank runs this function; rank 0 alone writes (layerzo.zo.distributed).
    dp = data_parallel if data_parallel is not None else init_data_parallel(shard_batch=config.shard_batch)
    t_start = time.perf_counter()
    from layerzo.data.tasks import load_task

    splits = load_task(config.task, config.data_dir, num_train=config.num_train, num_dev=config.num_dev,
                       num_test=config.num_test, seed=config.seed)
    if not splits.train:
        raise TaskError(f"task {config.task!r} has no training examples")
    if loaded is None:
        from layerzo.model.loading import load_model

        device, device_map = placement(dp, config.device, config.device_map)
        loaded = load_model(config.model, dtype=config.dtype, device=device, revision=config.revision,
                            trust_remote_code=config.trust_remote_code, device_map=device_map)
    model, tokenizer, layout = loaded.model, loaded.tokenizer, loaded.layout
    layers, profile = resolve_layers(config, loaded)
    check_tuned_placement(model, layout, layers)  # before anything reads the tuned weights
    model_dtype = next(model.parameters()).dtype

    # Fingerprint the BASE tensors from the original-precision weights, before any cast.
    if config.lora:
        from layerzo.model.lora import add_lora, lora_base_names

        state = dict(model.named_parameters())
        names = add_lora(model, layout, layers, r=config.lora_rank, alpha=config.lora_alpha, seed=config.seed)
        fingerprint = {n: tensor_sha256(state[n]) for n in lora_base_names(names)}
    else:
        from layerzo.model.precision import fp32_master

        names = [n for i in layers for n in layer_parameter_names(model, layout, i)]
        state = dict(model.named_parameters())
        fingerprint = {n: tensor_sha256(state[n]) for n in names}
        fp32_master([get_layer(model, layout, i) for i in layers], model_dtype)
    params = TunedParams.from_model(model, names)
    dp.check_same("recipe, tuned layers and base weights", f"{config_digest(config)}|{layers}|{weights_digest(params)}")
    # Lower layers may be cached only if nothing below the first tuned layer is tuned.
    first_cached = min(layers) if config.cache_lower_layers else 0

    eval_kw = {"batch_size": config.eval_batch_size, "max_length": config.max_length}
    dev, test = (dp.eval_set(lambda ex: EvalSet(tokenizer, ex, **eval_kw), s) for s in (splits.dev, splits.test))
    # z kept per step only while small next to the model: --layers all stays at inference memory
    zo_cfg, zo_state = dataclasses.replace(config.zo_config(), z_cache_max_bytes=z_cache_budget(model)), ZOState()
    seed_rng = random.Random(config.seed)  # private: step seeds never touch the global RNG
    batches = train_batches(len(splits.train), config.batch_size, config.seed)
    identity = run_identity(config.to_dict(), layers, names, fingerprint)
    trajectory: list = []
    rows: list[dict] = []  # metrics.jsonl rows, kept for the checkpoint
    earlier = {"step_seconds": 0.0, "train_seconds": 0.0, "wall_seconds": 0.0}  # timing before a resume
    from layerzo.patch.format import TrajectoryStep

    if has_checkpoint:  # resume: every piece of loop state comes back exactly as it was saved
        resumed = load_checkpoint(ckpt_dir)
        check_resumable(ckpt_dir, resumed, identity, config.steps, params)
        params.load(resumed.params)
        device_of = [t.device for t in params.tensors]
        zo_state = ZOState(step=resumed.step, bad_in_row=resumed.bad_in_row,
                           momentum={i: m.to(device_of[i]) for i, m in resumed.momentum.items()})
        seed_rng.setstate(resumed.seed_rng)
        try:
            batches = TrainBatches(len(splits.train), config.batch_size, config.seed, *resumed.batches)
        except ConfigError as exc:
            raise CheckpointError(f"checkpoint {ckpt_dir} does not fit this task's data: {exc}") from None
        best = {**resumed.best, "weights": resumed.best_weights}
        trajectory, rows = list(resumed.trajectory), list(resumed.rows)
        (zs_dev, zs_test), last_dev, rejected = resumed.zero_shot, resumed.last_dev, resumed.rejected
        earlier.update({k: float(v) for k, v in resumed.seconds.items() if k in earlier})
        if note:
            note(f"resuming {out.name} from the checkpoint at step {resumed.step} of {config.steps}")
    else:
        if resume and note:
            note(f"no checkpoint in {ckpt_dir}: starting from step 0")
        with torch.no_grad():
            zs_dev = dev.accuracy(model, layout, first_cached)
            zs_test = test.accuracy(model, layout, first_cached)
        best = {"dev_acc": zs_dev, "step": 0, "weights": params.state(), "trajectory_len": 0}
        last_dev, rejected = zs_dev, 0
    start_step = zo_state.step

    def snapshot(done: int) -> Checkpoint:
        return Checkpoint(
            identity=identity, step=done, params=params.state(), best_weights=best["weights"],
            best={k: best[k] for k in ("dev_acc", "step", "trajectory_len")}, momentum=dict(zo_state.momentum),
            bad_in_row=zo_state.bad_in_row, seed_rng=seed_rng.getstate(), batches=(batches.epoch, batches.position),
            trajectory=trajectory, rows=rows, zero_shot=(zs_dev, zs_test), last_dev=last_dev, rejected=rejected,
            seconds={"step_seconds": earlier["step_seconds"] + step_seconds,
                     "train_seconds": earlier["train_seconds"] + time.perf_counter() - t_train,
                     "wall_seconds": earlier["wall_seconds"] + time.perf_counter() - t_start})

    out.parent.mkdir(parents=True, exist_ok=True)
    rank_tag = "" if dp.is_main else f".rank{dp.rank}"  # other ranks log aside and delete it at the end
    metrics_tmp = out.parent / f".{out.name}.{METRICS_NAME}{rank_tag}.tmp"
    diverged: DivergenceError | None = None
    step_seconds, t_train = 0.0, time.perf_counter()
    bar = _Progress(config.steps, enabled=progress and dp.is_main)
    stop = StopOnInterrupt(enabled=not dp.active)  # Ctrl-C: finish the step, checkpoint, stop
    try:
        with open(metrics_tmp, "w", encoding="utf-8") as log, bar, torch.no_grad(), stop:
            log.writelines(_json_line(r) for r in rows)
            for step in range(start_step, config.steps):
                t0 = time.perf_counter()
                batch = encode_batch(tokenizer, dp.shard([splits.train[i] for i in next(batches)]),
                                     max_length=config.max_length)
                step_seed = seed_rng.getrandbits(63)
                try:
                    with cached_lower_layers(model, layout, first_cached, batch=batch):
                        result = dp.zo_step(params, lambda: batch_loss(model, batch), step_seed, zo_cfg, zo_state)
                except DivergenceError as exc:
                    diverged = exc
                    rejected += 1  # the step that tipped the streak was rejected too
                    break
                if result.applied:
                    trajectory.append(TrajectoryStep(step=step, seeds=result.seeds, grads=result.grads, lr=result.lr))
                else:
                    rejected += 1
                row = {
                    "step": step + 1,
                    "loss_plus": sum(result.losses_plus) / len(result.losses_plus),
                    "loss_minus": sum(result.losses_minus) / len(result.losses_minus),
                    "grad": sum(result.grads) / len(result.grads),
                    "lr": result.lr,
                    "applied": result.applied,
                    "seconds": time.perf_counter() - t0,  # the ZO step alone (evaluation excluded)
                }
                step_seconds += row["seconds"]
                if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                    t_eval = time.perf_counter()
                    if dev.size:
                        last_dev = dev.accuracy(model, layout, first_cached)
                        row["dev_acc"] = last_dev
                        if best["dev_acc"] is None or last_dev > best["dev_acc"]:
                            best = {"dev_acc": last_dev, "step": step + 1, "weights": params.state(),
                                    "trajectory_len": len(trajectory)}
                    elif step + 1 == config.steps:  # no dev set: the final weights are the result
                        best = {"dev_acc": None, "step": step + 1, "weights": params.state(),
                                "trajectory_len": len(trajectory)}
                    row["eval_seconds"] = time.perf_counter() - t_eval
                line = _json_line(row)
                log.write(line)
                log.flush()
                rows.append(json.loads(line))
                bar.advance(row["loss_plus"], last_dev, step + 1, step_seconds)
                done = step + 1
                due = config.checkpoint_every and done % config.checkpoint_every == 0
                if done < config.steps and (due or stop.requested):
                    if dp.is_main:
                        save_checkpoint(ckpt_dir, snapshot(done))
                    if stop.requested:
                        raise TuneInterrupted(f"interrupted after step {done} of {config.steps}; checkpoint saved to "
                                              f"{ckpt_dir}", ckpt_dir, done, "run the same command with --resume")
        train_seconds = earlier["train_seconds"] + time.perf_counter() - t_train
        step_seconds += earlier["step_seconds"]
        steps_done = zo_state.step

        params.load(best["weights"])
        with torch.no_grad():
            test_acc = test.accuracy(model, layout, first_cached) if diverged is None else None
        wall = earlier["wall_seconds"] + time.perf_counter() - t_start
        # Only deterministic values go into the manifest (so the patch files are byte-identical for
        # the same seed, interrupted or not); timing is returned and logged per step in metrics.jsonl.
        metrics = {
            "zero_shot_dev_acc": zs_dev, "zero_shot_test_acc": zs_test,
            "best_dev_acc": best["dev_acc"], "best_step": best["step"], "last_dev_acc": last_dev,
            "test_acc": test_acc,
            "steps": steps_done, "applied_steps": steps_done - rejected, "rejected_steps": rejected,
            "num_train": len(splits.train), "num_dev": dev.size, "num_test": test.size,
            "diverged": diverged.one_line() if diverged else None,
            "replay": {"rng": RNG_ALGORITHM, "z_dtype": str(Z_DTYPE).removeprefix("torch."),
                       "device_type": next(iter(params.tensors)).device.type, "tensor_order": list(names),
                       "master_dtype": "float32"},
        }
        timing = {
            "wall_seconds": round(wall, 3), "train_seconds": round(train_seconds, 3),
            "step_seconds": round(step_seconds, 3),  # ZO steps only; train_seconds adds the dev evaluations
            "steps_per_second": round(steps_done / step_seconds, 4) if step_seconds > 0 else None,
        }
        if dp.active:
            metrics["distributed"] = {**dp.summary(config.q), "rank_weights_sha256": dp.check_final_weights(params)}
        if dp.is_main:
            _write_patch(out, overwrite, config, loaded, layers, params, fingerprint, profile, metrics,
                         trajectory[: best["trajectory_len"]])
            os.replace(metrics_tmp, out / METRICS_NAME)
            remove_checkpoint(ckpt_dir)  # the patch now holds the result
        if data_parallel is None:
            shutdown(dp)  # waits for rank 0's writes, then leaves the process group
    finally:  # a failed run leaves no stray temp file
        metrics_tmp.unlink(missing_ok=True)
    if diverged is not None:
        raise DivergenceError(f"{diverged} — the best patch so far was written to {out}", diverged.hint)
    return TuneResult(out, layers, {**metrics, **timing})


def _write_patch(out: Path, overwrite: bool, config: TuneConfig, loaded, layers, params: TunedParams,
                 fingerprint: dict, profile: dict | None, metrics: dict, trajectory: list) -> None:
    from layerzo.patch.format import FORMAT_VERSION, LayerPatch, PatchManifest

    tensors = {n: t.detach().to("cpu").clone() for n, t in zip(params.names, params.tensors)}
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    model_config = getattr(loaded.model, "config", None)
    archs = getattr(model_config, "architectures", None) or [type(loaded.model).__name__]
    manifest = PatchManifest(
        format_version=FORMAT_VERSION, layerzo_version=__version__,
        base_model=loaded.source.name, base_revision=config.revision,
        architecture=archs[0], num_layers=loaded.layout.num_layers, layers=tuple(layers),
        kind="lora" if config.lora else "layers", dtype=dtypes.pop(),
        # checkpoint_every changes when state was saved, not the result: kept out so patches stay identical
        base_fingerprint=fingerprint, profile=profile, metrics=metrics,
        recipe={k: v for k, v in config.to_dict().items() if k not in RESUME_FREE_FIELDS},
        layer_path=loaded.layout.path,
        lora={"r": config.lora_rank, "alpha": config.lora_alpha, "target_modules": ["q_proj", "v_proj"]}
        if config.lora else None,
    )
    # An empty existing folder passed the up-front check: replacing it is not an overwrite.
    LayerPatch(manifest, tensors, trajectory).save_pretrained(out, overwrite=overwrite or out.exists())


class _Progress(StderrBar):
    """tune's bar: loss, last dev accuracy, steps/s."""

    def __init__(self, total: int, enabled: bool) -> None:
        super().__init__("tune", total, enabled)

    def advance(self, loss: float, dev_acc: float | None, done: int, seconds: float) -> None:
        dev = f"{dev_acc:.3f}" if dev_acc is not None else "-"
        rate = done / seconds if seconds > 0 else math.nan
        self.update(completed=done, info=f"loss {loss:.4f}  dev {dev}  {rate:.2f} steps/s")
