"""Outputs never destroy inputs, --overwrite replaces only a command's own output, one writer per OUT,
and the leftovers of killed runs are cleaned (layerzo.core.outputs, through the real commands)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from layerzo.cli.main import app
from layerzo.core.outputs import check_output, clean_stale_temps, output_lock, pid_alive
from layerzo.errors import OutputExistsError
from patch_helpers import make_patch


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture()
def base_and_patch(tiny_llama_dir, tmp_path):
    """A copy of the tiny base inside tmp_path/models/ and a patch in tmp_path/patches/p (both inputs)."""
    import shutil

    from layerzo.model.loading import load_model

    base = tmp_path / "models" / "base"
    shutil.copytree(tiny_llama_dir, base)
    patch = tmp_path / "patches" / "p"
    make_patch(load_model(str(base)).model, 2, base_model=str(base)).save_pretrained(patch)
    return base, patch


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # finished and reaped: no process has it now (pids are not reused this fast)


@pytest.mark.parametrize("out_of", ["base", "base_parent", "patch", "patch_parent", "inside_base"])
def test_apply_refuses_an_output_that_is_contains_or_sits_inside_an_input(base_and_patch, out_of):
    base, patch = base_and_patch
    out = {"base": base, "base_parent": base.parent, "patch": patch, "patch_parent": patch.parent,
           "inside_base": base / "merged"}[out_of]
    before = (tree_digest(base), tree_digest(patch))
    result = cli("apply", base, patch, "-o", out, "--overwrite")
    assert result.exit_code == 1, result.output
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "never writes over what it reads" in lines[0] and "Traceback" not in result.output
    assert (tree_digest(base), tree_digest(patch)) == before  # nothing read, nothing deleted


def test_a_symlink_to_an_input_is_followed_and_refused(base_and_patch, tmp_path):
    base, patch = base_and_patch
    link = tmp_path / "link-to-base"
    link.symlink_to(base)
    before = tree_digest(base)
    result = cli("apply", base, patch, "-o", link, "--overwrite")
    assert result.exit_code == 1 and "is the input" in result.stderr
    assert tree_digest(base) == before


def test_tune_and_export_refuse_to_replace_a_model(base_and_patch, data_dir):
    base, patch = base_and_patch
    before = tree_digest(base)
    tuned = cli("tune", "--model", base, "--data-dir", data_dir, "--layers", "1", "--steps", "1", "--num-train", "4",
                "--num-dev", "0", "--num-test", "0", "--quiet", "--out", base, "--overwrite")
    assert tuned.exit_code == 1 and "is the input" in tuned.stderr, tuned.output
    exported = cli("export-onnx", "--model", base, "-o", base, "--overwrite")
    assert exported.exit_code == 1 and "is the input" in exported.stderr, exported.output
    assert tree_digest(base) == before


def test_tune_overwrite_replaces_only_an_earlier_patch(base_and_patch, data_dir, tmp_path):
    base, patch = base_and_patch
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "thesis.tex").write_text("months of work")
    args = ["tune", "--model", base, "--data-dir", data_dir, "--layers", "1", "--steps", "1", "--batch-size", "2",
            "--num-train", "4", "--num-dev", "0", "--num-test", "0", "--quiet"]
    refused = cli(*args, "--out", folder, "--overwrite")
    assert refused.exit_code == 1 and "not an earlier layerzo tune output" in refused.stderr
    assert (folder / "thesis.tex").read_text() == "months of work"
    first = cli(*args, "--out", tmp_path / "patch2")
    assert first.exit_code == 0, first.output
    again = cli(*args, "--out", tmp_path / "patch2", "--overwrite")
    assert again.exit_code == 0 and "replacing the previous layerzo tune output" in again.stderr


def test_check_output_allows_an_empty_folder_and_refuses_a_file_for_a_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert not check_output(tmp_path / "empty", inputs=[], overwrite=False, command="x").replaces
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file, not a folder"):
        check_output(tmp_path / "f", inputs=[], overwrite=True, command="x", markers=["m"])
    # inputs that do not exist locally (a Hub id, None) are no obstacle
    assert not check_output(tmp_path / "new", inputs=[None, "org/model"], overwrite=False, command="x").replaces


def test_a_second_writer_is_refused_while_the_first_lives_and_a_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / ".out.lock"
        lock.write_text(f"{sleeper.pid}\n")
        with pytest.raises(OutputExistsError, match=f"pid {sleeper.pid}"):
            with output_lock(out, "layerzo apply"):
                pass
        assert lock.read_text().strip() == str(sleeper.pid)  # the live owner's lock is left alone
    finally:
        sleeper.kill()
        sleeper.wait()
    lock.write_text(f"{dead_pid()}\n")
    with output_lock(out, "layerzo apply"):
        assert lock.read_text().strip() == str(os.getpid())
    assert not lock.exists()


def test_temp_folders_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    out = tmp_path / "merged"
    dead, live = dead_pid(), os.getpid()
    stale = tmp_path / f".merged.{dead}.abc123.tmp"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)
    stale_log = tmp_path / f".merged.{dead}.metrics.jsonl.tmp"
    stale_log.write_text("{}\n")
    mine = tmp_path / f".merged.{live}.def456.tmp"
    mine.mkdir()
    other = tmp_path / ".merged-notes.txt"
    other.write_text("not ours")
    removed = clean_stale_temps(out)
    assert sorted(removed) == sorted([stale, stale_log])
    assert not stale.exists() and mine.is_dir() and other.is_file()
    assert pid_alive(live) and not pid_alive(dead)


def test_apply_after_a_killed_apply_cleans_its_temp_folder(base_and_patch, tmp_path):
    """kill -9 during apply leaves .OUT.<pid>.*.tmp beside OUT: the next apply removes it."""
    base, patch = base_and_patch
    out = tmp_path / "merged"
    worker = ("import os, sys, time\n"
              "from layerzo.patch import apply as a\n"
              "real = a.write_shard\n"
              "def slow(*args, **kw):\n"
              "    real(*args, **kw); print('written', flush=True); time.sleep(60)\n"
              "a.write_shard = slow\n"
              "a.apply_patch(sys.argv[1], sys.argv[2], sys.argv[3])\n")
    proc = subprocess.Popen([sys.executable, "-c", worker, str(base), str(patch), str(out)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "written"
        leftovers = list(tmp_path.glob(f".merged.{proc.pid}.*.tmp"))
        assert len(leftovers) == 1 and any(leftovers[0].iterdir())
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / ".merged.lock").read_text().strip() == str(proc.pid)  # killed: its lock stays behind
    result = cli("apply", base, patch, "-o", out)
    assert result.exit_code == 0, result.output
    assert not leftovers[0].exists() and not (tmp_path / ".merged.lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "models", "patches"]
