"""Layer sweep: ZO-tune every decoder layer ALONE with one recipe, plus the whole-model MeZO baseline.

The question it answers: is the layer ``profile`` picks (the first
massive-activation layer) the one worth tuning? For each task:

1. profile the base model once (the pick is marked, never used to choose);
2. for each layer ``i`` in ``--layers``: :func:`layerzo.tune.loop.tune` with
   ``layers=i`` and the same recipe and seed (same batches, same direction
   seeds), then restore layer ``i`` from a snapshot and CHECK it is
   bit-identical (``torch.equal`` + ``tensor_sha256`` against the base), so
   every run starts from the same base model in one process; the frozen
   layers' outputs carry over from run to run
   (:func:`layerzo.model.prefix_cache.shared_lower_outputs`), so run ``i`` runs only
   layer ``i-1`` below itself, once per batch;
3. the whole-model baseline (``layers=all``, MeZO) with its own ``full_lr`` — or
   a grid of rates (``full_lr="auto"``: ``tune --lr auto``'s :func:`lr_grid` for
   the whole decoder; or a list), each run in full and the best dev reported, so
   the baseline is not handicapped by a guessed rate;
4. one record per run appended to ``DIR/sweep.jsonl`` (rewritten atomically),
   so ``--resume`` skips runs already recorded with the same recipe.

``full_lr`` default: ``lr / num_layers``. A ZO-SGD step's noise grows with the
number of tuned weights d (E|Δθ|² ∝ lr²·d), so the stable lr scales like 1/d;
the whole decoder has num_layers times the weights of one layer. With the demo
recipe (lr 1e-3 on one 3.5M-weight layer) this gives 3.3e-5 for the 106M
decoder weights; the same rule lands on MeZO's 1e-6..1e-7 for OPT-13B.

Selection follows MeZO/tune: the reported test accuracy is that of the
best-dev checkpoint (step 0 = the base model included); ``final_dev_acc`` is
the last weights' dev accuracy. Generative tasks (SQuAD) are swept by tune's
score for them, F1 (best-dev selection), with EM alongside: their records name it
(``metric``) and keep it in the same ``*_acc`` fields, so ranking, resume and
reports are one code path. ``final_loss`` is the mean of (L+ + L−)/2 over
the last ``max(1, steps // 10)`` steps (one batch's loss is too noisy).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from layerzo.core.atomic import atomic_write_text, check_can_write, check_file_output
from layerzo.core.hashing import combine_sha256, tensor_sha256
from layerzo.core.progress import StderrBar
from layerzo.data.generation import DEFAULT_MAX_NEW_TOKENS
from layerzo.data.tasks import get_task, load_task
from layerzo.errors import (ConfigError, DivergenceError, LayerIndexError, LayerzoError, OutputExistsError,
                            OutputPathError)
from layerzo.model.layers import layer_parameter_names, parse_layer_spec
from layerzo.model.loading import load_model
from layerzo.patch.manifest import MANIFEST_NAME
from layerzo.sweep.report import append_record, full_rate, rate_key, read_records, summarize, write_outputs
from layerzo.tune.batches import ZeroShotCache
from layerzo.tune.config import TuneConfig
from layerzo.tune.loop import METRICS_NAME, resolve_layers, tune
from layerzo.tune.lr_search import lr_grid
from layerzo.model.prefix_cache import SharedLowerOutputs

FULL = "all"  # layer key of the whole-model MeZO baseline
RECORDS_NAME = "sweep.jsonl"
RESULT_FIELDS = ("pick", "dev_acc", "test_acc", "loss_curve")  # two copies of one run must agree on these
RECIPE_KEYS = ("model", "data_dir", "steps", "batch_size", "lr", "full_lr", "eps", "seed", "eval_every",
               "num_train", "num_dev", "num_test", "eval_batch_size", "max_length", "device")
# Recipe keys sweeps gained later, with the value the older records ran at (float32 only, auto objective,
# MeZO's 50 new tokens): recorded only when they differ.
LATER_RECIPE_KEYS = {"dtype": "float32", "objective": "auto", "max_new_tokens": DEFAULT_MAX_NEW_TOKENS}
# The sweep's own defaults for the runs' recipe (short runs, smaller eval sets than a real tune).
SWEEP_TUNE_DEFAULTS = TuneConfig.from_dict({"steps": 100, "lr": 1e-3, "eval_every": 50, "num_dev": 200,
                                            "num_test": 500, "eval_batch_size": 32, "max_length": 128})


@dataclass(frozen=True)
class SweepConfig:
    """Options of ``layerzo sweep``: the runs' recipe (a :class:`TuneConfig`) and what to sweep.

    ``tune.layers`` is ignored (each run sets its own); ``tune.task`` neither (``tasks`` are swept).
    """

    tasks: tuple[str, ...] = ("sst2",)
    layers: str = "all"  # "all" | "0-29" | "3,7" | "0-3,11": each tuned ALONE
    full: bool = True  # also run the whole-model MeZO baseline
    # None: lr / num_layers (module docstring); a rate; several rates (a grid: each runs, the best dev is
    # reported); "auto": lr_grid() of the whole decoder's weights, the grid of tune --lr auto.
    full_lr: float | tuple[float, ...] | str | None = None
    tune: TuneConfig = SWEEP_TUNE_DEFAULTS

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str) or not self.tasks or not all(isinstance(t, str) and t for t in self.tasks):
            raise ConfigError(f"tasks must be a non-empty list of task names, got {self.tasks!r}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks lists a task twice: {','.join(self.tasks)}")
        if isinstance(self.full_lr, list):  # from YAML / JSON
            object.__setattr__(self, "full_lr", tuple(self.full_lr))
        rates = self.full_lr if isinstance(self.full_lr, tuple) else (self.full_lr,)
        if self.full_lr is not None and self.full_lr != "auto" and not (
                rates and len(set(rates)) == len(rates)
                and all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0
                        for r in rates)):
            raise ConfigError(f"full_lr must be a positive number, a list of distinct ones, auto, or None for "
                              f"lr / num_layers; got {self.full_lr!r}")
        if not isinstance(self.tune, TuneConfig):
            raise ConfigError(f"tune must be a TuneConfig, got {type(self.tune).__name__}")
        if str(self.layers).strip().lower() != "all":
            layer_ranges(self.layers, 10**6)  # syntax only; the range is checked against the model later

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SweepConfig":
        """From flat keys: the sweep's own fields, the rest recipe keys of the runs (over the sweep's defaults)."""
        own = {f.name for f in dataclasses.fields(cls)} - {"tune"}
        runs = SWEEP_TUNE_DEFAULTS.replace(**{k: v for k, v in values.items() if k not in own})
        return cls(**{k: v for k, v in values.items() if k in own}, tune=runs)

    def full_rates(self, num_layers: int, decoder_weights: int) -> tuple[float, ...]:
        """The rates of the whole-model runs, for a model of ``num_layers`` decoder layers of ``decoder_weights``."""
        if self.full_lr is None:
            return (self.tune.zo.lr / num_layers,)
        if self.full_lr == "auto":
            return lr_grid(decoder_weights)
        return tuple(float(r) for r in self.full_lr) if isinstance(self.full_lr, tuple) else (float(self.full_lr),)

    def resolved(self, num_layers: int, decoder_weights: int) -> "SweepConfig":
        """This config with ``full_lr`` as the tuple of :meth:`full_rates` (what the records and reports show)."""
        return dataclasses.replace(self, full_lr=self.full_rates(num_layers, decoder_weights))

    def _full_lr_value(self, num_layers: int) -> float | list[float]:
        rates = self.full_rates(num_layers, 0) if self.full_lr != "auto" else None
        if rates is None:
            raise ConfigError("full_lr auto needs the model: use SweepConfig.resolved() first")
        return rates[0] if len(rates) == 1 else list(rates)  # one rate: a number, as sweeps always recorded it

    def recipe(self, num_layers: int) -> dict[str, Any]:
        """What makes two runs comparable (resume refuses a record whose recipe differs)."""
        flat = self.tune.to_dict()
        d = {k: (self._full_lr_value(num_layers) if k == "full_lr" else flat[k]) for k in RECIPE_KEYS}
        # keys added after the first sweeps are recorded only off their default, so those sweeps stay resumable
        for key, default in LATER_RECIPE_KEYS.items():
            if flat[key] != default:
                d[key] = flat[key]
        return d

    def to_dict(self, num_layers: int) -> dict[str, Any]:
        """Flat: the sweep's own fields (``full_lr`` resolved), then the runs' recipe keys."""
        own = {"tasks": list(self.tasks), "layers": self.layers, "full": self.full,
               "full_lr": self._full_lr_value(num_layers)}
        return {**own, **{k: v for k, v in self.tune.to_dict().items() if k not in ("task", "layers")}}

    def tune_config(self, task: str, layer: int | str, num_layers: int, full_lr: float | None = None) -> TuneConfig:
        """The :class:`TuneConfig` of one run (``layer`` an index or :data:`FULL`, at ``full_lr``: default the first
        of :meth:`full_rates`)."""
        full = layer == FULL
        lr = (full_lr if full_lr is not None else self.full_rates(num_layers, 0)[0]) if full else self.tune.zo.lr
        return self.tune.replace(task=task, layers="all" if full else str(layer), lr=lr,
                                 eval_every=min(self.tune.eval_every, self.tune.steps))


def parse_full_lr(value: str | None) -> float | tuple[float, ...] | str | None:
    """``--full-lr``: absent (lr / num_layers), ``auto`` (the lr grid), a rate, or a comma list of rates."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text == "auto":
        return text
    try:
        rates = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--full-lr must be auto, a learning rate or a comma list of them, got {value!r}") from None
    return rates[0] if len(rates) == 1 else rates


def layer_ranges(spec: str, num_layers: int) -> tuple[int, ...]:
    """``all`` | ``0-29`` | ``3,7`` | ``0-3,11`` → sorted distinct indices (one parser: layers.parse_layer_spec)."""
    resolved = parse_layer_spec(str(spec), num_layers)
    if resolved == "all":
        return tuple(range(num_layers))
    if isinstance(resolved, str):
        raise LayerIndexError(f"--layers must be 'all', a range like 0-29 or a list like 3,7; got {spec!r}")
    return resolved


# ----------------------------------------------------------------------------- recipe check (resume)
def check_recipe(records: Sequence[dict], recipe: dict, path: Path) -> None:
    """Refuse to resume over records made with a different recipe (names the first differing key).

    ``full_lr`` is not compared: each whole-model record carries its own rate and
    no layer run depends on it, so a sweep can take more rates of the baseline later.
    """
    for rec in records:
        old = rec.get("recipe", {})
        for key in [*recipe, *(k for k in old if k not in recipe)]:
            if key == "full_lr":
                continue
            if old.get(key) != recipe.get(key):
                raise ConfigError(
                    f"{path} was made with {key}={old.get(key)!r} but this run has {key}={recipe.get(key)!r}",
                    "rerun with the same options, or choose another --out",
                )


# ----------------------------------------------------------------------------- exact restore
def snapshot(model: torch.nn.Module, layout, layers: Sequence[int]) -> dict[str, torch.Tensor]:
    """Copies (on CPU) of every parameter of ``layers``, by state-dict name."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu", copy=True) for i in layers for n in layer_parameter_names(model, layout, i)}


def restore(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> str:
    """Copy ``saved`` back into the model and verify bit-equality; returns the sha256 of the restored tensors."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved.items():
            p = params[name]
            if p.dtype != value.dtype:  # a run changed the storage dtype: put the original back
                p.data = value.to(p.device, copy=True)
            else:
                p.copy_(value)
    bad = [n for n, v in saved.items() if not torch.equal(params[n].detach().cpu(), v)]
    if bad:
        raise LayerzoError(f"restoring {bad[0]} after a sweep run did not give back the base tensor bit for bit")
    return combine_sha256(f"{n}:{tensor_sha256(params[n])}" for n in saved)


def layer_sha256(model: torch.nn.Module, layout, layers: Sequence[int]) -> str:
    params = dict(model.named_parameters())
    return combine_sha256(f"{n}:{tensor_sha256(params[n])}" for i in layers for n in layer_parameter_names(model, layout, i))


# ----------------------------------------------------------------------------- one run
def run_one(config: SweepConfig, task: str, layer: int | str, loaded, work: Path, base_sha: str,
            prefix_cache: SharedLowerOutputs | None = None, zero_shot_cache: ZeroShotCache | None = None,
            full_lr: float | None = None) -> dict:
    """Tune one layer (or the whole model) with :func:`layerzo.tune.loop.tune`, restore exactly, return its record.

    ``prefix_cache`` and ``zero_shot_cache`` carry frozen lower-layer outputs and
    base-model accuracies from run to run (valid because every run restores the base).
    """
    n = loaded.layout.num_layers
    layers = list(range(n)) if layer == FULL else [int(layer)]
    saved = snapshot(loaded.model, loaded.layout, layers)
    out = work / f"{task}-{layer}"
    run_config = config.tune_config(task, layer, n, full_lr)
    t0 = time.perf_counter()
    try:
        result = tune(run_config, out, overwrite=True, progress=False, loaded=loaded,
                      prefix_cache=prefix_cache, zero_shot_cache=zero_shot_cache)
        metrics, diverged = result.metrics, None
    except DivergenceError as exc:  # tune wrote its best patch + metrics before raising: record it, go on
        metrics, diverged = json.loads((out / MANIFEST_NAME).read_text())["metrics"], exc.one_line()
    finally:  # whatever happened, the next run (or the caller) gets the base weights back
        restored = restore(loaded.model, saved)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines() if line.strip()]
    shutil.rmtree(out, ignore_errors=True)  # the sweep keeps numbers, not patches
    if restored != base_sha:
        raise LayerzoError(f"layer(s) {layer} of the model differ from the base after restore (sha256 mismatch)")
    return _record(task, layer, run_config.zo.lr, metrics, rows, wall, restored, diverged)


def _mean_loss(row: dict) -> float | None:
    lp, lm = row.get("loss_plus"), row.get("loss_minus")
    return None if lp is None or lm is None else (lp + lm) / 2


def _record(task, layer, lr: float, m: dict, rows: list[dict], wall: float, restored: str, diverged) -> dict:
    curve = [_mean_loss(r) for r in rows]
    tail = [v for v in curve[-max(1, len(curve) // 10):] if v is not None]
    name = m.get("metric", "acc")  # tune names scores by the task's metric; a record's *_acc fields hold that score
    return {
        "kind": "full" if layer == FULL else "layer", "task": task, "layer": layer, "lr": lr,
        **({"metric": name, "test_em": m.get("test_em")} if name != "acc" else {}),
        "zero_shot_dev_acc": m.get(f"zero_shot_dev_{name}"), "zero_shot_test_acc": m.get(f"zero_shot_test_{name}"),
        "dev_acc": m.get(f"best_dev_{name}"), "test_acc": m.get(f"test_{name}"), "best_step": m.get("best_step"),
        "final_dev_acc": m.get(f"last_dev_{name}"),
        "final_loss": sum(tail) / len(tail) if tail else None,
        "loss_curve": [None if v is None else round(v, 6) for v in curve],
        "dev_curve": [[r["step"], r[f"dev_{name}"]] for r in rows if r.get(f"dev_{name}") is not None],
        "steps": m.get("steps"), "rejected_steps": m.get("rejected_steps"), "diverged": diverged,
        "wall_seconds": round(wall, 2), "train_seconds": m.get("train_seconds"),
        "restored_sha256": restored,
    }


# ----------------------------------------------------------------------------- the sweep
def merge_records(sources: Sequence[str | os.PathLike], records: Sequence[dict] = ()) -> list[dict]:
    """Records of several sweep folders (e.g. one process per GPU over layer ranges), each run once.

    A run found in two folders must have the same numbers there (same recipe
    and seed give the same result); differing copies are refused.
    """
    merged: dict[tuple, dict] = {}
    for rec in [*records, *(r for src in sources for r in _records_of(Path(src).expanduser()))]:
        key = (rec.get("kind"), *run_key(rec))
        seen = merged.setdefault(key, rec)
        if any(seen.get(f) != rec.get(f) for f in RESULT_FIELDS):
            what = "the profile" if key[0] == "profile" else f"layer {key[2]}"
            raise ConfigError(f"the sweep folders disagree on {what} of task {key[1]}",
                              "merge only sweeps made with the same options and seed")
    return list(merged.values())


def run_key(rec: dict) -> tuple:
    """(task, layer, rate) of a record: the rate only for whole-model runs, several of which a grid makes."""
    return rec.get("task"), rec.get("layer"), full_rate(rec) if rec.get("kind") == "full" else None


def _records_of(folder: Path) -> list[dict]:
    path = folder / RECORDS_NAME
    if not path.is_file():
        raise ConfigError(f"{folder} holds no {RECORDS_NAME} to merge")
    return read_records(path)


def run_sweep(config: SweepConfig, out_dir: str | os.PathLike, *, resume: bool = False, loaded=None,
              progress: bool = True, log: Callable[[str], None] | None = None, command: str | None = None,
              merge: Sequence[str | os.PathLike] = ()) -> dict:
    """Run (or resume) the sweep; writes sweep.jsonl/.json/.csv/.md/.png in ``out_dir``; returns the summary.

    ``loaded`` (a :class:`layerzo.model.loading.LoadedModel`, in ``config.tune.dtype``)
    skips loading ``config.tune.model``; every tuned layer is restored
    bit-exactly, so the model is unchanged afterwards (also in bfloat16: tune
    casts its fp32 master layers back). ``merge`` folds in the runs of other sweep
    folders made with the same recipe (see :func:`merge_records`) and then
    resumes: only runs found in none of them are tuned.

    Before any work OUT is checked (a folder, no input, writable) and the task
    names too; a sweep that fails before its first record leaves no OUT behind.
    """
    out = Path(out_dir).expanduser().absolute()
    check_sweep_output(out, [config.tune.model, config.tune.data_dir, *config.tasks, *merge])
    for task in config.tasks:
        get_task(task)  # an unknown task fails now, not after the model load
    created = not out.exists()
    try:
        return _run_sweep(config, out, resume=resume, loaded=loaded, progress=progress, log=log, command=command,
                          merge=merge)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # nothing was recorded: leave no empty folder behind
        raise


def check_sweep_output(out: Path, inputs: Sequence) -> None:
    """OUT is a folder (new, or a sweep to resume) that no input is or contains, and its files can be written.

    A sweep writes only its own ``sweep.*`` files into OUT, so those are what is checked against the inputs.
    """
    if out.is_file():
        raise OutputPathError(f"the output {out} is a file, not a folder", "give a folder path for the output")
    check_can_write(out)
    check_file_output(out / RECORDS_NAME, inputs=[i for i in inputs if i is not None], command="layerzo sweep")


def _run_sweep(config: SweepConfig, out: Path, *, resume: bool, loaded, progress: bool,
               log: Callable[[str], None] | None, command: str | None, merge: Sequence[str | os.PathLike]) -> dict:
    """:func:`run_sweep` once OUT and the tasks are checked."""
    path = out / RECORDS_NAME
    if path.exists() and not (resume or merge):
        raise OutputExistsError(f"{path} already exists; pass --resume to continue that sweep, or choose another --out")
    records = read_records(path) if resume or merge else []
    records = merge_records(merge, records) if merge else records
    if loaded is None:
        loaded = load_model(config.tune.model, dtype=config.tune.dtype, device=config.tune.device)
    n = loaded.layout.num_layers
    params = dict(loaded.model.named_parameters())
    config = config.resolved(n, sum(params[name].numel() for i in range(n)
                                    for name in layer_parameter_names(loaded.model, loaded.layout, i)))
    layers = layer_ranges(config.layers, n)
    recipe = config.recipe(n)
    check_recipe(records, recipe, path)
    out.mkdir(parents=True, exist_ok=True)
    if merge:
        atomic_write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
    base = {i: layer_sha256(loaded.model, loaded.layout, [i]) for i in range(n)}
    base_all = layer_sha256(loaded.model, loaded.layout, range(n))
    done = {run_key(r) for r in records if r.get("kind") in ("layer", "full")}
    picks = {r["task"]: r for r in records if r.get("kind") == "profile"}
    runs = [(i, None) for i in layers] + ([(FULL, lr) for lr in config.full_lr] if config.full else [])
    todo = [(t, i, lr) for t in config.tasks for i, lr in runs
            if (t, i, None if lr is None else rate_key(lr)) not in done]
    say = log or (lambda _msg: None)
    if done:
        say(f"resume: {len(done)} run(s) already in {path}, {len(todo)} to go")
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=out))
    # Layers go in increasing order on the same batches and each run restores its layer exactly,
    # so run k starts from run k-1's frozen outputs: the layers below cost one layer per batch per run;
    # and every run starts from the same base, so its zero-shot accuracies are measured once.
    prefix_cache, zero_shot_cache = SharedLowerOutputs(), ZeroShotCache()
    bar = _Bar(len(todo), progress)
    try:
        with bar:
            for task in config.tasks:
                if task not in picks:
                    picks[task] = _profile_record(config, task, loaded, recipe)
                    append_record(path, picks[task])
                for t, layer, lr in todo:
                    if t != task:
                        continue
                    bar.label(f"{task} layer {layer}" + (f" lr {lr:g}" if lr is not None else ""))
                    expected = base_all if layer == FULL else base[int(layer)]
                    rec = run_one(config, task, layer, loaded, work, expected, prefix_cache, zero_shot_cache, lr)
                    rec["recipe"] = recipe
                    rec["is_profiled_pick"] = layer == picks[task]["pick"]
                    append_record(path, rec)
                    bar.advance(rec)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if layer_sha256(loaded.model, loaded.layout, range(n)) != base_all:
        raise LayerzoError("the model differs from the base after the sweep")  # pragma: no cover - restore checks each run
    t = config.tune
    splits = {task: load_task(task, t.data_dir, num_train=t.num_train, num_dev=t.num_dev, num_test=t.num_test,
                              seed=t.seed) for task in config.tasks}
    sizes = {task: {"train": len(s.train), "dev": len(s.dev), "test": len(s.test)} for task, s in splits.items()}
    summary = summarize(read_records(path), config, layers, n, model_name=loaded.source.name, command=command,
                        split_sizes=sizes)
    write_outputs(summary, out)
    return summary


def _profile_record(config: SweepConfig, task: str, loaded, recipe: dict) -> dict:
    tc = config.tune_config(task, 0, loaded.layout.num_layers).replace(layers="dominant")
    (pick,), report = resolve_layers(tc, loaded)
    return {"kind": "profile", "task": task, "pick": int(pick), "confidence": report["pick"]["confidence"],
            "reason": report["pick"]["reason"], "recipe": recipe}


class _Bar(StderrBar):
    """sweep's bar over the runs: run label, last run's accuracy."""

    def __init__(self, total: int, enabled: bool) -> None:
        super().__init__("sweep", total, enabled)

    def label(self, run: str) -> None:
        self.update(title=f"sweep {run}")

    def advance(self, rec: dict) -> None:
        acc = rec.get("test_acc")
        info = f"last: layer {rec['layer']} test {100 * acc:.1f}%" if acc is not None else f"last: layer {rec['layer']}"
        self.update(advance=1, info=info)
