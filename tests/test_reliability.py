"""Reliability of ``layerzo tune`` / ``apply``: interruption and bit-exact resume (SIGKILL and
Ctrl-C on a real subprocess), divergence, secrets, disk-full and unwritable outputs, and no
pickle anywhere in the package. Checkpoint refusals and a disk filling up during a checkpoint
save are in test_tune_checkpoint.py (which borrows this file's CLI helpers).

Each test injects one fault and checks the protection against it; the seed of the random
kill point is printed (rerun one with ``LAYERZO_KILL_SEED=<seed>``).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hub_server import FakeHub
from layerzo.tune.checkpoint import STATE_JSON, checkpoint_dir, load_checkpoint
from layerzo.cli.main import app
from layerzo.errors import OutputExistsError
from layerzo.patch.format import LayerPatch
from layerzo.patch.manifest import MANIFEST_NAME, PATCH_FILES, WEIGHTS_NAME
from layerzo.io.safetensors import CheckpointReader
from layerzo.tune.loop import METRICS_NAME, tune
from layerzo.tune.config import TuneConfig
from layerzo.zo.engine import replay_trajectory
from test_io_hub import TOKEN, files_containing, online  # noqa: F401  (online: fixture)

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("kill_worker.py")
STEPS = 24
TIMING = ("seconds", "eval_seconds")


def tune_args(model_dir: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    """A tiny but real run: sst2, momentum (buffers to restore), dev evals (best weights), checkpoints every 3."""
    return ["tune", "--model", str(model_dir), "--data-dir", str(data_dir), "--task", "sst2", "--layers", "2",
            "--steps", str(STEPS), "--batch-size", "4", "--num-train", "32", "--num-dev", "8", "--num-test", "8",
            "--eval-every", "5", "--lr", "1e-3", "--eps", "1e-2", "--momentum", "0.5", "--checkpoint-every", "3",
            "--quiet", "--out", str(out), *extra]


def cli(*args) -> "CliRunner.Result":
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    return lines[0]


def metric_rows(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / METRICS_NAME).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def assert_same_run(a: Path, b: Path) -> None:
    """The same files, byte-identical patch files; metrics.jsonl identical except the per-step wall-clock seconds."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert {MANIFEST_NAME, WEIGHTS_NAME, METRICS_NAME} <= set(names) <= {*PATCH_FILES, METRICS_NAME}, names
    for name in set(names) & set(PATCH_FILES):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert metric_rows(a) == metric_rows(b)


def logged_rows(out: Path) -> int:
    """Steps the running tune has logged so far (its metrics.jsonl is streamed to a temp file)."""
    # .OUT.<pid>.metrics.jsonl.tmp: the pid lets a later run remove a killed run's file
    return sum(p.read_text().count("\n") for p in out.parent.glob(f".{out.name}.*.{METRICS_NAME}.tmp"))


def start_worker(args: list[str], delay: float = 0.12) -> subprocess.Popen:
    env = {**os.environ, "HF_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}  # conftest's OMP_NUM_THREADS=1 travels too
    return subprocess.Popen([sys.executable, str(WORKER), str(delay), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_until_logged(proc: subprocess.Popen, out: Path, rows: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while logged_rows(out) < rows:
        if proc.poll() is not None:
            pytest.fail(f"tune exited early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"tune logged only {logged_rows(out)} of {rows} steps in {timeout} s")
        time.sleep(0.01)


def kill_seed() -> int:
    seed = int(os.environ.get("LAYERZO_KILL_SEED", time.time_ns() % 1_000_000))
    print(f"LAYERZO_KILL_SEED={seed}")
    return seed


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, data_dir, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("reference") / "patch"
    result = cli(*tune_args(tiny_llama_dir, data_dir, out))
    assert result.exit_code == 0, result.output
    assert not checkpoint_dir(out).exists()  # a finished run leaves only the patch
    return out


# ----------------------------------------------------------------------------- interruption
def test_uninterrupted_runs_write_byte_identical_patches(reference, tiny_llama_dir, data_dir, tmp_path):
    """Without timing in the manifest/card, the same seed gives the same bytes for ALL patch files."""
    result = cli(*tune_args(tiny_llama_dir, data_dir, tmp_path / "again", "--checkpoint-every", "0"))
    assert result.exit_code == 0, result.output
    assert_same_run(reference, tmp_path / "again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def test_sigkill_at_a_random_step_then_resume_is_byte_identical(reference, tiny_llama_dir, data_dir, tmp_path):
    rng = random.Random(kill_seed())
    kill_after = rng.randint(2, STEPS - 3)
    out = tmp_path / "patch"
    args = tune_args(tiny_llama_dir, data_dir, out)
    proc = start_worker(args)
    wait_until_logged(proc, out, kill_after)
    time.sleep(rng.uniform(0.0, 0.2))  # anywhere inside the next step, its evaluation or a checkpoint save
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # the patch is written once, at the end
    saved = load_checkpoint(checkpoint_dir(out)).step if (checkpoint_dir(out) / STATE_JSON).exists() else 0
    assert saved <= STEPS and saved % 3 == 0

    result = cli(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert (f"at step {saved} of {STEPS}" if saved else "starting from step 0") in result.stderr
    assert_same_run(reference, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patch"]  # checkpoint and temp files gone


def interrupt_then_resume(reference: Path, tiny_llama_dir: Path, data_dir: Path, tmp_path: Path, sig: int,
                          code: int) -> None:
    """Send ``sig`` to a real ``layerzo tune`` mid-run: it finishes the step, checkpoints, prints the resume
    command and exits with ``code``; that exact command then finishes byte-identically to ``reference``."""
    stop_after = random.Random(kill_seed()).randint(1, STEPS - 4)
    out = tmp_path / "patch"
    proc = start_worker(tune_args(tiny_llama_dir, data_dir, out))
    wait_until_logged(proc, out, stop_after)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    match = re.search(r"interrupted after step (\d+) of 24; checkpoint saved to (\S+)", stderr)
    assert match, stderr
    stopped = int(match.group(1))
    assert stop_after <= stopped <= stop_after + 1  # the step in flight finished, no more
    ckpt = load_checkpoint(checkpoint_dir(out))
    assert ckpt.step == stopped and len(ckpt.rows) == stopped and match.group(2) == str(checkpoint_dir(out))
    assert not out.exists() and logged_rows(out) == 0  # no patch yet, no stray temp log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patch.ckpt"]  # no .patch.*.metrics.jsonl.tmp, no lock
    # the token in the environment reached no file (checkpoint included) and no output
    assert files_containing(tmp_path, TOKEN.encode()) == [] and TOKEN not in stdout + stderr

    line = next(x for x in stderr.splitlines() if x.startswith("resume with: "))
    command = shlex.split(line.removeprefix("resume with: "))
    assert command[:2] == ["layerzo", "tune"] and command[-1] == "--resume"
    result = cli(*command[1:])  # exactly the printed command
    assert result.exit_code == 0, result.output
    assert f"from the checkpoint at step {stopped} of {STEPS}" in result.stderr
    assert_same_run(reference, out)


def test_ctrl_c_saves_a_checkpoint_prints_the_resume_command_and_resumes_exactly(reference, tiny_llama_dir,
                                                                                    data_dir, tmp_path):
    interrupt_then_resume(reference, tiny_llama_dir, data_dir, tmp_path, signal.SIGINT, 130)


def test_sigterm_is_handled_like_ctrl_c_and_exits_143(reference, tiny_llama_dir, data_dir, tmp_path):
    """SLURM, Kubernetes and ``timeout`` send SIGTERM first: the same checkpoint, lines and exact resume as
    Ctrl-C, and the shell's exit code for SIGTERM (128 + 15)."""
    interrupt_then_resume(reference, tiny_llama_dir, data_dir, tmp_path, signal.SIGTERM, 143)


def test_in_process_interrupt_then_resume_with_another_checkpoint_interval(reference, tiny_llama_dir, data_dir,
                                                                           tmp_path, monkeypatch):
    """SIGINT delivered mid-step to the library call (not the CLI): TuneInterrupted after that step.
    checkpoint_every may differ on resume (it changes when we save, not what is computed)."""
    from layerzo.data.objectives import Objective
    from layerzo.errors import TuneInterrupted

    # stop just after the reference's best step: the checkpoint's best weights then differ from its
    # current ones, and the final patch is made of the restored best weights
    best_step = json.loads((reference / "layerzo_patch.json").read_text())["metrics"]["best_step"]
    stop = min(max(best_step + 1, 1), STEPS - 1)
    calls = {"n": 0}
    real = Objective.loss_of_logits  # every training loss goes through it (dev/test scoring does not)

    def loss_then_ctrl_c(self, logits, batch):
        calls["n"] += 1
        if calls["n"] == 2 * (stop - 1) + 1:  # inside step `stop` (q=1: two loss calls per step)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, logits, batch)

    config = TuneConfig.from_dict(dict(model=str(tiny_llama_dir), data_dir=str(data_dir), task="sst2", layers="2", steps=STEPS,
                        batch_size=4, num_train=32, num_dev=8, num_test=8, eval_every=5, lr=1e-3, eps=1e-2,
                        momentum=0.5, checkpoint_every=3))  # = tune_args
    monkeypatch.setattr(Objective, "loss_of_logits", loss_then_ctrl_c)
    with pytest.raises(TuneInterrupted, match=f"after step {stop} of {STEPS}") as info:
        tune(config, tmp_path / "patch", progress=False)
    assert info.value.step == stop and load_checkpoint(info.value.checkpoint).step == stop
    monkeypatch.setattr(Objective, "loss_of_logits", real)
    with pytest.raises(OutputExistsError, match="interrupted run") as refused:  # never silently thrown away
        tune(config, tmp_path / "patch", progress=False)
    assert "--resume" in refused.value.one_line()
    notes = []
    tune(TuneConfig.from_dict(dict(**{**config.to_dict(), "checkpoint_every": 5})), tmp_path / "patch", progress=False, resume=True,
         note=notes.append)
    assert notes == [f"resuming patch from the checkpoint at step {stop} of {STEPS}"]
    assert_same_run(reference, tmp_path / "patch")


def _interrupted_checkpoint(tiny_llama_dir, data_dir, out: Path) -> list[str]:
    """Leave a checkpoint at step 3 (a run made to crash right after saving it); returns the run's args."""
    import layerzo.tune.loop as train

    args = tune_args(tiny_llama_dir, data_dir, out, "--steps", "6")
    real = train.save_checkpoint

    def save_then_crash(folder, ckpt):
        real(folder, ckpt)
        raise OSError(errno.EIO, "simulated crash after the checkpoint", str(folder))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "save_checkpoint", save_then_crash)
        assert cli(*args).exit_code == 1
    assert load_checkpoint(checkpoint_dir(out)).step == 3
    return args


# ----------------------------------------------------------------------------- divergence
def _base_layer(tiny_llama_dir: Path, layer: int) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(tiny_llama_dir)
    return reader.tensors([k for k in reader.weight_map if k.startswith(f"model.layers.{layer}.")])


def test_runaway_gradients_stop_the_run_with_one_line_and_the_best_patch_intact(tiny_llama_dir, data_dir, tmp_path):
    out = tmp_path / "patch"
    line = one_error_line(cli(*tune_args(tiny_llama_dir, data_dir, out, "--max-abs-grad", "1e-9",
                                         "--max-bad-steps", "3")))
    assert "diverged" in line and "3 steps in a row" in line and "max_abs_grad" in line and str(out) in line
    patch = LayerPatch.from_pretrained(out)  # written, valid, and exactly the zero-shot (base) layer
    base = _base_layer(tiny_llama_dir, 2)
    assert patch.trajectory == [] and patch.manifest.metrics["rejected_steps"] == 3
    assert all(torch.equal(patch.tensors[k], base[k]) for k in base)
    assert not checkpoint_dir(out).exists()


def test_non_finite_losses_are_rejected_and_leave_no_trace_in_the_layer(tiny_llama_dir, data_dir, tmp_path,
                                                                        monkeypatch):
    from layerzo.data.objectives import Objective

    calls = {"n": 0}
    real = Objective.loss_of_logits  # every training loss goes through it

    def sometimes_nan(self, logits, batch):  # steps 2 and 3 (0-based 1, 2) see a NaN / inf loss
        calls["n"] += 1
        value = real(self, logits, batch)
        return {3: float("nan"), 6: float("inf")}.get(calls["n"], value)

    monkeypatch.setattr(Objective, "loss_of_logits", sometimes_nan)
    config = TuneConfig.from_dict(dict(model=str(tiny_llama_dir), data_dir=str(data_dir), layers="2", steps=5, batch_size=4,
                        num_train=16, num_dev=0, num_test=4, lr=1e-3, eps=1e-2, max_bad_steps=3))
    result = tune(config, tmp_path / "p", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "p" / METRICS_NAME).read_text().splitlines()]
    assert [r["applied"] for r in rows] == [True, False, False, True, True]
    assert rows[1]["loss_plus"] is None and rows[2]["loss_minus"] is None  # logged as null, strict JSON
    patch = LayerPatch.from_pretrained(tmp_path / "p")
    assert [s.step for s in patch.trajectory] == [0, 3, 4] and result.metrics["rejected_steps"] == 2
    # replaying only the applied steps on the base rebuilds the layer bit-exactly:
    # the rejected steps were restored exactly, they left no trace
    base = {k: v.float() for k, v in _base_layer(tiny_llama_dir, 2).items()}
    ordered = {n: base[n] for n in patch.manifest.metrics["replay"]["tensor_order"]}
    replay_trajectory(ordered, patch.trajectory, config.zo)
    assert all(torch.equal(ordered[k], patch.tensors[k]) for k in ordered)


# ----------------------------------------------------------------------------- secrets
def test_a_tuned_patch_pushed_with_a_token_leaves_it_in_no_file(online, tiny_llama_dir, data_dir,  # noqa: F811
                                                                  tmp_path, monkeypatch):
    """Token in the environment during tune (checkpoint written), resume, push and pull: it is in
    no file under tmp (patch, metrics, model card, checkpoint, pulled copy, HF cache) nor in any output."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "patch"
    args = _interrupted_checkpoint(tiny_llama_dir, data_dir, out)
    assert files_containing(tmp_path, TOKEN.encode()) == []  # the checkpoint included
    outputs = [cli(*args, "--resume")]
    assert outputs[-1].exit_code == 0, outputs[-1].output
    with FakeHub(TOKEN) as hub:
        outputs.append(cli("push", out, "me/tuned", "--token", TOKEN, "--endpoint", hub.endpoint))
        outputs.append(cli("pull", "me/tuned", "-o", tmp_path / "pulled", "--endpoint", hub.endpoint))
        assert all(r.exit_code == 0 for r in outputs), [r.output for r in outputs]
        assert hub.protocol_errors == [] and all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests)
    assert (tmp_path / "pulled" / WEIGHTS_NAME).read_bytes() == (out / WEIGHTS_NAME).read_bytes()
    assert files_containing(tmp_path, TOKEN.encode()) == []  # tmp_path holds the HF cache too (online)
    assert all(TOKEN not in r.output for r in outputs)


# ----------------------------------------------------------------------------- disk full / unwritable
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(args[0]) if args else None)


def test_disk_full_at_the_patch_write_leaves_no_partial_output_and_the_run_resumable(reference, tiny_llama_dir,
                                                                                      data_dir, tmp_path, monkeypatch):
    import layerzo.patch.format as patch_module

    real = patch_module.write_shard
    monkeypatch.setattr(patch_module, "write_shard", _enospc)
    out = tmp_path / "patch"
    line = one_error_line(cli(*tune_args(tiny_llama_dir, data_dir, out)))
    assert "No space left on device" in line
    # no patch, no temp dir, no temp log; the last checkpoint (step 21) is complete, not partial
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patch.ckpt"]
    assert load_checkpoint(checkpoint_dir(out)).step == 21
    monkeypatch.setattr(patch_module, "write_shard", real)  # space freed: resume finishes the run
    assert cli(*tune_args(tiny_llama_dir, data_dir, out), "--resume").exit_code == 0
    assert_same_run(reference, out)


def test_unwritable_output_fails_before_any_work_in_one_line(tiny_llama_dir, data_dir, tmp_path, monkeypatch):
    """Tests run as root, where chmod does not stop writes: a FILE where a folder must be is
    something even root cannot write into."""
    import layerzo.model.loading as models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded although the output cannot be written")

    monkeypatch.setattr(models, "load_model", no_loading)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    line = one_error_line(cli(*tune_args(tiny_llama_dir, data_dir, blocker / "sub" / "patch")))
    assert "Not a directory" in line or "File exists" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_apply_into_an_unwritable_place_is_one_line_with_nothing_written(tiny_llama_dir, reference, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    line = one_error_line(cli("apply", tiny_llama_dir, reference, "-o", blocker / "sub" / "out"))
    assert "Not a directory" in line or "File exists" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ----------------------------------------------------------------------------- no pickle
FORBIDDEN = {
    "torch.load": r"\btorch\.load\s*\(",
    "torch.save (pickle)": r"\btorch\.save\s*\(",
    "pickle-family import": r"^\s*(import|from)\s+(pickle|cPickle|_pickle|dill|cloudpickle|joblib|shelve|marshal)\b",
    "pickle call": r"\bpickle\.(loads?|dumps?|Unpickler|Pickler)\b",
    "numpy allow_pickle": r"allow_pickle\s*=\s*True",
    "torch weights_only=False": r"weights_only\s*=\s*False",
    "trust_remote_code=True": r"trust_remote_code\s*=\s*True",
    "use_safetensors=False": r"use_safetensors\s*=\s*False",
    "torch.distributed object collectives (pickle)":
        r"\b(all_gather_object|broadcast_object_list|gather_object|scatter_object_list)\b",
}


def forbidden_uses(text: str) -> list[str]:
    return [what for what, pattern in FORBIDDEN.items() if re.search(pattern, text, re.MULTILINE)]


def test_the_scanner_catches_each_forbidden_use():
    samples = ["state = torch.load(path)", "torch.save(obj, f)", "import pickle", "from dill import loads",
               "pickle.loads(blob)", "np.load(f, allow_pickle=True)", "torch.load(p, weights_only=False)",
               "AutoModel.from_pretrained(x, trust_remote_code=True)", "from_pretrained(x, use_safetensors=False)",
               "dist.all_gather_object(out, obj)"]
    assert [forbidden_uses(s) != [] for s in samples] == [True] * len(samples)
    assert forbidden_uses("# pickled .bin checkpoints are refused\ntrust_remote_code=trust_remote_code") == []


def test_no_pickle_or_remote_code_anywhere_in_the_package():
    sources = sorted((REPO / "layerzo").rglob("*.py")) + sorted((REPO / "cli").rglob("*.py"))
    assert len(sources) > 20
    hits = {str(p.relative_to(REPO)): forbidden_uses(p.read_text(encoding="utf-8")) for p in sources}
    assert {p: h for p, h in hits.items() if h} == {}
