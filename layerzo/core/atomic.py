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

from layerzo.errors import OutputExistsError


def check_output_free(out: Path, overwrite: bool, hint: str = "pass --overwrite or choose another folder") -> None:
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists", hint)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder beside ``out_dir``; rename it to ``out_dir`` when the block succeeds.

    An existing ``out_dir`` is refused unless ``overwrite``; then it is swapped
    away and deleted only after the new one is in place. On any exception the
    temp folder is removed and ``out_dir`` is untouched.
    """
    out = Path(out_dir).expanduser().absolute()
    check_output_free(out, overwrite)
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


def _plain_file_mode() -> int:
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
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=out.suffix or ".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _plain_file_mode())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: readers see the old file or the new one."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
