"""Training checkpoints for ``layerzo tune``: save every N steps, resume bit-exactly, stop on Ctrl-C/SIGTERM.

A checkpoint lives in ``OUT.ckpt/`` BESIDE the patch folder ``OUT``, never inside it:
``OUT`` only ever holds a finished patch (the "only patch files" contract, and what
``push`` uploads), and ``OUT`` is written once, at the end, by an atomic rename::

    OUT.ckpt/checkpoint.json                     the commit point: every small value, as JSON
    OUT.ckpt/state-00000012-1a2b3c4d.safetensors current + best tuned tensors, momentum buffers

Atomicity. The tensors go to a NEW file name (temp file + rename), then
``checkpoint.json`` is replaced (temp file + ``os.replace``: the commit), then
older state files are deleted. A kill at any instant leaves a ``checkpoint.json``
that names a complete tensor file; its sha256 is checked on read.

What is saved (everything the loop's future depends on, so a resumed run
writes byte-identical patch files): the tuned tensors (fp32 master / LoRA),
the optimizer state (step, rejection streak, momentum buffers), the step-seed
stream (``random.Random`` state as JSON), the batch order (``epoch, position``:
epoch e's permutation is the e-th ``randperm`` of a generator seeded with the
run seed, so two ints restore it exactly), the best-so-far weights and dev
accuracy, the trajectory, zero-shot accuracies and the metrics rows so far.
No pickle: tensors in safetensors, the rest in JSON.

Checkpoints are untrusted input like patches: :func:`load_checkpoint` validates
every field and refuses problems with one :class:`CheckpointError` line.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from layerzo.tune.config import RESUME_FREE_FIELDS
from layerzo.core.hashing import file_sha256
from layerzo.errors import CheckpointError, OutputExistsError, PatchFormatError, TuneInterrupted
from layerzo.io.safetensors import FLOAT_DTYPES, read_header, write_shard

CHECKPOINT_SUFFIX = ".ckpt"
STATE_JSON = "checkpoint.json"
CHECKPOINT_FORMAT = "layerzo-checkpoint"
CHECKPOINT_VERSION = 1
MAX_STATE_JSON_BYTES = 256 * 1024 * 1024
MAX_STATE_HEADER_BYTES = 16 * 1024 * 1024
_STATE_FILE = re.compile(r"^state-\d{8}-[0-9a-f]{8}\.safetensors$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_KEYS = ("format", "version", "layerzo_version", "identity", "step", "bad_in_row", "seed_rng", "batches",
         "best", "trajectory", "rows", "zero_shot", "last_dev", "rejected", "seconds", "tensors")


@dataclass
class Checkpoint:
    """Everything the tune loop needs to continue after ``step`` steps (bit-exactly).

    ``params``/``best_weights``: tuned-tensor name -> CPU tensor (the master
    dtype); ``momentum``: tuned-tensor index -> fp32 buffer of that tensor's shape.
    """

    identity: dict  # recipe (minus RESUME_FREE_FIELDS), layers, tensor names, base fingerprint
    step: int  # loop steps done = index of the next step
    params: dict[str, torch.Tensor]
    best_weights: dict[str, torch.Tensor]
    best: dict  # {"dev_acc": float | None, "step": int, "trajectory_len": int}
    momentum: dict[int, torch.Tensor]
    bad_in_row: int
    seed_rng: tuple  # random.Random.getstate()
    batches: tuple[int, int]  # (epoch, position) of the training batch stream
    trajectory: list  # TrajectoryStep
    rows: list[dict]  # metrics.jsonl rows so far
    zero_shot: tuple[float | None, ...]  # (dev, test) primary scores; generative tasks add (dev EM, test EM)
    last_dev: float | None
    rejected: int
    seconds: dict[str, float] = field(default_factory=dict)  # timing so far (never compared)


def checkpoint_dir(out: Path) -> Path:
    """``runs/patch`` -> ``runs/patch.ckpt`` (beside the patch folder, never inside it)."""
    return out.with_name(out.name + CHECKPOINT_SUFFIX)


def run_identity(recipe: Mapping[str, Any], layers, names, fingerprint: Mapping[str, str]) -> dict:
    """What must be equal for a checkpoint to continue this run (JSON-comparable)."""
    return {"recipe": {k: v for k, v in recipe.items() if k not in RESUME_FREE_FIELDS},
            "layers": [int(i) for i in layers], "names": list(names), "base_fingerprint": dict(fingerprint)}


def check_checkpoint_dir(folder: Path, *, resume: bool, overwrite: bool) -> bool:
    """Before any work: True if ``folder`` holds a checkpoint to resume.

    A checkpoint of an interrupted run is never silently discarded: without
    ``resume`` it is refused unless ``overwrite`` (then it is removed).
    """
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"{folder} exists and is not a checkpoint folder",
                                "move it away or choose another --out")
    present = (folder / STATE_JSON).is_file()
    if resume:
        return present
    if folder.exists() and not overwrite:
        raise OutputExistsError(f"{folder} holds a checkpoint of an interrupted run",
                                "pass --resume to continue it, or --overwrite to start over")
    if folder.exists():  # --overwrite: start over (under torchrun every rank may get here: tolerate a race)
        shutil.rmtree(folder, ignore_errors=True)
    return False


def check_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be made in it (fail in seconds, not after training)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".layerzo-probe.", dir=folder)
    os.close(fd)
    os.unlink(probe)


# ----------------------------------------------------------------------------- writing
def save_checkpoint(folder: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` into ``folder`` atomically (see the module docstring); returns the folder."""
    from layerzo.version import __version__

    folder.mkdir(parents=True, exist_ok=True)
    name = f"state-{ckpt.step:08d}-{secrets.token_hex(4)}.safetensors"
    tensors = {f"current:{n}": t for n, t in ckpt.params.items()}
    tensors.update({f"best:{n}": t for n, t in ckpt.best_weights.items()})
    tensors.update({f"momentum:{i}": t for i, t in ckpt.momentum.items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    write_shard(folder / name, tensors, {"format": "pt", "layerzo_checkpoint": str(CHECKPOINT_VERSION)})
    try:
        state = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "layerzo_version": __version__,
            "identity": ckpt.identity, "step": ckpt.step, "bad_in_row": ckpt.bad_in_row,
            "seed_rng": [ckpt.seed_rng[0], list(ckpt.seed_rng[1]), ckpt.seed_rng[2]],
            "batches": {"epoch": ckpt.batches[0], "position": ckpt.batches[1]},
            "best": ckpt.best, "trajectory": [json.loads(s.to_json()) for s in ckpt.trajectory],
            "rows": ckpt.rows, "zero_shot": list(ckpt.zero_shot), "last_dev": ckpt.last_dev,
            "rejected": ckpt.rejected, "seconds": ckpt.seconds,
            "tensors": {"file": name, "sha256": file_sha256(folder / name)},
        }
        _write_json_atomic(folder / STATE_JSON, state)  # the commit point
    except BaseException:
        (folder / name).unlink(missing_ok=True)
        raise
    for old in folder.iterdir():  # older states and temp files of a killed save
        if old.name != name and old.name != STATE_JSON:
            old.unlink(missing_ok=True) if not old.is_dir() else shutil.rmtree(old, ignore_errors=True)
    return folder


def _write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, allow_nan=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_checkpoint(folder: Path) -> None:
    """Delete the checkpoint of a finished run (the patch now holds the result)."""
    shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------- reading (untrusted)
def _bad(folder: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {folder} is unusable: {what}", "delete it, or pass --overwrite to start over")


def _refuse_constant(name: str) -> None:
    raise ValueError(f"non-finite number {name}")  # json accepts NaN/Infinity; a checkpoint never holds them


def _int(v: object, low: int = 0) -> bool:
    return type(v) is int and v >= low


def _acc(v: object) -> bool:
    return v is None or ((type(v) is float or type(v) is int) and 0.0 <= v <= 1.0)


def _seconds(v: object) -> bool:
    """A finite float, or an int a float holds exactly (``math.isfinite`` overflows on a 400-digit int)."""
    return (type(v) is float and math.isfinite(v)) or (type(v) is int and abs(v) <= 2**53)


def load_checkpoint(folder: Path) -> Checkpoint:
    """Read and validate ``folder``'s checkpoint; every problem is one :class:`CheckpointError` line."""
    path = folder / STATE_JSON
    try:
        if path.stat().st_size > MAX_STATE_JSON_BYTES:
            raise _bad(folder, f"{STATE_JSON} is larger than {MAX_STATE_JSON_BYTES} bytes")
        data = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_refuse_constant)
    except OSError as exc:
        raise _bad(folder, f"cannot read {STATE_JSON}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad(folder, f"{STATE_JSON} is not valid JSON") from None
    if not isinstance(data, dict):
        raise _bad(folder, f"{STATE_JSON} must hold a JSON object")
    if data.get("format") != CHECKPOINT_FORMAT:
        raise _bad(folder, f"{STATE_JSON} is not a layerzo checkpoint (format {str(data.get('format'))[:40]!r})")
    if not _int(data.get("version")) or data["version"] != CHECKPOINT_VERSION:
        raise _bad(folder, f"checkpoint version {str(data.get('version'))[:20]} is not supported "
                           f"(this layerzo reads version {CHECKPOINT_VERSION})")
    if set(data) != set(_KEYS):
        diff = sorted(set(map(str, data)) ^ set(_KEYS))
        raise _bad(folder, f"{STATE_JSON} has missing or unknown field(s) {', '.join(d[:40] for d in diff[:5])}")
    small = _check_small(folder, data)
    tensors = _read_tensors(folder, data["tensors"])
    names = small["identity"]["names"]
    params, best, momentum = {}, {}, {}
    for key, t in tensors.items():
        kind, _, rest = key.partition(":")
        if kind == "current" and rest in names:
            params[rest] = t
        elif kind == "best" and rest in names:
            best[rest] = t
        elif kind == "momentum" and rest.isdigit() and int(rest) < len(names) and rest == str(int(rest)):
            momentum[int(rest)] = t
        else:
            raise _bad(folder, f"unexpected tensor {key[:80]!r}")
    if set(params) != set(names) or set(best) != set(names):
        raise _bad(folder, "the current/best tensors do not match the tuned tensor names")
    for n in names:
        if params[n].shape != best[n].shape or params[n].dtype != best[n].dtype:
            raise _bad(folder, f"current and best {n} differ in shape or dtype")
    for i, t in momentum.items():
        if t.shape != params[names[i]].shape or t.dtype != torch.float32:
            raise _bad(folder, f"momentum buffer {i} does not fit tensor {names[i]}")
    return Checkpoint(params=params, best_weights=best, momentum=momentum, **small)


def _check_small(folder: Path, d: dict) -> dict:
    """Validate the JSON fields; returns the Checkpoint keyword arguments they make."""
    from layerzo.patch.manifest import TrajectoryStep

    ident = d["identity"]
    if (not isinstance(ident, dict) or set(ident) != {"recipe", "layers", "names", "base_fingerprint"}
            or not isinstance(ident["recipe"], dict) or not isinstance(ident["base_fingerprint"], dict)
            or not isinstance(ident["layers"], list) or not all(_int(i) for i in ident["layers"])
            or not isinstance(ident["names"], list) or not ident["names"]
            or not all(isinstance(n, str) and n for n in ident["names"])
            or len(set(ident["names"])) != len(ident["names"])):
        raise _bad(folder, "field identity must hold recipe, layers, names and base_fingerprint")
    step, bad_in_row, rejected = d["step"], d["bad_in_row"], d["rejected"]
    if not _int(step) or not _int(bad_in_row) or not _int(rejected) or rejected > step or bad_in_row > step:
        raise _bad(folder, "fields step, bad_in_row and rejected must be counts with rejected, bad_in_row ≤ step")
    rng = d["seed_rng"]
    if (not isinstance(rng, list) or len(rng) != 3 or not _int(rng[0]) or not isinstance(rng[1], list)
            or not all(_int(v) for v in rng[1]) or not (rng[2] is None or type(rng[2]) is float)):
        raise _bad(folder, "field seed_rng is not a random.Random state")
    seed_rng = (rng[0], tuple(rng[1]), rng[2])
    try:  # let the RNG itself check length, index and word ranges
        import random

        random.Random().setstate(seed_rng)
    except (ValueError, TypeError, OverflowError):
        raise _bad(folder, "field seed_rng is not a valid random.Random state") from None
    b = d["batches"]
    if not isinstance(b, dict) or set(b) != {"epoch", "position"} or not _int(b["epoch"]) or not _int(b["position"]):
        raise _bad(folder, "field batches must be {epoch, position} counts")
    if b["epoch"] > step + 1:  # one step starts at most one epoch; also bounds the replay of the order
        raise _bad(folder, f"batch epoch {b['epoch']} is impossible after {step} steps")
    best = d["best"]
    if (not isinstance(best, dict) or set(best) != {"dev_acc", "step", "trajectory_len"} or not _acc(best["dev_acc"])
            or not _int(best["step"]) or best["step"] > step or not _int(best["trajectory_len"])):
        raise _bad(folder, "field best must be {dev_acc, step ≤ steps done, trajectory_len}")
    traj = d["trajectory"]
    if not isinstance(traj, list) or len(traj) > step or best["trajectory_len"] > len(traj):
        raise _bad(folder, "field trajectory must list at most one entry per step done")
    trajectory = []
    for i, entry in enumerate(traj):
        if not isinstance(entry, dict) or set(entry) != {"step", "seeds", "grads", "lr"} or not all(
                isinstance(entry[k], list) for k in ("seeds", "grads")):
            raise _bad(folder, f"trajectory entry {i} needs exactly step, seeds (list), grads (list), lr")
        try:
            trajectory.append(TrajectoryStep(**entry))
        except PatchFormatError as exc:
            raise _bad(folder, f"trajectory entry {i}: {exc}") from None
        if trajectory[-1].step >= step or (i and trajectory[-1].step <= trajectory[-2].step):
            raise _bad(folder, f"trajectory entry {i} has step {trajectory[-1].step} out of order")
    rows = d["rows"]
    if not isinstance(rows, list) or len(rows) != step or not all(isinstance(r, dict) for r in rows):
        raise _bad(folder, "field rows must hold one metrics object per step done")
    zs = d["zero_shot"]
    if not isinstance(zs, list) or len(zs) not in (2, 4) or not all(_acc(v) for v in zs) or not _acc(d["last_dev"]):
        raise _bad(folder, "fields zero_shot and last_dev must be scores in [0, 1] or null")
    seconds = d["seconds"]
    if not isinstance(seconds, dict) or not all(isinstance(k, str) and _seconds(v) for k, v in seconds.items()):
        raise _bad(folder, "field seconds must map names to numbers")
    return {"identity": ident, "step": step, "bad_in_row": bad_in_row, "seed_rng": seed_rng,
            "batches": (b["epoch"], b["position"]), "best": best, "trajectory": trajectory, "rows": rows,
            "zero_shot": tuple(zs), "last_dev": d["last_dev"], "rejected": rejected, "seconds": seconds}


def _read_tensors(folder: Path, info: object) -> dict[str, torch.Tensor]:
    if (not isinstance(info, dict) or set(info) != {"file", "sha256"} or not isinstance(info["file"], str)
            or not _STATE_FILE.match(info["file"]) or not isinstance(info["sha256"], str)
            or not _SHA256.match(info["sha256"])):
        raise _bad(folder, "field tensors must name a state-*.safetensors file and its sha256")
    path = folder / info["file"]
    if not path.is_file():
        raise _bad(folder, f"{info['file']} is missing")
    if file_sha256(path) != info["sha256"]:
        raise _bad(folder, f"{info['file']} does not match its sha256 (corrupt or truncated)")
    header = read_header(path, max_header_bytes=MAX_STATE_HEADER_BYTES, error=CheckpointError)
    for key, t in header.tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise _bad(folder, f"tensor {key[:80]!r} has non-float dtype {t.dtype}")
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except Exception as exc:  # safetensors' own error types; one line
        raise _bad(folder, f"cannot read {info['file']}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    for key, t in tensors.items():
        if not math.isfinite(float(t.sum(dtype=torch.float64))):
            raise _bad(folder, f"tensor {key[:80]!r} holds NaN or infinite values")
    return tensors


def check_resumable(folder: Path, ckpt: Checkpoint, identity: dict, total_steps: int, params=None) -> None:
    """Refuse a checkpoint made by another recipe, layer choice or base model than this run.

    ``params`` (a :class:`layerzo.zo.engine.TunedParams`): the live tensors, whose shapes
    and dtypes the saved ones must have (a silent cast would break bit-exactness).
    """
    mine, theirs = identity, ckpt.identity
    for key in sorted(set(mine["recipe"]) | set(theirs["recipe"])):
        if mine["recipe"].get(key) != theirs["recipe"].get(key):
            raise CheckpointError(
                f"checkpoint {folder} was made with {key}={theirs['recipe'].get(key)!r} but this run has "
                f"{key}={mine['recipe'].get(key)!r}", "resume with the same options, or pass --overwrite to start over")
    for key, what in (("layers", "tuned layers"), ("names", "tuned tensors"), ("base_fingerprint", "base weights")):
        if mine[key] != theirs[key]:
            raise CheckpointError(f"checkpoint {folder} was made for other {what} than this run",
                                  "resume with the same model and options, or pass --overwrite to start over")
    if ckpt.step > total_steps:
        raise CheckpointError(f"checkpoint {folder} is at step {ckpt.step}, beyond --steps {total_steps}")
    for name, live in zip(params.names, params.tensors) if params is not None else ():
        saved = ckpt.params[name]
        if saved.shape != live.shape or saved.dtype != live.dtype:
            raise CheckpointError(f"checkpoint {folder}: {name} is {saved.dtype} {tuple(saved.shape)} but the run "
                                  f"tunes {live.dtype} {tuple(live.shape)}")


# ----------------------------------------------------------------------------- Ctrl-C / SIGTERM
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; what SLURM, Kubernetes and `timeout` send first


class StopOnInterrupt:
    """Context manager: the first SIGINT or SIGTERM only sets ``requested`` and records
    ``signum`` (the loop finishes its step, checkpoints and stops); a second signal of
    either kind raises KeyboardInterrupt at once. The previous handlers are restored on exit.

    A :class:`TuneInterrupted` leaving the block gets the signal's number as its
    ``signum`` (the CLI exits with 128 + signum: 130 for Ctrl-C, 143 for SIGTERM).

    Installed only in the main thread of a single-process run: under torchrun the
    ranks would stop at different steps and wait on each other forever.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum

    def __enter__(self) -> "StopOnInterrupt":
        if self.enabled:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for sig, previous in self._previous.items():  # None: a handler not set from Python; restore the default
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous = {}
        if isinstance(exc, TuneInterrupted) and self.signum is not None:
            exc.signum = self.signum
