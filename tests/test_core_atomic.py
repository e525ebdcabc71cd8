"""Atomic output: a folder or file appears complete or not at all, and no temp file is left behind."""

from __future__ import annotations

import os
import stat

import pytest

from layerzo.core.atomic import atomic_dir, atomic_file, atomic_write_text, check_output_free
from layerzo.errors import OutputExistsError


def test_atomic_dir_renames_the_finished_folder_into_place(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out and not out.exists()  # built beside, not in place
        (tmp / "a.txt").write_text("hello")
    assert (out / "a.txt").read_text() == "hello"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left


def test_atomic_dir_gets_the_permissions_of_a_plain_mkdir(tmp_path):
    with atomic_dir(tmp_path / "out"):
        pass
    (tmp_path / "plain").mkdir()
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


def test_atomic_dir_leaves_no_partial_output_on_an_exception(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 100)
            raise RuntimeError("failed midway")
    assert list(tmp_path.iterdir()) == []  # neither out nor the temp folder


def test_atomic_dir_refuses_an_existing_folder_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="already exists"):
        with atomic_dir(out):
            pytest.fail("the block must not run when the output exists")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the swapped-away old folder is gone too


def test_a_failed_overwrite_keeps_the_old_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OSError):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise OSError(28, "No space left on device")
    assert (out / "old.txt").read_text() == "old" and not (out / "new.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_check_output_free(tmp_path):
    check_output_free(tmp_path / "missing", overwrite=False)
    check_output_free(tmp_path, overwrite=True)
    with pytest.raises(OutputExistsError) as info:
        check_output_free(tmp_path, overwrite=False, hint="choose another --out")
    assert "choose another --out" in info.value.one_line()


def test_atomic_file_leaves_the_old_file_and_no_temp_on_an_exception(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("old")
    with pytest.raises(ValueError):
        with atomic_file(path) as tmp:
            tmp.write_text("half")
            raise ValueError("boom")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]


def test_atomic_file_replaces_the_file_with_plain_permissions(tmp_path):
    path = tmp_path / "sub" / "data.json"  # the parent folder is created
    with atomic_file(path) as tmp:
        assert tmp.parent == path.parent and tmp != path
        tmp.write_text("new")
    assert path.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    assert [p.name for p in path.parent.iterdir()] == ["data.json"]


def test_atomic_write_text_writes_utf8_and_returns_the_path(tmp_path):
    path = tmp_path / "note.md"
    assert atomic_write_text(path, "first") == path
    assert atomic_write_text(path, "zweite Zeile ✓") == path
    assert path.read_bytes() == "zweite Zeile ✓".encode("utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["note.md"]
