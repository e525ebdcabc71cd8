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


def test_check_can_write_names_the_users_path_and_creates_nothing(tmp_path, monkeypatch):
    from layerzo.core.atomic import check_can_write
    from layerzo.errors import OutputPathError

    check_can_write(tmp_path / "new" / "deeper" / "out")  # a parent to create is fine
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match=f"cannot write {tmp_path / 'file' / 'sub'}: Not a directory: "):
        check_can_write(tmp_path / "file" / "sub")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(tmp_path) else real_access(p, mode))
    with pytest.raises(OutputPathError) as info:
        check_can_write(tmp_path / "out")
    assert str(info.value).startswith(f"cannot write {tmp_path / 'out'}: Permission denied")


def test_check_file_output_refuses_a_folder_an_input_and_an_unwritable_place(tmp_path):
    from layerzo.core.atomic import check_file_output
    from layerzo.errors import OutputPathError

    (tmp_path / "calib.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    check_file_output(tmp_path / "report.json", inputs=[tmp_path / "calib.txt"], command="layerzo eval")
    check_file_output(tmp_path / "calib.txt", inputs=[], command="layerzo eval")  # an existing file is replaced
    with pytest.raises(OutputPathError, match="is a folder, not a file"):
        check_file_output(tmp_path / "folder", inputs=[], command="layerzo eval")
    with pytest.raises(OutputExistsError, match="is the input"):
        check_file_output(tmp_path / "calib.txt", inputs=[tmp_path / "calib.txt"], command="layerzo profile")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "folder"]


def test_a_failure_to_make_the_temp_sibling_names_the_output_not_the_temp(tmp_path, monkeypatch):
    import tempfile

    from layerzo.errors import OutputPathError

    def denied(*args, dir=None, prefix="", suffix="", **kwargs):
        raise PermissionError(13, "Permission denied", f"{dir}/{prefix}abc{suffix}")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    for make in (lambda: atomic_dir(tmp_path / "out"), lambda: atomic_file(tmp_path / "f.json")):
        with pytest.raises(OutputPathError) as info:
            with make():
                pass
        assert str(info.value) in (f"cannot write {tmp_path / 'out'}: Permission denied",
                                   f"cannot write {tmp_path / 'f.json'}: Permission denied")
        assert ".tmp" not in str(info.value)
