"""Atomic output: a folder appears complete or not at all.

Every command that writes a folder (patch, applied checkpoint, ONNX export,
pulled patch) builds it in a temporary sibling and renames it into place, so
an interrupted run, a full disk or a failed check leaves no half-written
output and no leftover temp folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from layerzo.core.outputs import check_output
from layerzo.errors import OutputExistsError, OutputPathError


def check_output_free(out: Path, overwrite: bool, hint: str = "pass --overwrite or choose another folder") -> None:
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists", hint)


def check_can_write(out: str | os.PathLike) -> None:
    """Before any work: ``out`` can be created, named by the user's path (never a temp, lock or probe file).

    Its nearest existing ancestor must be a folder this process may create files
    in. Nothing is created here, so a later refusal leaves no trace.
    """
    path = Path(out).expanduser().absolute()
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"cannot write {Path(out)}: Not a directory: {ancestor} is a file",
                              "choose an output whose parent is a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {Path(out)}: Permission denied: this user may not create files in "
                              f"{ancestor}", "choose an output in a folder you can write to")


def check_file_output(path: str | os.PathLike, *, inputs: list, command: str) -> None:
    """Before any work, for an output FILE (a report, a figure): it is no input, not a folder, and writable.

    An existing file is replaced (these outputs are cheap to remake and written atomically).
    """
    check_output(path, inputs=inputs, overwrite=True, command=command, kind="file")
    if Path(path).expanduser().is_dir():
        raise OutputPathError(f"the output {Path(path)} is a folder, not a file", "give a file path for the output")
    check_can_write(path)


@contextlib.contextmanager
def _created_beside(out: Path) -> Iterator[None]:
    """An OSError while making the temp sibling of ``out`` names ``out``, not the temp name."""
    try:
        yield
    except OSError as exc:
        raise OutputPathError(f"cannot write {out}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder beside ``out_dir``; rename it to ``out_dir`` when the block succeeds.

    An existing ``out_dir`` is refused unless ``overwrite``; then it is swapped
    away and deleted only after the new one is in place. On any exception the
    temp folder is removed and ``out_dir`` is untouched.
    """
    out = Path(out_dir).expanduser().absolute()
    check_output_free(out, overwrite)
    with _created_beside(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        # the pid in the name lets a later run remove what a killed one left (layerzo.core.outputs.clean_stale_temps)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    # mkdtemp makes the folder 0700; give the result the permissions a plain mkdir would have
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        if out.exists():
            if not overwrite:
                raise OutputExistsError(f"{out} appeared while it was being written", "pass --overwrite to replace it")
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".old", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def plain_file_mode() -> int:
    """The permissions ``open(path, "w")`` gives a new file under the current umask (mkstemp gives 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it to ``path`` when the block succeeds.

    The file gets the permissions a plain ``open(path, "w")`` would give
    (mkstemp makes 0600). On any exception the temp file is removed and
    ``path`` is untouched.
    """
    out = Path(path)
    with _created_beside(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=out.suffix or ".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, plain_file_mode())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: readers see the old file or the new one."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
