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
   (:func:`layerzo.tune.prefix_cache.shared_lower_outputs`), so run ``i`` runs only
   layer ``i-1`` below itself, once per batch;
3. the whole-model baseline (``layers=all``, MeZO) with its own ``full_lr``;
4. one record per run appended to ``DIR/sweep.jsonl`` (rewritten atomically),
   so ``--resume`` skips runs already recorded with the same recipe.

``full_lr`` default: ``lr / num_layers``. A ZO-SGD step's noise grows with the
number of tuned weights d (E|Δθ|² ∝ lr²·d), so the stable lr scales like 1/d;
the whole decoder has num_layers times the weights of one layer. With the demo
recipe (lr 1e-3 on one 3.5M-weight layer) this gives 3.3e-5 for the 106M
decoder weights; the same rule lands on MeZO's 1e-6..1e-7 for OPT-13B.

Selection follows MeZO/tune: the reported test accuracy is that of the
best-dev checkpoint (step 0 = the base model included); ``final_dev_acc`` is
the last weights' dev accuracy. ``final_loss`` is the mean of (L+ + L−)/2 over
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from layerzo.errors import ConfigError, DivergenceError, LayerIndexError, LayerzoError, OutputExistsError
from layerzo.core.atomic import atomic_write_text
from layerzo.tune.prefix_cache import shared_lower_outputs
from layerzo.core.progress import StderrBar
from layerzo.sweep.report import append_record, read_records

FULL = "all"  # layer key of the whole-model MeZO baseline
RECORDS_NAME = "sweep.jsonl"
RESULT_FIELDS = ("pick", "dev_acc", "test_acc", "loss_curve")  # two copies of one run must agree on these
RECIPE_KEYS = ("model", "data_dir", "steps", "batch_size", "lr", "full_lr", "eps", "seed", "eval_every",
               "num_train", "num_dev", "num_test", "eval_batch_size", "max_length", "device")


@dataclass(frozen=True)
class SweepConfig:
    """Options of ``layerzo sweep`` (CLI flags map one to one onto these fields)."""

    tasks: tuple[str, ...] = ("sst2",)
    model: str | None = None
    data_dir: str | None = None
    layers: str = "all"  # "all" | "0-29" | "3,7" | "0-3,11": each tuned ALONE
    full: bool = True  # also run the whole-model MeZO baseline
    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    full_lr: float | None = None  # None: lr / num_layers (see the module docstring)
    eps: float = 1e-3
    seed: int = 0
    eval_every: int = 50
    num_train: int = 1000
    num_dev: int = 200
    num_test: int = 500
    eval_batch_size: int = 32
    max_length: int = 128
    device: str = "cpu"

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str) or not self.tasks or not all(isinstance(t, str) and t for t in self.tasks):
            raise ConfigError(f"tasks must be a non-empty list of task names, got {self.tasks!r}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks lists a task twice: {','.join(self.tasks)}")
        if self.full_lr is not None and not (math.isfinite(self.full_lr) and self.full_lr > 0):
            raise ConfigError(f"full_lr must be a positive number (or None for lr / num_layers), got {self.full_lr}")
        if str(self.layers).strip().lower() != "all":
            layer_ranges(self.layers, 10**6)  # syntax only; the range is checked against the model later
        self.tune_config(self.tasks[0], 0, 1)  # validates steps, lr, eps, sizes with train.py's messages

    def resolved_full_lr(self, num_layers: int) -> float:
        return self.full_lr if self.full_lr is not None else self.lr / num_layers

    def recipe(self, num_layers: int) -> dict[str, Any]:
        """What makes two runs comparable (resume refuses a record whose recipe differs)."""
        d = {k: getattr(self, k) for k in RECIPE_KEYS}
        d["full_lr"] = self.resolved_full_lr(num_layers)
        return d

    def tune_config(self, task: str, layer: int | str, num_layers: int):
        """The :class:`layerzo.tune.loop.TuneConfig` of one run (``layer`` an index or :data:`FULL`)."""
        from layerzo.tune.loop import TuneConfig

        full = layer == FULL
        return TuneConfig(
            task=task, model=self.model, data_dir=self.data_dir, layers="all" if full else str(layer),
            steps=self.steps, batch_size=self.batch_size,
            lr=self.resolved_full_lr(num_layers) if full else self.lr, eps=self.eps, seed=self.seed,
            eval_every=min(self.eval_every, self.steps), num_train=self.num_train, num_dev=self.num_dev,
            num_test=self.num_test, eval_batch_size=self.eval_batch_size, max_length=self.max_length,
            dtype="float32", device=self.device,
        )


def layer_ranges(spec: str, num_layers: int) -> tuple[int, ...]:
    """``all`` | ``0-29`` | ``3,7`` | ``0-3,11`` → sorted distinct indices (validated by layers.parse_layer_spec)."""
    from layerzo.model.layers import parse_layer_spec

    text = str(spec).strip().lower()
    if text == "all":
        return tuple(range(num_layers))
    parts: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        lo, sep, hi = part.partition("-")
        if sep and lo.strip().isdigit() and hi.strip().isdigit():
            a, b = int(lo), int(hi)
            if a > b:
                raise LayerIndexError(f"--layers range {part!r} runs backwards; write {b}-{a}")
            if b >= num_layers:  # before expanding: a typo like 0-99999999 must not allocate
                raise LayerIndexError(f"--layers {part} is out of range: the model has {num_layers} decoder layers "
                                      f"(valid indices 0-{num_layers - 1})")
            parts += [str(i) for i in range(a, b + 1)]
        else:
            parts.append(part)
    if text in ("", "dominant") or not parts:
        raise LayerIndexError(f"--layers must be 'all', a range like 0-29 or a list like 3,7; got {spec!r}")
    try:
        resolved = parse_layer_spec(",".join(parts), num_layers)
    except LayerIndexError:
        raise
    except LayerzoError as exc:  # pragma: no cover - parse_layer_spec raises LayerIndexError only
        raise LayerIndexError(str(exc)) from None
    if isinstance(resolved, str):
        raise LayerIndexError(f"--layers must be 'all', a range like 0-29 or a list like 3,7; got {spec!r}")
    return resolved


# ----------------------------------------------------------------------------- recipe check (resume)
def check_recipe(records: Sequence[dict], recipe: dict, path: Path) -> None:
    """Refuse to resume over records made with a different recipe (names the first differing key)."""
    for rec in records:
        old = rec.get("recipe", {})
        for key in [*recipe, *(k for k in old if k not in recipe)]:  # RECIPE_KEYS order: lr before full_lr
            if old.get(key) != recipe.get(key):
                raise ConfigError(
                    f"{path} was made with {key}={old.get(key)!r} but this run has {key}={recipe.get(key)!r}",
                    "rerun with the same options, or choose another --out",
                )


# ----------------------------------------------------------------------------- exact restore
def snapshot(model: torch.nn.Module, layout, layers: Sequence[int]) -> dict[str, torch.Tensor]:
    """Copies (on CPU) of every parameter of ``layers``, by state-dict name."""
    from layerzo.model.layers import layer_parameter_names

    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu", copy=True) for i in layers for n in layer_parameter_names(model, layout, i)}


def restore(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> str:
    """Copy ``saved`` back into the model and verify bit-equality; returns the sha256 of the restored tensors."""
    from layerzo.core.hashing import combine_sha256, tensor_sha256

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
    from layerzo.core.hashing import combine_sha256, tensor_sha256
    from layerzo.model.layers import layer_parameter_names

    params = dict(model.named_parameters())
    return combine_sha256(f"{n}:{tensor_sha256(params[n])}" for i in layers for n in layer_parameter_names(model, layout, i))


# ----------------------------------------------------------------------------- one run
@contextmanager
def reuse_base_accuracy(loaded, layers: Sequence[int], base_sha: str, cache: dict) -> Iterator[None]:
    """Adapter: inside the block, train.tune's dev/test evaluations of the BASE model come from ``cache``.

    tune() evaluates the zero-shot dev/test accuracy of the base model in every
    run; in a sweep that is the same number 31 times and, on a CPU, as costly
    as the training itself. Only ``layers`` can differ from the base during a
    run, so when their sha256 equals ``base_sha`` the model IS the base and a
    cached accuracy for the same examples and options is exact (this also
    covers a run whose best-dev checkpoint is step 0). ``cache`` (one dict per
    sweep, i.e. per base model) carries the numbers from run to run.
    """
    from layerzo.tune import loop as train

    original = train.EvalSet

    class CachedEvalSet(original):  # type: ignore[misc, valid-type]
        def __init__(self, tokenizer, examples, **kwargs) -> None:
            super().__init__(tokenizer, examples, **kwargs)
            self._key = (tuple(examples), tuple(sorted(kwargs.items())))

        def accuracy(self, model, *args, **kwargs):
            if layer_sha256(model, loaded.layout, layers) != base_sha:
                return super().accuracy(model, *args, **kwargs)
            if self._key not in cache:
                cache[self._key] = super().accuracy(model, *args, **kwargs)
            return cache[self._key]

    train.EvalSet = CachedEvalSet
    try:
        yield
    finally:
        train.EvalSet = original


def run_one(config: SweepConfig, task: str, layer: int | str, loaded, work: Path, base_sha: str,
            cache: dict | None = None) -> dict:
    """Tune one layer (or the whole model) via train.tune, restore exactly, return its record."""
    from layerzo.tune.loop import METRICS_NAME, tune

    n = loaded.layout.num_layers
    layers = list(range(n)) if layer == FULL else [int(layer)]
    saved = snapshot(loaded.model, loaded.layout, layers)
    out = work / f"{task}-{layer}"
    t0 = time.perf_counter()
    try:
        with reuse_base_accuracy(loaded, layers, base_sha, {} if cache is None else cache):
            result = tune(config.tune_config(task, layer, n), out, overwrite=True, progress=False, loaded=loaded)
        metrics, diverged = result.metrics, None
    except DivergenceError as exc:  # tune wrote its best patch + metrics before raising: record it, go on
        metrics, diverged = json.loads((out / "layerzo_patch.json").read_text())["metrics"], exc.one_line()
    finally:  # whatever happened, the next run (or the caller) gets the base weights back
        restored = restore(loaded.model, saved)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines() if line.strip()]
    shutil.rmtree(out, ignore_errors=True)  # the sweep keeps numbers, not patches
    if restored != base_sha:
        raise LayerzoError(f"layer(s) {layer} of the model differ from the base after restore (sha256 mismatch)")
    return _record(config, task, layer, metrics, rows, wall, restored, diverged)


def _mean_loss(row: dict) -> float | None:
    lp, lm = row.get("loss_plus"), row.get("loss_minus")
    return None if lp is None or lm is None else (lp + lm) / 2


def _record(config, task, layer, m: dict, rows: list[dict], wall: float, restored: str, diverged) -> dict:
    curve = [_mean_loss(r) for r in rows]
    tail = [v for v in curve[-max(1, len(curve) // 10):] if v is not None]
    return {
        "kind": "full" if layer == FULL else "layer", "task": task, "layer": layer,
        "zero_shot_dev_acc": m.get("zero_shot_dev_acc"), "zero_shot_test_acc": m.get("zero_shot_test_acc"),
        "dev_acc": m.get("best_dev_acc"), "test_acc": m.get("test_acc"), "best_step": m.get("best_step"),
        "final_dev_acc": m.get("last_dev_acc"),
        "final_loss": sum(tail) / len(tail) if tail else None,
        "loss_curve": [None if v is None else round(v, 6) for v in curve],
        "dev_curve": [[r["step"], r["dev_acc"]] for r in rows if r.get("dev_acc") is not None],
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
        key = (rec.get("kind"), rec.get("task"), rec.get("layer"))
        seen = merged.setdefault(key, rec)
        if any(seen.get(f) != rec.get(f) for f in RESULT_FIELDS):
            what = "the profile" if key[0] == "profile" else f"layer {key[2]}"
            raise ConfigError(f"the sweep folders disagree on {what} of task {key[1]}",
                              "merge only sweeps made with the same options and seed")
    return list(merged.values())


def _records_of(folder: Path) -> list[dict]:
    path = folder / RECORDS_NAME
    if not path.is_file():
        raise ConfigError(f"{folder} holds no {RECORDS_NAME} to merge")
    return read_records(path)


def run_sweep(config: SweepConfig, out_dir: str | os.PathLike, *, resume: bool = False, loaded=None,
              progress: bool = True, log: Callable[[str], None] | None = None, command: str | None = None,
              merge: Sequence[str | os.PathLike] = ()) -> dict:
    """Run (or resume) the sweep; writes sweep.jsonl/.json/.csv/.md/.png in ``out_dir``; returns the summary.

    ``loaded`` (a :class:`layerzo.model.loading.LoadedModel`, float32) skips loading
    ``config.model``; every tuned layer is restored bit-exactly, so the model
    is unchanged afterwards. ``merge`` folds in the runs of other sweep
    folders made with the same recipe (see :func:`merge_records`) and then
    resumes: only runs found in none of them are tuned.
    """
    from layerzo.sweep.report import summarize, write_outputs

    out = Path(out_dir).expanduser().absolute()
    path = out / RECORDS_NAME
    if path.exists() and not (resume or merge):
        raise OutputExistsError(f"{path} already exists; pass --resume to continue that sweep, or choose another --out")
    records = read_records(path) if resume or merge else []
    records = merge_records(merge, records) if merge else records
    if loaded is None:
        from layerzo.model.loading import load_model

        loaded = load_model(config.model, dtype="float32", device=config.device)
    if next(loaded.model.parameters()).dtype != torch.float32:
        raise ConfigError("the sweep runs float32 models only (tune's fp32 master hooks stay on a bf16 layer)",
                          "load the model with dtype float32")
    n = loaded.layout.num_layers
    layers = layer_ranges(config.layers, n)
    recipe = config.recipe(n)
    check_recipe(records, recipe, path)
    out.mkdir(parents=True, exist_ok=True)
    if merge:
        atomic_write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
    base = {i: layer_sha256(loaded.model, loaded.layout, [i]) for i in range(n)}
    base_all = layer_sha256(loaded.model, loaded.layout, range(n))
    done = {(r["task"], r["layer"]) for r in records if r.get("kind") in ("layer", "full")}
    picks = {r["task"]: r for r in records if r.get("kind") == "profile"}
    todo = [(t, i) for t in config.tasks for i in [*layers, *([FULL] if config.full else [])] if (t, i) not in done]
    say = log or (lambda _msg: None)
    if done:
        say(f"resume: {len(done)} run(s) already in {path}, {len(todo)} to go")
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=out))
    cache: dict = {}  # base-model accuracies, shared by the runs (see reuse_base_accuracy)
    bar = _Bar(len(todo), progress)
    try:
        # Layers go in increasing order on the same batches and each run restores its layer exactly,
        # so run k starts from run k-1's frozen outputs: the layers below cost one layer per batch per run.
        with bar, shared_lower_outputs(loaded.model):
            for task in config.tasks:
                if task not in picks:
                    picks[task] = _profile_record(config, task, loaded, recipe)
                    append_record(path, picks[task])
                for t, layer in todo:
                    if t != task:
                        continue
                    bar.label(f"{task} layer {layer}")
                    expected = base_all if layer == FULL else base[int(layer)]
                    rec = run_one(config, task, layer, loaded, work, expected, cache)
                    rec["recipe"] = recipe
                    rec["is_profiled_pick"] = layer == picks[task]["pick"]
                    append_record(path, rec)
                    bar.advance(rec)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if layer_sha256(loaded.model, loaded.layout, range(n)) != base_all:
        raise LayerzoError("the model differs from the base after the sweep")  # pragma: no cover - restore checks each run
    summary = summarize(read_records(path), config, layers, n, model_name=loaded.source.name, command=command)
    write_outputs(summary, out)
    return summary


def _profile_record(config: SweepConfig, task: str, loaded, recipe: dict) -> dict:
    from layerzo.tune.loop import resolve_layers

    tc = dataclasses.replace(config.tune_config(task, 0, loaded.layout.num_layers), layers="dominant")
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
