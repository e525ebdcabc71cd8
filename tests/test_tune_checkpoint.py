"""Training checkpoints: atomic saves beside the patch folder, validated loads, refusals, Ctrl-C.

The CLI-level tests interrupt a real ``layerzo tune`` with the helpers of test_reliability.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest
import torch

from layerzo.errors import CheckpointError, OutputExistsError, TuneInterrupted
from layerzo.patch.manifest import TrajectoryStep
from layerzo.tune.checkpoint import (STATE_JSON, Checkpoint, StopOnInterrupt, check_checkpoint_dir, check_resumable,
                                     checkpoint_dir, load_checkpoint, remove_checkpoint, run_identity, save_checkpoint)
from test_reliability import _enospc, _interrupted_checkpoint, cli, one_error_line, tune_args

NAMES = ["model.layers.1.mlp.up_proj.weight", "model.layers.1.input_layernorm.weight"]


def make_checkpoint(step: int = 3, scale: float = 1.0) -> Checkpoint:
    gen = torch.Generator().manual_seed(0)
    params = {n: scale * torch.randn(s, generator=gen) for n, s in zip(NAMES, [(6, 4), (4,)])}
    return Checkpoint(
        identity=run_identity({"lr": 1e-3, "seed": 0, "checkpoint_every": 3}, [1], NAMES, {n: "ab" * 32 for n in NAMES}),
        step=step, params=params, best_weights={n: t.clone() for n, t in params.items()}, momentum={0: torch.ones(6, 4)},
        best={"dev_acc": 0.5, "step": 0, "trajectory_len": 0}, bad_in_row=0, seed_rng=random.Random(step).getstate(),
        batches=(1, 4), trajectory=[TrajectoryStep(i, (i + 1,), (0.5,), 1e-3) for i in range(step)],
        rows=[{"step": i + 1} for i in range(step)], zero_shot=(0.5, 0.25), last_dev=None, rejected=0)


# ----------------------------------------------------------------------------- through the CLI
def test_stale_checkpoint_needs_resume_or_overwrite(tiny_llama_dir, data_dir, tmp_path):
    out = tmp_path / "patch"
    args = _interrupted_checkpoint(tiny_llama_dir, data_dir, out)
    line = one_error_line(cli(*args))
    assert "interrupted run" in line and "--resume" in line and "--overwrite" in line
    result = cli(*args, "--overwrite")  # starts over: discards the checkpoint, finishes, removes its own
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patch"]


def test_resume_refuses_a_checkpoint_of_another_recipe(tiny_llama_dir, data_dir, tmp_path):
    out = tmp_path / "patch"
    args = _interrupted_checkpoint(tiny_llama_dir, data_dir, out)
    line = one_error_line(cli(*args, "--lr", "5e-3", "--resume"))
    assert "lr=0.001" in line and "lr=0.005" in line and "--overwrite" in line
    line = one_error_line(cli(*args, "--layers", "1", "--resume"))
    assert "layers='2'" in line
    assert not out.exists() and load_checkpoint(checkpoint_dir(out)).step == 3  # refused before any change


@pytest.mark.parametrize("defect", ["truncate", "flip", "json", "version"])
def test_resume_refuses_a_corrupt_checkpoint_in_one_line(defect, tiny_llama_dir, data_dir, tmp_path):
    out = tmp_path / "patch"
    args = _interrupted_checkpoint(tiny_llama_dir, data_dir, out)
    folder = checkpoint_dir(out)
    state = json.loads((folder / STATE_JSON).read_text())
    tensors = folder / state["tensors"]["file"]
    if defect == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:-100])
    elif defect == "flip":
        data = bytearray(tensors.read_bytes())
        data[len(data) // 2] ^= 0x10
        tensors.write_bytes(bytes(data))
    elif defect == "json":
        (folder / STATE_JSON).write_text((folder / STATE_JSON).read_text()[:50])
    else:
        (folder / STATE_JSON).write_text(json.dumps({**state, "version": 99}))
    line = one_error_line(cli(*args, "--resume"))
    assert "checkpoint" in line and {"truncate": "sha256", "flip": "sha256", "json": "not valid JSON",
                                     "version": "version 99"}[defect] in line
    assert not out.exists()


class _FullAfterOneTensor(dict):
    """Tensors whose second read while being written fails with ENOSPC (a disk filling up midway)."""

    reads = 0

    def __getitem__(self, key):
        type(self).reads += 1
        if type(self).reads > len(self) + 1:  # the spec pass reads each once; then writing starts
            _enospc(key)
        return super().__getitem__(key)


@pytest.mark.parametrize("where", ["tensors", "commit"])
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(where, tiny_llama_dir, data_dir, tmp_path, monkeypatch):
    import layerzo.tune.checkpoint as checkpoint

    saves = {"n": 0}
    real_write, real_fsync = checkpoint.write_shard, os.fsync

    def write_second_fails(path, tensors, metadata):
        saves["n"] += 1
        if saves["n"] == 2:  # midway: the temp file has its header and first tensor when the disk fills
            _FullAfterOneTensor.reads = 0
            tensors = _FullAfterOneTensor(tensors)
        return real_write(path, tensors, metadata)

    def fsync_second_fails(fd):  # the commit: checkpoint.json's temp file; the new tensors are on disk
        saves["n"] += 1
        return _enospc(fd) if saves["n"] == 2 else real_fsync(fd)

    if where == "tensors":
        monkeypatch.setattr(checkpoint, "write_shard", write_second_fails)
    else:
        monkeypatch.setattr(checkpoint.os, "fsync", fsync_second_fails)
    out = tmp_path / "patch"
    line = one_error_line(cli(*tune_args(tiny_llama_dir, data_dir, out)))
    assert "No space left on device" in line and saves["n"] == 2
    folder = checkpoint_dir(out)
    assert load_checkpoint(folder).step == 3  # the first checkpoint, intact
    state = json.loads((folder / STATE_JSON).read_text())
    assert sorted(p.name for p in folder.iterdir()) == sorted([STATE_JSON, state["tensors"]["file"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patch.ckpt"]


# ----------------------------------------------------------------------------- the folder
def test_the_checkpoint_lives_beside_the_patch_folder(tmp_path):
    assert checkpoint_dir(tmp_path / "runs" / "patch") == tmp_path / "runs" / "patch.ckpt"


def test_run_identity_leaves_out_what_may_change_on_resume():
    a = run_identity({"lr": 1e-3, "checkpoint_every": 3}, (2,), ["w"], {"w": "0" * 64})
    b = run_identity({"lr": 1e-3, "checkpoint_every": 50}, [2], ("w",), {"w": "0" * 64})
    assert a == b == {"recipe": {"lr": 1e-3}, "layers": [2], "names": ["w"], "base_fingerprint": {"w": "0" * 64}}
    json.dumps(a)  # JSON-comparable


def test_check_checkpoint_dir(tmp_path):
    folder = tmp_path / "patch.ckpt"
    assert check_checkpoint_dir(folder, resume=False, overwrite=False) is False  # nothing there
    assert check_checkpoint_dir(folder, resume=True, overwrite=False) is False  # --resume of nothing: start at 0
    save_checkpoint(folder, make_checkpoint())
    assert check_checkpoint_dir(folder, resume=True, overwrite=False) is True
    with pytest.raises(OutputExistsError, match="interrupted run"):
        check_checkpoint_dir(folder, resume=False, overwrite=False)
    assert (folder / STATE_JSON).is_file()  # never silently discarded
    assert check_checkpoint_dir(folder, resume=False, overwrite=True) is False
    assert not folder.exists()
    (tmp_path / "file.ckpt").write_text("x")
    with pytest.raises(OutputExistsError, match="not a checkpoint folder"):
        check_checkpoint_dir(tmp_path / "file.ckpt", resume=True, overwrite=True)


# ----------------------------------------------------------------------------- saving and loading
def test_a_new_save_replaces_the_old_state_file_and_stray_temp_files(tmp_path):
    folder = tmp_path / "patch.ckpt"
    save_checkpoint(folder, make_checkpoint(step=2))
    (folder / ".checkpoint.json.killed.tmp").write_text("left by a killed save")
    save_checkpoint(folder, make_checkpoint(step=3, scale=2.0))
    state = json.loads((folder / STATE_JSON).read_text())
    assert sorted(p.name for p in folder.iterdir()) == sorted([STATE_JSON, state["tensors"]["file"]])
    assert state["tensors"]["file"].startswith("state-00000003-")
    loaded = load_checkpoint(folder)
    expected = make_checkpoint(step=3, scale=2.0)
    assert loaded.step == 3 and loaded.trajectory == expected.trajectory and loaded.batches == (1, 4)
    assert all(torch.equal(loaded.params[n], expected.params[n]) for n in NAMES)
    assert loaded.seed_rng == expected.seed_rng
    remove_checkpoint(folder)
    assert not folder.exists()


def test_load_refuses_an_inconsistent_checkpoint_in_one_line(tmp_path):
    folder = save_checkpoint(tmp_path / "patch.ckpt", make_checkpoint())
    state = json.loads((folder / STATE_JSON).read_text())
    (folder / STATE_JSON).write_text(json.dumps({**state, "rows": state["rows"][:-1]}))
    with pytest.raises(CheckpointError, match="one metrics object per step") as info:
        load_checkpoint(folder)
    assert "\n" not in info.value.one_line() and "--overwrite" in info.value.one_line()
    (folder / STATE_JSON).write_text(json.dumps(state).replace('"dev_acc": 0.5', '"dev_acc": NaN'))
    with pytest.raises(CheckpointError, match="not valid JSON"):  # NaN is refused, though json accepts it
        load_checkpoint(folder)


@pytest.mark.parametrize("value", ["9" * 400, "-" + "9" * 400, str(2**53 + 1), '"1.5"', "true"])
def test_load_refuses_timing_that_is_no_float_in_one_line(tmp_path, value):
    """A 400-digit int made math.isfinite raise OverflowError (found by the fuzzer): now one CheckpointError."""
    checkpoint = make_checkpoint()
    checkpoint.seconds = {"step_seconds": 1.25}
    folder = save_checkpoint(tmp_path / "patch.ckpt", checkpoint)
    text = (folder / STATE_JSON).read_text()
    (folder / STATE_JSON).write_text(text.replace('"step_seconds": 1.25', f'"step_seconds": {value}'))
    with pytest.raises(CheckpointError, match="field seconds must map names to numbers"):
        load_checkpoint(folder)
    (folder / STATE_JSON).write_text(text.replace('"step_seconds": 1.25', '"step_seconds": 12'))
    assert load_checkpoint(folder).seconds == {"step_seconds": 12}  # an int of seconds is fine


def test_check_resumable_refuses_another_run():
    ckpt = make_checkpoint()
    same = run_identity({"lr": 1e-3, "seed": 0, "checkpoint_every": 10}, [1], NAMES, {n: "ab" * 32 for n in NAMES})
    check_resumable("ckpt", ckpt, same, total_steps=3)  # checkpoint_every may differ
    with pytest.raises(CheckpointError, match="seed=0 but this run has seed=1"):
        check_resumable("ckpt", ckpt, {**same, "recipe": {"lr": 1e-3, "seed": 1}}, total_steps=3)
    with pytest.raises(CheckpointError, match="other base weights"):
        check_resumable("ckpt", ckpt, {**same, "base_fingerprint": {n: "cd" * 32 for n in NAMES}}, total_steps=3)
    with pytest.raises(CheckpointError, match="beyond --steps 2"):
        check_resumable("ckpt", ckpt, same, total_steps=2)


# ----------------------------------------------------------------------------- Ctrl-C / SIGTERM
def handlers() -> tuple:
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def test_the_first_ctrl_c_asks_to_stop_and_the_second_interrupts():
    before = handlers()
    with StopOnInterrupt() as stop:
        assert not stop.requested and stop.signum is None
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signum == signal.SIGINT  # the step in flight finishes
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert handlers() == before


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_asks_to_stop_like_ctrl_c_and_a_second_signal_of_either_kind_interrupts(second):
    before = handlers()
    with StopOnInterrupt() as stop:
        assert signal.getsignal(signal.SIGTERM) is not before[1]  # installed for SIGTERM too
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), second)
        assert stop.signum == signal.SIGTERM  # the first signal is the one reported
    assert handlers() == before


def test_previous_handlers_are_restored_even_when_the_block_fails():
    seen = []
    old_int = signal.signal(signal.SIGINT, lambda *a: seen.append("int"))
    old_term = signal.signal(signal.SIGTERM, lambda *a: seen.append("term"))
    try:
        mine = handlers()
        with pytest.raises(RuntimeError), StopOnInterrupt():
            raise RuntimeError("boom")
        assert handlers() == mine
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == ["term"]
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def test_the_signal_that_stopped_the_run_travels_on_tune_interrupted():
    """The loop raises TuneInterrupted inside the block; leaving it, the exception learns the signal (CLI: 128+n)."""
    with pytest.raises(TuneInterrupted) as info, StopOnInterrupt() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        raise TuneInterrupted("interrupted after step 1 of 2", checkpoint_dir(Path("p")), 1)
    assert info.value.signum == signal.SIGTERM
    with pytest.raises(TuneInterrupted) as plain:  # raised without a handler: Ctrl-C, as before
        raise TuneInterrupted("interrupted", Path("p.ckpt"), 1)
    assert plain.value.signum == signal.SIGINT


def test_a_disabled_stop_handler_installs_nothing():
    before = handlers()
    with StopOnInterrupt(enabled=False) as stop:
        assert handlers() == before and not stop.enabled
