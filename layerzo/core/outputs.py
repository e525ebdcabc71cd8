"""Where a command may write: never over an input, replace only its own earlier output, one writer at a time.

Every command that writes calls :func:`check_output` before it reads or
deletes anything:

* OUT may not be, contain, or sit inside any input (base model, patch, data
  folder, calibration file, recipe), compared on resolved real paths so a
  symlink cannot smuggle an input in;
* an existing OUT is replaced only with ``overwrite`` AND only when it is a
  previous output of the same command, recognised by that command's marker
  file (a patch's ``layerzo_patch.json``, an applied checkpoint's
  provenance file, ...); an empty folder holds nothing to lose;
* the returned :class:`OutputPlan` says what will be replaced, so the CLI can say it.

:func:`output_lock` keeps a second concurrent run from writing the same OUT
(a lock file beside it holding the owner's pid), and :func:`clean_stale_temps`
removes the hidden temp folders that a killed run (``kill -9``) left beside OUT.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from layerzo.errors import OutputExistsError

LOCK_SUFFIX = ".lock"


@dataclass(frozen=True)
class OutputPlan:
    """What writing ``out`` will do: create it, or replace a previous output of the same command."""

    out: Path
    replaces: bool

    def note(self, command: str) -> str | None:
        """One line for the user when something is replaced."""
        return f"replacing the previous {command} output {self.out}" if self.replaces else None


def real(path: str | os.PathLike) -> Path:
    """Absolute path with symlinks resolved (also for a path that does not exist yet)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def check_output(out: str | os.PathLike, *, inputs: Sequence[str | os.PathLike | None], overwrite: bool,
                 command: str, markers: Sequence[str] = (), kind: str = "folder") -> OutputPlan:
    """Refuse an OUT that would destroy an input or something that is not this command's output.

    ``inputs``: local paths the command reads (None and Hub ids that are no
    local path are skipped). ``markers``: file names, any one of which marks a
    folder as an earlier output of ``command``; ``kind`` is ``folder`` or ``file``.
    """
    target = real(out)
    for given in inputs:
        if given is None or not Path(given).expanduser().exists():
            continue
        source = real(given)
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            where = ("is" if target == source else "contains" if source.is_relative_to(target) else "sits inside")
            raise OutputExistsError(f"the output {Path(out)} {where} the input {Path(given)}; "
                                    f"{command} never writes over what it reads", "choose an output elsewhere")
    if not target.exists() and not target.is_symlink():
        return OutputPlan(target, replaces=False)
    if kind == "folder" and target.is_file():
        raise OutputExistsError(f"the output {Path(out)} is a file, not a folder", "give a folder path for the output")
    if kind == "folder" and target.is_dir() and not any(target.iterdir()):
        return OutputPlan(target, replaces=False)  # an empty folder: nothing to lose
    if not overwrite:
        raise OutputExistsError(f"{Path(out)} already exists", "pass --overwrite to replace it, or choose another output")
    if kind == "folder" and not any((target / m).is_file() for m in markers):
        raise OutputExistsError(
            f"{Path(out)} is not an earlier {command} output (it has no {' or '.join(markers) or 'marker file'}); "
            "--overwrite only replaces what this command wrote", "choose another output folder")
    return OutputPlan(target, replaces=True)


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def temp_prefix(out: Path) -> str:
    """Prefix of the hidden temp siblings of ``out``; the pid in it says whose they are."""
    return f".{out.name}.{os.getpid()}."


def clean_stale_temps(out: str | os.PathLike) -> list[Path]:
    """Remove ``.OUT.<pid>.*.tmp`` / ``.old`` siblings whose writer process is gone; returns what was removed."""
    target = real(out)
    if not target.parent.is_dir():
        return []
    removed = []
    for entry in target.parent.glob(f".{target.name}.*"):
        parts = entry.name[len(target.name) + 2:].split(".")
        if len(parts) < 2 or not parts[0].isdigit() or not entry.name.endswith((".tmp", ".old")):
            continue
        if not pid_alive(int(parts[0])):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold ``.OUT.lock`` (created exclusively, holding our pid) while writing ``out``.

    A second run on the same OUT is refused while the first is alive; a lock
    left by a process that no longer exists is taken over. Stale temp folders
    of dead runs are removed on the way in.
    """
    target = real(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}{LOCK_SUFFIX}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is not None and owner != os.getpid() and pid_alive(owner):
                raise OutputExistsError(f"another {command} run (pid {owner}) is writing {Path(out)}",
                                        "wait for it to finish, or choose another output") from None
            lock.unlink(missing_ok=True)  # its owner is gone: a stale lock
    else:  # pragma: no cover - two processes racing for a stale lock; the other one won
        raise OutputExistsError(f"another {command} run is writing {Path(out)}", "choose another output")
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        clean_stale_temps(target)
        yield
    finally:
        if _lock_owner(lock) == os.getpid():
            lock.unlink(missing_ok=True)


def _lock_owner(lock: Path) -> int | None:
    try:
        text = lock.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
