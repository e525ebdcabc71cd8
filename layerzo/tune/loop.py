"""The ``tune`` training loop: data protocol, evaluation, best-dev selection, metrics, patch.

:func:`tune` reads top to bottom:

1. :func:`check_outputs` refuses a non-empty ``out`` before any work; the task
   is loaded (MeZO protocol: 1000 train / 500 dev / 1000 test, seeded), then the model;
2. :func:`tuned_model` resolves ``--layers`` (``dominant`` runs the profiler),
   fingerprints the BASE tensors the patch will replace, and prepares the tuned
   tensors (fp32 master copies of the tuned layers, or LoRA adapters) — and
   takes its hooks and adapters off the model again when the run ends;
3. :func:`start_state` measures zero-shot dev/test accuracy, or
   :func:`resume_state` restores everything from ``OUT.ckpt/``;
4. :func:`train` runs the ZO steps (layers below the tuned one cached), dev
   accuracy every ``eval_every`` steps, best-dev weights kept, ``metrics.jsonl`` streamed;
5. :func:`finish` measures the test accuracy of the best weights and writes the
   layer patch (weights + manifest + the trajectory up to the best step, so it replays exactly).

Every ``checkpoint_every`` steps (and on Ctrl-C) the loop's whole state goes to
``OUT.ckpt/`` (:mod:`layerzo.tune.checkpoint`); ``resume=True`` continues from it.

Same config and seed → byte-identical patch files (weights, trajectory,
manifest, card), also across an interruption and resume: wall-clock timing is
returned in :class:`TuneResult` metrics and logged per step in
``metrics.jsonl``, never written into the patch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from layerzo.core.atomic import check_can_write
from layerzo.core.hashing import tensor_sha256
from layerzo.core.progress import StderrBar
from layerzo.data.chat import render_chat
from layerzo.data.generation import Generator
from layerzo.data.objectives import Objective, resolve_objective
from layerzo.data.spec import TaskSplits
from layerzo.data.tasks import calibration_texts, load_task
from layerzo.core.outputs import check_output, output_lock
from layerzo.errors import CheckpointError, ConfigError, DivergenceError, TaskError, TuneInterrupted
from layerzo.model.layers import get_layer, layer_parameter_names, parse_layer_spec
from layerzo.model.loading import LoadedModel, load_model, public_path_name
from layerzo.model.lora import add_lora, lora_base_names, model_parameter_name, remove_lora
from layerzo.model.precision import fp32_master_layers
from layerzo.patch.format import LayerPatch
from layerzo.patch.manifest import FORMAT_VERSION, MANIFEST_NAME, PatchManifest, TrajectoryStep
from layerzo.profile.rule import ProfileConfig
from layerzo.profile.run import profile_model
from layerzo.tune.batches import (EvalSet, GenerativeEvalSet, TrainBatches, ZeroShotCache, train_batches,
                                  visited_examples)
from layerzo.tune.checkpoint import (STATE_JSON, Checkpoint, StopOnInterrupt, check_checkpoint_dir, check_resumable,
                                     check_writable, checkpoint_dir, load_checkpoint, remove_checkpoint, run_identity,
                                     save_checkpoint)
from layerzo.tune.config import TuneConfig, parse_lr_search
from layerzo.tune.lr_search import SEARCH_FRACTION, lr_grid, search_lr
from layerzo.tune.race import (LAYER_RACE_FRACTION, RaceConfig, candidate_layers, first_round_steps, race,
                               race_choice, sensitivity_ranking)
from layerzo.tune.select import task_sensitivity
from layerzo.model.prefix_cache import ExampleCache, SharedLowerOutputs, default_example_cache_bytes
from layerzo.version import __version__
from layerzo.zo.distributed import (DataParallel, check_tuned_placement, config_digest, init_data_parallel, placement,
                                    shutdown, weights_digest)
from layerzo.zo.engine import RNG_ALGORITHM, Z_DTYPE, TunedParams, ZOState, z_cache_budget

METRICS_NAME = "metrics.jsonl"
# --paired-forward's default per device type, as measured by benchmarks/bench_step.py (dominant_paired vs dominant).
PAIRED_FORWARD_DEFAULT = {"cpu": False}
SAVE_CHOICES = ("weights", "trajectory")


@dataclass(frozen=True)
class TuneResult:
    out_dir: Path
    layers: tuple[int, ...]
    metrics: dict[str, Any]


@dataclass
class Tuned:
    """What :func:`tuned_model` prepares: the tuned layers, their tensors and the base fingerprint."""

    layers: tuple[int, ...]
    names: list[str]  # in the patch's key format, in params order (LoRA: without peft's adapter name)
    params: TunedParams
    fingerprint: dict[str, str]
    profile: dict | None
    first_cached: int  # layers below this one are frozen: their outputs are cached


@dataclass
class Run:
    """The fixed parts of one run, built once by :func:`tune`."""

    config: TuneConfig
    out: Path
    dp: DataParallel
    loaded: LoadedModel
    splits: TaskSplits
    tuned: Tuned
    dev: Any  # EvalSet (or its data-parallel wrapper)
    test: Any
    identity: dict
    prefix_cache: SharedLowerOutputs | None
    zero_shot_cache: ZeroShotCache | None
    t_start: float
    objective: Objective
    note: Callable[[str], None] | None = None
    record_paths: bool = False  # write local paths (model, data) into the patch; off: names only
    save_weights: bool = True  # False: a trajectory-only patch
    lr_search: dict | None = None  # ``--lr auto``: the grid, its scores and the pick (the manifest's metrics)

    @property
    def ckpt_dir(self) -> Path:
        return checkpoint_dir(self.out)

    def scores(self, eval_set) -> dict | None:
        """``{"acc": ...}`` or, for a generative task, ``{"f1": ..., "em": ...}`` (None: an empty set)."""
        return eval_set.evaluate(self.loaded.model, self.loaded.layout, self.tuned.first_cached, self.prefix_cache)


@dataclass
class LoopState:
    """Everything that changes while training; a checkpoint holds exactly this."""

    zo: ZOState
    seed_rng: random.Random
    batches: TrainBatches
    best: dict  # {"dev_acc" (the dev score: accuracy, or F1), "step", "weights", "trajectory_len"}
    zero_shot: tuple[float | None, ...]  # (dev, test) score of the base model; generative: + (dev EM, test EM)
    last_dev: float | None
    trajectory: list = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)  # metrics.jsonl rows so far
    rejected: int = 0
    earlier: dict = field(default_factory=lambda: {"step_seconds": 0.0, "train_seconds": 0.0, "wall_seconds": 0.0})
    step_seconds: float = 0.0  # this process's ZO-step time (resumed runs add ``earlier``)
    prefix_cache: dict | None = None  # the per-example cache's rows, bytes and hit rate (this process)
    t_train: float = 0.0


# ----------------------------------------------------------------------------- the run
def tune(config: TuneConfig, out_dir: str | os.PathLike, *, overwrite: bool = False, progress: bool = True,
         loaded: LoadedModel | None = None, data_parallel: DataParallel | None = None, resume: bool = False,
         note: Callable[[str], None] | None = None, prefix_cache: SharedLowerOutputs | None = None,
         zero_shot_cache: ZeroShotCache | None = None, read_paths: Sequence[str | os.PathLike] = (),
         record_paths: bool = False, save: str = "weights") -> TuneResult:
    """Run a ZO tune and write the layer patch to ``out_dir``.

    ``loaded`` (a :class:`layerzo.model.loading.LoadedModel`) skips loading
    ``config.model``. tune leaves its structure as it found it (hooks, fp32
    master casts and LoRA adapters are removed at the end); the tuned layers'
    VALUES end at the best weights. ``resume`` continues from the checkpoint in
    ``OUT.ckpt/`` (a fresh start if there is none); Ctrl-C saves one and raises
    :class:`layerzo.errors.TuneInterrupted`. ``note`` receives one-line notes
    such as "resuming at step 12". A layer sweep passes the same ``prefix_cache``
    (frozen lower-layer outputs) and ``zero_shot_cache`` (base-model accuracies)
    to every run on ONE base model, so later runs skip work earlier ones did.
    ``read_paths`` names other files the run was configured from (the recipe):
    like the model, data and task files, OUT may not be, contain or sit inside them.
    The patch names a local base and data folder by their last path part only
    (plus the base fingerprint) unless ``record_paths``: pushed files carry no local paths.
    ``save="trajectory"`` writes a trajectory-only patch (no weight file; apply,
    load, eval and export rebuild the weights from the base).
    """
    if save not in SAVE_CHOICES:
        raise ConfigError(f"save must be one of {', '.join(SAVE_CHOICES)}, got {save!r}")
    # Under torchrun (WORLD_SIZE > 1) every rank runs this function; rank 0 alone writes (layerzo.zo.distributed).
    dp = data_parallel if data_parallel is not None else init_data_parallel(shard_batch=config.shard_batch)
    inputs = [config.model, config.data_dir, config.task, *read_paths]
    out, has_checkpoint = check_outputs(out_dir, overwrite, resume, inputs, note)
    with output_lock(out, "layerzo tune") if dp.is_main else contextlib.nullcontext():
        result = run_tune(config, out, dp, has_checkpoint, overwrite=overwrite, progress=progress, loaded=loaded,
                          resume=resume, note=note, prefix_cache=prefix_cache, zero_shot_cache=zero_shot_cache,
                          record_paths=record_paths, save_weights=save == "weights")
    if data_parallel is None:
        shutdown(dp)  # waits for rank 0's writes, then leaves the process group
    return result


def run_tune(config: TuneConfig, out: Path, dp: DataParallel, has_checkpoint: bool, *, overwrite: bool, progress: bool,
             loaded: LoadedModel | None, resume: bool, note: Callable[[str], None] | None,
             prefix_cache: SharedLowerOutputs | None, zero_shot_cache: ZeroShotCache | None,
             record_paths: bool, save_weights: bool = True) -> TuneResult:
    """:func:`tune` once its output is checked and locked: load, set up, train, finish."""
    t_start = time.perf_counter()
    splits = load_task(config.task, config.data_dir, num_train=config.num_train, num_dev=config.num_dev,
                       num_test=config.num_test, seed=config.seed)
    if not splits.train:
        raise TaskError(f"task {config.task!r} has no training examples")
    objective_name = resolve_objective(config.objective, generative=splits.generative, task=splits.name)
    if loaded is None:
        device, device_map = placement(dp, config.device, config.device_map)
        loaded = load_model(config.model, dtype=config.dtype, device=device, revision=config.revision,
                            trust_remote_code=config.trust_remote_code, device_map=device_map)
    if splits.chat:
        splits = render_chat(splits, loaded.tokenizer)
    generator = Generator(loaded.tokenizer, stop=splits.stop, max_new_tokens=config.max_new_tokens) \
        if splits.generative else None
    objective = Objective(objective_name, loaded.tokenizer, max_length=config.max_length, generator=generator)
    with tuned_model(config, loaded, splits, objective, note if dp.is_main else None) as tuned:
        config, lr_search = searched_lr(config, loaded, splits, objective, tuned, note if dp.is_main else None)
        dp.check_same("recipe, tuned layers and base weights",
                      f"{config_digest(config)}|{tuned.layers}|{weights_digest(tuned.params)}")
        dev, test = (dp.eval_set(lambda ex, share=share: eval_set(config, loaded.tokenizer, ex, generator, share), s)
                     for s, share in ((splits.dev, 0.5), (splits.test, 0.25)))
        identity = run_identity(config.to_dict(), tuned.layers, tuned.names, tuned.fingerprint)
        run = Run(config, out, dp, loaded, splits, tuned, dev, test, identity, prefix_cache, zero_shot_cache, t_start,
                  objective, note, record_paths, save_weights, lr_search)
        if dp.is_main and note:
            note_truncation(run, note)
        state = resume_state(run, note) if has_checkpoint else start_state(run, note if resume else None)
        try:
            diverged = train(run, state, progress)
            result = finish(run, state, diverged, overwrite)
        finally:  # a failed or interrupted run leaves no stray temp file
            metrics_path(run).unlink(missing_ok=True)
    if diverged is not None:
        raise DivergenceError(f"{diverged} — the best patch so far was written to {out}", diverged.hint)
    return result


def searched_lr(config: TuneConfig, loaded: LoadedModel, splits: TaskSplits, objective: Objective, tuned: Tuned,
                note: Callable[[str], None] | None) -> tuple[TuneConfig, dict | None]:
    """``--lr auto`` / ``--lr-search``: race the grid's rates on the tuned tensors; the run takes the winner.

    The search is deterministic (the run's seed and first training batches), so
    a resumed run searches again and finds the same rate: its identity matches.
    """
    spec = parse_lr_search(config.lr_search)
    if spec == "off":
        return config, None
    grid = lr_grid(sum(t.numel() for t in tuned.params.tensors)) if spec == "auto" else spec
    result = search_lr(loaded, objective, splits.train, splits.dev, tuned.params, tuned.first_cached, config.zo, grid,
                       RaceConfig(first_steps=first_round_steps(config.steps, len(grid), SEARCH_FRACTION),
                                  batch_size=config.batch_size, seed=config.seed))
    if note:
        note(f"--lr auto: {result.reason} ({result.seconds:.0f} s)")
    return config.replace(lr=result.lr), result.to_dict()


def eval_set(config: TuneConfig, tokenizer, examples: Sequence, generator: Generator | None, share: float):
    """A dev/test set: scored by accuracy (classification) or by greedy answers' F1/EM (generative tasks).

    A generative set may keep its prompts' lower-layer prefill across evaluations
    within ``share`` of the prefix-cache budget (dev: 1/2, evaluated every
    ``eval_every`` steps; test: 1/4, evaluated twice).
    """
    kw = {"batch_size": config.eval_batch_size, "max_length": config.max_length}
    if generator is None:
        return EvalSet(tokenizer, examples, **kw)
    return GenerativeEvalSet(tokenizer, examples, generator=generator, max_bytes=int(share * prefix_budget(config)),
                             **kw)


def prefix_budget(config: TuneConfig) -> int:
    """Bytes for kept lower-layer outputs: ``--prefix-cache-gb``, or a quarter of the RAM (at most 8 GiB)."""
    if not config.cache_lower_layers:
        return 0
    return default_example_cache_bytes() if config.prefix_cache_gb is None else int(config.prefix_cache_gb * 1024**3)


def note_truncation(run: Run, note: Callable[[str], None]) -> None:
    """Say how many examples exceed ``--max-length`` (their prompts are cut from the left), never silently."""
    config, tokenizer = run.config, run.loaded.tokenizer
    over = sum(len(tokenizer.encode(ex.context + ex.candidates[ex.label])) > config.max_length
               for ex in run.splits.train)
    cut = {"train": over, "dev": getattr(run.dev, "truncated", 0), "test": getattr(run.test, "truncated", 0)}
    if any(cut.values()):
        sizes = {"train": len(run.splits.train), "dev": run.dev.size, "test": run.test.size}
        parts = ", ".join(f"{n} of {sizes[k]} {k}" for k, n in cut.items() if n)
        room = f" ({config.max_new_tokens} kept for the answer)" if run.splits.generative else ""
        note(f"warning: {parts} examples are longer than --max-length {config.max_length}{room}: "
             "their prompts are cut from the left")


def check_outputs(out_dir: str | os.PathLike, overwrite: bool, resume: bool, inputs: Sequence,
                  note: Callable[[str], None] | None = None) -> tuple[Path, bool]:
    """Before any work: OUT is no input and (with ``overwrite``) only ever an earlier patch; its parent is writable.

    Returns the absolute output path and whether ``OUT.ckpt/`` holds a checkpoint to resume.
    """
    out = Path(out_dir).expanduser().absolute()
    plan = check_output(out, inputs=inputs, overwrite=overwrite, command="layerzo tune", markers=[MANIFEST_NAME])
    check_can_write(out)  # named by OUT, before check_writable's probe file could be the one named
    check_output(checkpoint_dir(out), inputs=inputs, overwrite=True, command="layerzo tune", markers=[STATE_JSON])
    has_checkpoint = check_checkpoint_dir(checkpoint_dir(out), resume=resume, overwrite=overwrite)
    check_writable(out.parent)  # a read-only or full disk fails now, not after training
    if plan.replaces and note:
        note(plan.note("layerzo tune"))
    return out, has_checkpoint


def resolve_layers(config: TuneConfig, loaded: LoadedModel, splits: TaskSplits | None = None,
                   objective: Objective | None = None,
                   note: Callable[[str], None] | None = None) -> tuple[tuple[int, ...], dict | None]:
    """``--layers`` → sorted layer indices (+ the selection report for ``dominant`` and ``auto``).

    ``auto`` needs the run's ``splits`` and ``objective`` (the race trains on them).
    """
    spec = parse_layer_spec(config.layers, loaded.layout.num_layers)
    if spec == "all":
        return tuple(range(loaded.layout.num_layers)), None
    if spec not in ("dominant", "auto"):
        return spec, None  # type: ignore[return-value]
    if spec == "dominant" and config.select == "sensitivity":
        sens = task_sensitivity(loaded, config.task, config.data_dir, batch_size=config.batch_size,
                                max_length=config.max_length, num_train=config.num_train, seed=config.seed,
                                objective=config.objective)
        return (sens.pick,), {"dominant_layer": sens.pick, "selection": "sensitivity", "reason": sens.reason,
                              "sensitivity": sens.to_dict(timings=False)}
    texts = calibration_texts(config.task, config.data_dir, n=ProfileConfig().num_sequences, seed=config.seed)
    report = profile_model(
        loaded.model, loaded.tokenizer, texts, ProfileConfig(), loaded.layout,
        model_name=loaded.source.name, calibration=f"task {config.task} (training inputs, seed {config.seed})",
    ).to_dict()
    if spec == "dominant":
        return (int(report["pick"]["layer"]),), report
    if splits is None or objective is None:
        raise ConfigError("--layers auto races candidate layers on the task: it needs the run's data and objective")
    return auto_layer(config, loaded, splits, objective, report, note)


def auto_layer(config: TuneConfig, loaded: LoadedModel, splits: TaskSplits, objective: Objective, outlier: dict,
               note: Callable[[str], None] | None) -> tuple[tuple[int, ...], dict]:
    """``--layers auto``: rank candidates (outlier and sensitivity picks, their alternatives, the last layer), race them."""
    ranking = sensitivity_ranking(loaded, objective, splits.train, batch_size=config.batch_size, seed=config.seed)
    candidates = candidate_layers(outlier, ranking, loaded.layout.num_layers)
    if note:
        note("--layers auto: racing layers " + ", ".join(f"{c.layer} ({', '.join(c.sources)})" for c in candidates))
    result = race(loaded, objective, splits.train, splits.dev, candidates, config.zo,
                  RaceConfig(first_steps=first_round_steps(config.steps, len(candidates), LAYER_RACE_FRACTION),
                             batch_size=config.batch_size, seed=config.seed))
    layer, reason = race_choice(result, int(outlier["pick"]["layer"]))
    if note:
        note(f"--layers auto: {reason} ({result.seconds:.0f} s)")
    return (layer,), {"dominant_layer": layer, "selection": "auto", "reason": reason, "race": result.to_dict(),
                      "sensitivity_ranking": ranking, "outlier_profile": outlier}


@contextmanager
def tuned_model(config: TuneConfig, loaded: LoadedModel, splits: TaskSplits | None = None,
                objective: Objective | None = None, note: Callable[[str], None] | None = None) -> Iterator[Tuned]:
    """Select and prepare the tuned tensors; on exit the model's structure is as it was.

    The BASE fingerprint is taken from the original-precision weights, before
    any cast. A low-precision model's tuned layers run as fp32 masters (their
    values would not move in bf16) and are cast back to the model's dtype at
    the end; LoRA adapters are removed at the end (the patch holds them).
    """
    model, layout = loaded.model, loaded.layout
    layers, profile = resolve_layers(config, loaded, splits, objective, note)
    check_tuned_placement(model, layout, layers)  # before anything reads the tuned weights
    model_dtype = next(model.parameters()).dtype
    state = dict(model.named_parameters())
    modules = [get_layer(model, layout, i) for i in layers]
    try:
        if config.lora:
            names = add_lora(model, layout, layers, r=config.lora_rank, alpha=config.lora_alpha, seed=config.seed)
            fingerprint = {n: tensor_sha256(state[n]) for n in lora_base_names(names)}
            in_model = [model_parameter_name(n) for n in names]  # peft's names carry the adapter name
            masters = fp32_master_layers([], model_dtype)
        else:
            names = [n for i in layers for n in layer_parameter_names(model, layout, i)]
            fingerprint = {n: tensor_sha256(state[n]) for n in names}
            in_model = names
            masters = fp32_master_layers(modules, model_dtype)
        with masters:
            # Lower layers may be cached only if nothing below the first tuned layer is tuned.
            first_cached = min(layers) if config.cache_lower_layers else 0
            yield Tuned(layers, names, TunedParams.from_model(model, in_model), fingerprint, profile, first_cached)
    finally:
        remove_lora(model)
        for module in modules:
            module.to(model_dtype)  # no-op in float32; a bf16 model gets its bf16 layers back


def start_state(run: Run, note: Callable[[str], None] | None) -> LoopState:
    """A fresh run: zero-shot dev/test accuracy of the base model; the best weights so far are the base."""
    config = run.config
    if note:
        note(f"no checkpoint in {run.ckpt_dir}: starting from step 0")
    if run.note and run.dp.is_main and run.splits.generative:  # minutes of decoding on a CPU: say so
        run.note(f"zero-shot: greedy answers for {run.dev.size} dev + {run.test.size} test examples "
             f"(at most {config.max_new_tokens} new tokens each)")
    with torch.no_grad():
        dev, test = (run.zero_shot_cache.scores(s, lambda s=s: run.scores(s)) if run.zero_shot_cache
                     else run.scores(s) for s in (run.dev, run.test))
    zero_shot = tuple(None if d is None else d[run.dev.metric] for d in (dev, test))
    if run.splits.generative:
        zero_shot += tuple(None if d is None else d["em"] for d in (dev, test))
    zs_dev = zero_shot[0]
    best = {"dev_acc": zs_dev, "step": 0, "weights": run.tuned.params.state(), "trajectory_len": 0}
    return LoopState(zo=ZOState(), seed_rng=random.Random(config.seed),  # private: never the global RNG
                     batches=train_batches(len(run.splits.train), config.batch_size, config.seed),
                     best=best, zero_shot=zero_shot, last_dev=zs_dev)


def resume_state(run: Run, note: Callable[[str], None] | None) -> LoopState:
    """Every piece of loop state back exactly as the checkpoint saved it."""
    config, params = run.config, run.tuned.params
    resumed = load_checkpoint(run.ckpt_dir)
    check_resumable(run.ckpt_dir, resumed, run.identity, config.steps, params)
    params.load(resumed.params)
    device_of = [t.device for t in params.tensors]
    seed_rng = random.Random(config.seed)
    seed_rng.setstate(resumed.seed_rng)
    try:
        batches = TrainBatches(len(run.splits.train), config.batch_size, config.seed, *resumed.batches)
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {run.ckpt_dir} does not fit this task's data: {exc}") from None
    if note:
        note(f"resuming {run.out.name} from the checkpoint at step {resumed.step} of {config.steps}")
    return LoopState(
        zo=ZOState(step=resumed.step, bad_in_row=resumed.bad_in_row,
                   momentum={i: m.to(device_of[i]) for i, m in resumed.momentum.items()}),
        seed_rng=seed_rng, batches=batches, best={**resumed.best, "weights": resumed.best_weights},
        zero_shot=resumed.zero_shot, last_dev=resumed.last_dev, trajectory=list(resumed.trajectory),
        rows=list(resumed.rows), rejected=resumed.rejected,
        earlier={"step_seconds": 0.0, "train_seconds": 0.0, "wall_seconds": 0.0,
                 **{k: float(v) for k, v in resumed.seconds.items()
                    if k in ("step_seconds", "train_seconds", "wall_seconds")}})


# ----------------------------------------------------------------------------- the loop
def train(run: Run, state: LoopState, progress: bool) -> DivergenceError | None:
    """The ZO steps, from the state's step to ``config.steps``; returns the divergence that stopped it, if any."""
    config, dp, model, layout = run.config, run.dp, run.loaded.model, run.loaded.layout
    zo_options = {"total_steps": config.steps, "z_cache_max_bytes": z_cache_budget(model)}  # one layer keeps z
    bar = TuneProgress(config.steps, enabled=progress and dp.is_main, start=state.zo.step)
    stop = StopOnInterrupt(enabled=not dp.active)  # Ctrl-C: finish the step, checkpoint, stop
    run.out.parent.mkdir(parents=True, exist_ok=True)
    state.t_train = time.perf_counter()
    paired = uses_paired_forward(config, run.tuned.layers)
    with open(metrics_path(run), "w", encoding="utf-8") as log, bar, torch.no_grad(), stop:
        examples = example_cache(run)
        log.writelines(json_line(r) for r in state.rows)
        for step in range(state.zo.step, config.steps):
            t0 = time.perf_counter()
            batch = run.objective.encode(dp.shard([run.splits.train[i] for i in next(state.batches)]))
            step_seed = state.seed_rng.getrandbits(63)
            try:
                with run.objective.step_loss(model, layout, run.tuned.first_cached, batch, run.prefix_cache,
                                             examples, paired=paired) as loss:
                    result = dp.zo_step(run.tuned.params, loss, step_seed, config.zo, state.zo, pair_loss=loss.pair,
                                        **zo_options)
            except DivergenceError as exc:
                state.rejected += 1  # the step that tipped the streak was rejected too
                return exc
            if result.applied:
                state.trajectory.append(TrajectoryStep(step=step, seeds=result.seeds, grads=result.grads, lr=result.lr))
            else:
                state.rejected += 1
            row = step_row(step, result, time.perf_counter() - t0, examples)
            state.step_seconds += row["seconds"]
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                evaluate_dev(run, state, row, step + 1)
            line = json_line(row)
            log.write(line)
            log.flush()
            state.rows.append(json.loads(line))
            bar.advance(row["loss_plus"], state.last_dev, step + 1, state.step_seconds, row.get("prefix_cache_hit_rate"))
            checkpoint_if_due(run, state, step + 1, stop.requested)
            state.prefix_cache = examples.stats() if examples is not None else None
    return None


def uses_paired_forward(config: TuneConfig, layers: Sequence[int]) -> bool:
    """Whether the steps evaluate + and − as one forward of 2B rows (``--paired-forward``, else the device's default).

    It applies to one tuned layer read from the per-example cache (the layers above
    are frozen, so they can take both signs' rows at once); elsewhere it is ignored.
    """
    chosen = config.paired_forward if config.paired_forward is not None else \
        PAIRED_FORWARD_DEFAULT.get(config.device.split(":")[0], False)
    return chosen and len(layers) == 1


def example_cache(run: Run) -> ExampleCache | None:
    """The run's per-example cache of the frozen lower layers' output (None when it does not apply).

    Filled before the first step of this process, for the examples the run will
    draw (fresh or resumed: the same values, so a resumed run writes the same bytes). A sweep's cross-run
    :class:`SharedLowerOutputs` takes its place: it makes each deeper run
    cost one more layer per batch instead of a whole lower stack.
    """
    config = run.config
    if run.prefix_cache is not None or not config.cache_lower_layers:
        return None
    budget = prefix_budget(config)
    visited = visited_examples(len(run.splits.train), config.batch_size, config.seed, config.steps)
    cache = run.objective.example_cache(run.loaded.model, run.loaded.layout, run.tuned.first_cached,
                                        [run.splits.train[i] for i in visited], batch_size=config.eval_batch_size,
                                        max_bytes=budget)
    if cache is not None and cache.gave_up and run.note and run.dp.is_main:
        run.note(f"the lower layers' outputs of {len(run.splits.train)} training examples exceed --prefix-cache-gb "
                 f"{budget / 1024**3:.2f}: every step recomputes them")
    return cache


def step_row(step: int, result, seconds: float, examples: ExampleCache | None = None) -> dict:
    """The metrics.jsonl row of one ZO step (means over the step's directions, and the cache's state)."""
    cache = {} if examples is None else {"prefix_cache_hit_rate": examples.stats()["hit_rate"],
                                         "prefix_cache_bytes": examples.bytes}
    return {
        "step": step + 1,
        "loss_plus": sum(result.losses_plus) / len(result.losses_plus),
        "loss_minus": sum(result.losses_minus) / len(result.losses_minus),
        "grad": sum(result.grads) / len(result.grads),
        "lr": result.lr,
        "applied": result.applied,
        "seconds": seconds,  # the ZO step alone (evaluation excluded)
        **cache,
    }


def evaluate_dev(run: Run, state: LoopState, row: dict, done: int) -> None:
    """Dev accuracy after ``done`` steps; keeps the weights if they are the best so far."""
    t_eval = time.perf_counter()
    params = run.tuned.params
    if run.dev.size:
        scores = run.scores(run.dev)
        state.last_dev = scores[run.dev.metric]
        row.update({f"dev_{k}": v for k, v in sorted(scores.items())})
        if state.best["dev_acc"] is None or state.last_dev > state.best["dev_acc"]:
            state.best = {"dev_acc": state.last_dev, "step": done, "weights": params.state(),
                          "trajectory_len": len(state.trajectory)}
    elif done == run.config.steps:  # no dev set: the final weights are the result
        state.best = {"dev_acc": None, "step": done, "weights": params.state(), "trajectory_len": len(state.trajectory)}
    row["eval_seconds"] = time.perf_counter() - t_eval


def checkpoint_if_due(run: Run, state: LoopState, done: int, stop_requested: bool) -> None:
    """Every ``checkpoint_every`` steps, and on Ctrl-C (then raise :class:`TuneInterrupted`)."""
    every = run.config.checkpoint_every
    due = every and done % every == 0
    if done < run.config.steps and (due or stop_requested):
        if run.dp.is_main:
            save_checkpoint(run.ckpt_dir, snapshot(run, state, done))
        if stop_requested:
            raise TuneInterrupted(f"interrupted after step {done} of {run.config.steps}; checkpoint saved to "
                                  f"{run.ckpt_dir}", run.ckpt_dir, done, "run the same command with --resume")


def snapshot(run: Run, state: LoopState, done: int) -> Checkpoint:
    best = state.best
    now = time.perf_counter()
    return Checkpoint(
        identity=run.identity, step=done, params=run.tuned.params.state(), best_weights=best["weights"],
        best={k: best[k] for k in ("dev_acc", "step", "trajectory_len")}, momentum=dict(state.zo.momentum),
        bad_in_row=state.zo.bad_in_row, seed_rng=state.seed_rng.getstate(),
        batches=(state.batches.epoch, state.batches.position), trajectory=state.trajectory, rows=state.rows,
        zero_shot=state.zero_shot, last_dev=state.last_dev, rejected=state.rejected,
        seconds={"step_seconds": state.earlier["step_seconds"] + state.step_seconds,
                 "train_seconds": state.earlier["train_seconds"] + now - state.t_train,
                 "wall_seconds": state.earlier["wall_seconds"] + now - run.t_start})


def metrics_path(run: Run) -> Path:
    """Where metrics.jsonl is streamed during the run (beside OUT; other ranks log aside and delete it)."""
    rank_tag = "" if run.dp.is_main else f".rank{run.dp.rank}"  # the pid: a later run removes a killed run's file
    return run.out.parent / f".{run.out.name}.{os.getpid()}.{METRICS_NAME}{rank_tag}.tmp"


def json_line(obj: dict) -> str:
    """One strict-JSON line; a non-finite loss/grad of a rejected step is written as null."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in obj.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


# ----------------------------------------------------------------------------- the finish
def finish(run: Run, state: LoopState, diverged: DivergenceError | None, overwrite: bool) -> TuneResult:
    """Test accuracy of the best weights, then the patch, metrics.jsonl and the checkpoint's removal."""
    train_seconds = state.earlier["train_seconds"] + time.perf_counter() - state.t_train
    step_seconds = state.earlier["step_seconds"] + state.step_seconds
    if run.config.keep == "last":  # the final weights are the result, whatever their dev accuracy
        state.best = {"dev_acc": state.last_dev if run.dev.size else None, "step": state.zo.step,
                      "weights": run.tuned.params.state(), "trajectory_len": len(state.trajectory)}
    run.tuned.params.load(state.best["weights"])
    with torch.no_grad():  # step 0's best weights ARE the base: its test scores are the zero-shot ones
        test = (None if diverged is not None or not run.test.size else
                {run.test.metric: state.zero_shot[1], **({"em": state.zero_shot[3]} if run.splits.generative else {})}
                if state.best["step"] == 0 else run.scores(run.test))
    wall = state.earlier["wall_seconds"] + time.perf_counter() - run.t_start
    metrics = run_metrics(run, state, test, diverged)
    timing = {
        "wall_seconds": round(wall, 3), "train_seconds": round(train_seconds, 3),
        "step_seconds": round(step_seconds, 3),  # ZO steps only; train_seconds adds the dev evaluations
        "steps_per_second": round(state.zo.step / step_seconds, 4) if step_seconds > 0 else None,
        "prefix_cache": state.prefix_cache,  # timing-related, like the seconds: not in the patch
    }
    if run.dp.active:
        metrics["distributed"] = {**run.dp.summary(run.config.zo.q),
                                  "rank_weights_sha256": run.dp.check_final_weights(run.tuned.params)}
    if metrics["no_op"] and diverged is None and run.dp.is_main and run.note:  # a divergence says it all
        run.note(f"warning: {no_op_reason(metrics)}; the patch equals the base model. "
                 "Try more --steps, another --lr/--eps, or --keep last (the final weights)")
    if run.dp.is_main:
        write_patch(run, metrics, state.trajectory[: state.best["trajectory_len"]], overwrite)
        os.replace(metrics_path(run), run.out / METRICS_NAME)
        remove_checkpoint(run.ckpt_dir)  # the patch now holds the result
    return TuneResult(run.out, run.tuned.layers, {**metrics, **timing})


def run_metrics(run: Run, state: LoopState, test: dict | None, diverged: DivergenceError | None) -> dict:
    """Only deterministic values: the patch files are byte-identical for the same seed, interrupted or not.

    Scores are named by the task's metric: ``*_acc`` for classification;
    ``*_f1`` (best-dev selection) plus ``*_em`` for generative tasks, which
    also record ``metric``, ``objective`` and ``max_new_tokens``.
    """
    params, m = run.tuned.params, run.dev.metric
    test = test or {}
    generative = {"metric": m, "objective": run.objective.name, "max_new_tokens": run.config.max_new_tokens,
                  "zero_shot_dev_em": state.zero_shot[2], "zero_shot_test_em": state.zero_shot[3],
                  "test_em": test.get("em")} if run.splits.generative else {}
    return {
        **generative,
        **({"lr_search": run.lr_search} if run.lr_search else {}),
        f"zero_shot_dev_{m}": state.zero_shot[0], f"zero_shot_test_{m}": state.zero_shot[1],
        f"best_dev_{m}": state.best["dev_acc"], "best_step": state.best["step"], f"last_dev_{m}": state.last_dev,
        f"test_{m}": test.get(m),
        "steps": state.zo.step, "applied_steps": state.zo.step - state.rejected, "rejected_steps": state.rejected,
        "num_train": len(run.splits.train), "num_dev": run.dev.size, "num_test": run.test.size,
        "diverged": diverged.one_line() if diverged else None,
        "kept": run.config.keep,
        # the patch's weights are the base's when the kept step is step 0 or every step before it was rejected
        "no_op": state.best["trajectory_len"] == 0,
        "replay": {"rng": RNG_ALGORITHM, "z_dtype": str(Z_DTYPE).removeprefix("torch."),
                   "device_type": next(iter(params.tensors)).device.type, "tensor_order": list(run.tuned.names),
                   "master_dtype": "float32"},
    }


def no_op_reason(metrics: dict) -> str:
    """Why a patch equals its base, in words."""
    name = metrics.get("metric", "acc")
    zero_shot = metrics[f"zero_shot_dev_{name}"]
    if metrics["kept"] == "best" and metrics["best_step"] == 0 and zero_shot is not None:
        what = "accuracy" if name == "acc" else name.upper()
        return f"no step beat the zero-shot dev {what} ({100 * zero_shot:.1f}%) in {metrics['steps']} steps"
    return f"none of the {metrics['steps']} steps up to the kept one was applied"


def public_recipe(config: TuneConfig, record_paths: bool) -> dict:
    """The manifest's recipe: local paths (model, data folder, task file) reduced to their names unless asked."""
    recipe = config.recipe()
    if not record_paths:
        for key in ("model", "data_dir", "task"):
            recipe[key] = public_path_name(recipe[key])
    return recipe


def write_patch(run: Run, metrics: dict, trajectory: list, overwrite: bool) -> None:
    config, loaded, tuned = run.config, run.loaded, run.tuned
    tensors = {n: t.detach().to("cpu").clone() for n, t in zip(tuned.names, tuned.params.tensors)}  # patch names
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    model_config = getattr(loaded.model, "config", None)
    archs = getattr(model_config, "architectures", None) or [type(loaded.model).__name__]
    manifest = PatchManifest(
        format_version=FORMAT_VERSION, layerzo_version=__version__,
        base_model=loaded.source.name if run.record_paths else loaded.source.public_name,
        base_revision=config.revision,
        architecture=archs[0], num_layers=loaded.layout.num_layers, layers=tuple(tuned.layers),
        kind="lora" if config.lora else "layers", dtype=dtypes.pop(),
        base_fingerprint=tuned.fingerprint, profile=tuned.profile, metrics=metrics,
        recipe=public_recipe(config, run.record_paths),  # without checkpoint_every: it changes no result
        layer_path=loaded.layout.path,
        lora={"r": config.lora_rank, "alpha": config.lora_alpha, "target_modules": ["q_proj", "v_proj"]}
        if config.lora else None,
    )
    # An empty existing folder passed the up-front check: replacing it is not an overwrite.
    LayerPatch(manifest, tensors, trajectory).save_pretrained(run.out, overwrite=overwrite or run.out.exists(),
                                                              weights=run.save_weights)


class TuneProgress(StderrBar):
    """tune's progress: loss, last dev accuracy, steps/s (this process's ZO steps; a resumed run starts at ``start``)."""

    def __init__(self, total: int, enabled: bool, start: int = 0) -> None:
        super().__init__("tune", total, enabled, unit="step", start=start)

    def advance(self, loss: float, dev_acc: float | None, done: int, seconds: float,
                cache_hit_rate: float | None = None) -> None:
        dev = f"{dev_acc:.3f}" if dev_acc is not None else "-"
        rate = f"{(done - self.start) / seconds:.2f}" if seconds > 0 else "-"
        cache = f"  cache {100 * cache_hit_rate:.0f}%" if cache_hit_rate is not None else ""
        self.update(completed=done, info=f"loss {loss:.4f}  dev {dev}  {rate} steps/s{cache}")
