"""Every command over a matrix of bad inputs: one line, no traceback, nothing written.

The bad inputs are corrupted copies of the tiny checkpoint (``tiny_llama_dir``),
made once per module: a truncated shard, a shard whose header declares 2**62
bytes, config.json that is not JSON / not UTF-8 / a folder / of an unknown
model_type, no tokenizer, a folder that is no model; plus bad patches, bad
files (non-UTF-8, a folder where a file is expected), bad options (an absent
device, an lr that overflows float32) and usage errors. For each case:

* exit code 1 (2 for a usage error) and exactly one non-empty line on stderr;
* no "Traceback" anywhere in the output, no doubled word ("at at", "X, X");
* nothing written: the output does not exist, nothing new appeared beside it,
  and the inputs are byte for byte as they were.

push/pull run offline (conftest sets HF_HUB_OFFLINE=1) or on bad arguments.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Callable

import pytest
import torch
from typer.testing import CliRunner

from layerzo.cli.main import app
from patch_helpers import make_patch

S1, S3 = "model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
NOT_CACHED = "layerzo-tests/no-such-patch"  # a Hub id no test pushes or caches


# ----------------------------------------------------------------------------- the bad inputs, once per module
def linked_copy(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose files are hard links (cheap); corrupt a file only through :func:`rewrite`."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def rewrite(path: Path, data: bytes) -> None:
    """Replace a (hard-linked) file by a new one: the original checkpoint's file is untouched."""
    path.unlink()
    path.write_bytes(data)


def _truncated_untouched_shard(d: Path) -> None:  # shard 1: embeddings + layer 0, which a layer-2 patch never rewrites
    rewrite(d / S1, (d / S1).read_bytes()[:-100])


def _huge_header(d: Path) -> None:  # the header length says 2**62 bytes
    rewrite(d / S3, struct.pack("<Q", 2**62) + (d / S3).read_bytes()[8:])


def _config(data: bytes) -> Callable[[Path], None]:
    return lambda d: rewrite(d / "config.json", data)


def _config_is_a_folder(d: Path) -> None:
    (d / "config.json").unlink()
    (d / "config.json").mkdir()


def _unknown_model_type(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    rewrite(d / "config.json", json.dumps({**config, "model_type": "nosuch"}).encode())


def _no_tokenizer(d: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (d / name).unlink(missing_ok=True)


def _not_a_model(d: Path) -> None:
    for p in d.iterdir():
        p.unlink()
    (d / "README.md").write_text("my notes\n")


def _index_key_not_in_its_shard(d: Path) -> None:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.extra.weight"] = S1
    rewrite(d / "model.safetensors.index.json", json.dumps(index).encode())


BASE_DEFECTS = {
    "truncated-shard": (_truncated_untouched_shard, f"{S1} is"),
    "huge-header": (_huge_header, S3),
    "config-not-json": (_config(b"{not json"), "config.json is not valid JSON"),
    "config-not-utf8": (_config(b"\xff\xfe{\x00}"), "config.json is not UTF-8"),
    "config-is-a-folder": (_config_is_a_folder, "config.json is a folder"),
    "config-not-an-object": (_config(b"[1, 2]"), "must hold a JSON object"),
    "unknown-model-type": (_unknown_model_type, "model_type 'nosuch'"),
    "no-tokenizer": (_no_tokenizer, "has no tokenizer"),
    "not-a-model": (_not_a_model, "is not a model: expected a checkpoint folder"),
    "index-key-missing": (_index_key_not_in_its_shard, "model.layers.0.extra.weight"),
}


@pytest.fixture(scope="module")
def bases(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-bases")
    out = {}
    for name, (corrupt, _) in BASE_DEFECTS.items():
        corrupt(linked_copy(tiny_llama_dir, root / name))
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def files(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """A good patch of layer 2, bad patches, and small bad files."""
    from transformers import AutoModelForCausalLM

    from layerzo.patch.manifest import MANIFEST_NAME, WEIGHTS_NAME

    root = tmp_path_factory.mktemp("bad-files")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    good = make_patch(model, 2, base_model=str(tiny_llama_dir)).save_pretrained(root / "patch")
    truncated = shutil.copytree(good, root / "patch-truncated")
    rewrite(truncated / WEIGHTS_NAME, (truncated / WEIGHTS_NAME).read_bytes()[:1000])
    not_json = shutil.copytree(good, root / "patch-manifest-not-json")
    rewrite(not_json / MANIFEST_NAME, b"{not json")
    (root / "a-file").write_text("not a folder\n")
    (root / "calib.txt").write_text("hello world\nthe cat sat on the mat\n")
    (root / "not-utf8.txt").write_bytes(b"\xff\xfe bad\n")
    (root / "not-utf8.yaml").write_bytes(b"lr: 1e-3\n\xff\xfe\n")
    (root / "folder.yaml").mkdir()
    (root / "a-folder").mkdir()
    user = '{"role": "user", "content": "Is it good?"}'
    (root / "chat-bad-role.jsonl").write_text(
        f'{{"messages": [{user}, {{"role": "assistant", "content": "yes"}}]}}\n' * 3
        + f'{{"messages": [{user}, {{"role": "robot", "content": "no"}}]}}\n')
    (root / "chat-no-assistant.jsonl").write_text(f'{{"messages": [{user}]}}\n')
    (root / "pc-empty-completion.jsonl").write_text('{"prompt": "Q: 1+1?\\nA:", "completion": " 2"}\n'
                                                    '{"prompt": "Q: 2+2?\\nA:", "completion": "  "}\n')
    (root / "pc-mixed.jsonl").write_text('{"prompt": "Q", "completion": " A"}\n'
                                         f'{{"messages": [{user}, {{"role": "assistant", "content": "yes"}}]}}\n')
    return {"patch": good, "patch-truncated": truncated, "patch-not-json": not_json, "root": root,
            "a-folder": root / "a-folder",
            **{p.name: p for p in root.iterdir() if p.is_file() or p.suffix == ".yaml"}}


# ----------------------------------------------------------------------------- the commands
def tune_args(model, data, out, *extra) -> list:
    return ["tune", "--model", model, "--data-dir", data, "--task", "sst2", "--layers", "2", "--steps", "2",
            "--batch-size", "2", "--num-train", "4", "--num-dev", "2", "--num-test", "2", "--quiet", "-o", out, *extra]


def sweep_args(model, data, out, *extra) -> list:
    return ["sweep", "--model", model, "--data-dir", data, "--layers", "2", "--no-full", "--steps", "1",
            "--batch-size", "2", "--num-train", "4", "--num-dev", "2", "--num-test", "2", "--quiet", "-o", out, *extra]


def base_commands(base, ctx) -> dict[str, list]:
    """The commands that read a BASE model, each writing to ``ctx['out']``."""
    data, out, patch, calib = ctx["data"], ctx["out"], ctx["files"]["patch"], ctx["files"]["calib.txt"]
    return {
        "profile": ["profile", "--model", base, "--calib", calib, "--num-sequences", "2", "--plot", f"{out}.png"],
        "tune": tune_args(base, data, out),
        "apply": ["apply", base, patch, "-o", out],
        "eval": ["eval", "--model", base, "--tasks", "sst2", "--data-dir", data, "--limit", "2", "-o", f"{out}.json"],
        "export": ["export", "--model", base, "-o", out],
        "export-onnx": ["export-onnx", "--model", base, "-p", patch, "-o", out],
        "sweep": sweep_args(base, data, out),
        "generate": ["generate", "--model", base, "-p", patch, "Question: who?\nAnswer:"],
    }


def other_cases(ctx) -> dict[str, tuple[list, int, str]]:
    """id → (argv, exit code, a phrase of the error line) for inputs other than a corrupt base."""
    base, data, out, f = ctx["base"], ctx["data"], ctx["out"], ctx["files"]
    patch, a_file = f["patch"], f["a-file"]
    return {
        # devices and numbers
        "tune-device-cuda": (tune_args(base, data, out, "--device", "cuda"), 1, "is not available on this machine"),
        "profile-device-cuda": (["profile", "--model", base, "--calib", f["calib.txt"], "--device", "cuda"], 1,
                                "is not available"),
        "eval-device-cuda": (["eval", "--model", base, "--tasks", "sst2", "--data-dir", data, "--device", "cuda"], 1,
                             "is not available"),
        "sweep-device-cuda": (sweep_args(base, data, out, "--device", "cuda"), 1, "is not available"),
        "tune-device-nosuch": (tune_args(base, data, out, "--device", "nosuch"), 1, "unknown device 'nosuch'"),
        "tune-lr-1e308": (tune_args(base, data, out, "--lr", "1e308"), 1, "lr must be at most"),
        "tune-weight-decay-1e39": (tune_args(base, data, out, "--weight-decay", "1e39"), 1, "weight_decay must be"),
        "sweep-lr-1e308": (sweep_args(base, data, out, "--lr", "1e308"), 1, "lr must be at most"),
        "tune-seed-2**64": (tune_args(base, data, out, "--seed", str(2**64)), 1, "seed must be at most"),
        "tune-lora-rank-huge": (tune_args(base, data, out, "--lora", "--lora-rank", "1000000000"), 1,
                                "lora_rank 1000000000 is larger than"),
        "eval-seed-2**40": (["eval", "--model", base, "--tasks", "sst2", "--data-dir", data, "--seed", str(2**40)], 1,
                            "--seed must be an integer from 0 to 2**32 - 1"),
        "tune-layers-99": (tune_args(base, data, out, "--layers", "99"), 1, "--layers 99 is out of range"),
        # generative tasks and user data
        "tune-squad-objective-choice": (tune_args(base, data, out, "--task", "squad", "--objective", "choice"), 1,
                                        "--objective choice does not fit task 'squad', which is generative"),
        "tune-sst2-objective-f1": (tune_args(base, data, out, "--objective", "f1"), 1,
                                   "--objective f1 does not fit task 'sst2', which is multiple-choice"),
        "tune-objective-unknown": (tune_args(base, data, out, "--objective", "bleu"), 1, "objective must be one of"),
        "tune-max-new-tokens-0": (tune_args(base, data, out, "--max-new-tokens", "0"), 1,
                                  "max_new_tokens must be an integer"),
        "tune-squad-no-room-for-the-prompt": (tune_args(base, data, out, "--task", "squad", "--max-length", "50",
                                                        "--max-new-tokens", "50"), 1, "must exceed max_new_tokens"),
        "tune-chat-unknown-role": (tune_args(base, data, out, "--task", f["chat-bad-role.jsonl"]), 1,
                                   "chat-bad-role.jsonl:4:"),
        "tune-chat-no-assistant-turn": (tune_args(base, data, out, "--task", f["chat-no-assistant.jsonl"]), 1,
                                        "chat-no-assistant.jsonl:1:"),
        "tune-empty-completion": (tune_args(base, data, out, "--task", f["pc-empty-completion.jsonl"]), 1,
                                  "pc-empty-completion.jsonl:2: field 'completion' is empty"),
        "tune-mixed-row-formats": (tune_args(base, data, out, "--task", f["pc-mixed.jsonl"]), 1, "pc-mixed.jsonl:2:"),
        "tune-prefix-cache-gb-negative": (tune_args(base, data, out, "--prefix-cache-gb", "-1"), 1,
                                          "prefix_cache_gb must be a number of GiB"),
        "tune-lr-not-a-number": (tune_args(base, data, out, "--lr", "fast"), 1, "lr must be a number"),
        "tune-lr-search-one-rate": (tune_args(base, data, out, "--lr-search", "1e-4"), 1,
                                    "lr_search needs at least 2 distinct positive learning rates"),
        "tune-lr-search-word": (tune_args(base, data, out, "--lr-search", "sometimes"), 1,
                                "lr_search must be off, auto or a comma list"),
        "tune-layers-auto-in-a-sweep": (sweep_args(base, data, out, "--layers", "auto"), 1, "--layers must be 'all'"),
        # bad patches
        "apply-patch-truncated": (["apply", base, f["patch-truncated"], "-o", out], 1, "does not match its sha256"),
        "eval-patch-not-json": (["eval", "--model", base, "-p", f["patch-not-json"], "--tasks", "sst2",
                                 "--data-dir", data], 1, "is not valid JSON"),
        "generate-patch-truncated": (["generate", "--model", base, "-p", f["patch-truncated"], "hi"], 1,
                                     "does not match its sha256"),
        "generate-empty-prompt": (["generate", "--model", base, "-p", patch, ""], 1, "the prompt is empty"),
        "generate-device-cuda": (["generate", "--model", base, "-p", patch, "--device", "cuda", "hi"], 1,
                                 "is not available"),
        "export-patch-is-a-file": (["export", "--model", base, "-p", a_file, "-o", out], 1, "is a file, not a patch"),
        "push-patch-truncated": (["push", f["patch-truncated"], "me/patch"], 1, "does not match its sha256"),
        "push-no-such-folder": (["push", f["root"] / "nosuch", "me/patch"], 1, "does not exist"),
        "push-offline": (["push", patch, NOT_CACHED], 1, "HF_HUB_OFFLINE"),
        "push-bad-repo-id": (["push", patch, "not a repo id!"], 1, "is not a Hub repo id"),
        "pull-offline": (["pull", NOT_CACHED, "-o", out], 1, "HF_HUB_OFFLINE"),
        "pull-bad-repo-id": (["pull", "not a repo id!", "-o", out], 1, "is not a Hub repo id"),
        # bad files: not UTF-8, a folder where a file is expected
        "profile-calib-not-utf8": (["profile", "--model", base, "--calib", f["not-utf8.txt"]], 1, "is not UTF-8"),
        "profile-calib-is-a-folder": (["profile", "--model", base, "--calib", f["a-folder"]], 1, "is a folder, not a file"),
        "tune-recipe-not-utf8": (tune_args(base, data, out, "--recipe", f["not-utf8.yaml"]), 1, "is not UTF-8"),
        "tune-recipe-is-a-folder": (tune_args(base, data, out, "--recipe", f["folder.yaml"]), 1, "is a folder"),
        "tune-task-yaml-not-utf8": (tune_args(base, data, out, "--task", f["not-utf8.yaml"]), 1, "is not UTF-8"),
        "sweep-task-yaml-is-a-folder": (sweep_args(base, data, out, "--task", f["folder.yaml"]), 1, "is a folder"),
        "eval-data-dir-is-a-file": (["eval", "--model", base, "--tasks", "sst2", "--data-dir", a_file], 1,
                                    "is a file, not a folder"),
        # bad outputs: checked before the work
        "tune-out-is-a-file": (tune_args(base, data, a_file), 1, "is a file, not a folder"),
        "apply-out-is-a-file": (["apply", base, patch, "-o", a_file], 1, "is a file, not a folder"),
        "export-out-is-a-file": (["export", "--model", base, "-o", a_file], 1, "is a file, not a folder"),
        "pull-out-is-a-file": (["pull", NOT_CACHED, "-o", a_file], 1, "is a file, not a folder"),
        "sweep-out-is-a-file": (sweep_args(base, data, a_file), 1, "is a file, not a folder"),
        "apply-out-under-a-file": (["apply", base, patch, "-o", a_file / "sub" / "out"], 1, "Not a directory"),
        "eval-output-is-a-folder": (["eval", "--model", base, "--tasks", "sst2", "--data-dir", data,
                                     "-o", f["a-folder"]], 1, "is a folder, not a file"),
        "eval-output-is-an-input": (["eval", "--model", base, "-p", patch, "--tasks", "sst2", "--data-dir", data,
                                     "-o", patch / "layerzo_patch.json"], 1, "sits inside the input"),
        "profile-plot-is-a-folder": (["profile", "--model", base, "--calib", f["calib.txt"], "--plot", f["a-folder"]], 1,
                                     "is a folder, not a file"),
        "profile-plot-is-the-calib": (["profile", "--model", base, "--calib", f["calib.txt"],
                                       "--plot", f["calib.txt"]], 1, "is the input"),
        "profile-plot-under-a-file": (["profile", "--model", base, "--calib", f["calib.txt"],
                                       "--plot", a_file / "p.png"], 1, "Not a directory"),
        "sweep-out-in-the-base": (sweep_args(base, data, Path(base) / "sweep"), 1, "sits inside the input"),
        "sweep-unknown-task": (sweep_args(base, data, out, "--task", "nosuch"), 1, "unknown task 'nosuch'"),
        # usage errors: exit code 2, one line too
        **{f"{cmd}-unknown-option": ([*cmd.split(), "--no-such-option"], 2, "No such option") for cmd in
           ("profile", "tune", "apply", "push", "pull", "eval", "generate", "export", "export-onnx", "sweep")},
        "generate-missing-prompt": (["generate", "-p", patch], 2, "Missing argument 'PROMPT'"),
        "tune-missing-out": (["tune", "--model", base], 2, "Missing option '--out'"),
        "tune-steps-not-a-number": (tune_args(base, data, out, "--steps", "many"), 2, "Invalid value for '--steps'"),
        "apply-missing-patch": (["apply", base], 2, "Missing argument"),
        "no-such-command": (["nosuch"], 2, "No such command"),
    }


# ----------------------------------------------------------------------------- the checks
def invoke(argv: list) -> "CliRunner.Result":
    return CliRunner().invoke(app, [str(a) for a in argv])


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def assert_one_line_nothing_written(argv: list, code: int, phrase: str, out_parent: Path, inputs: list[Path]) -> str:
    before = sorted(p.name for p in out_parent.iterdir()), [digest(p) for p in inputs]
    result = invoke(argv)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == code and len(lines) == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    line = " ".join(lines[0].split())
    assert phrase in line, line
    doubled = re.search(r"\b(\w[\w.-]*)(,? )\1(?=[\s,;.)]|$)", line.removeprefix("error: "))
    assert doubled is None or doubled.group(1).isdigit(), f"doubled word {doubled.group(0)!r} in: {line}"
    assert (sorted(p.name for p in out_parent.iterdir()), [digest(p) for p in inputs]) == before
    return line


@pytest.fixture()
def ctx(tiny_llama_dir, data_dir, files, tmp_path) -> dict:
    return {"base": tiny_llama_dir, "data": data_dir, "files": files, "out": tmp_path / "out"}


BASE_COMMANDS = ("profile", "tune", "apply", "eval", "generate", "export", "export-onnx", "sweep")
# apply copies the tokenizer files it finds and reads none: a checkpoint without them is still one
NOT_BAD_FOR = {("no-tokenizer", "apply")}


@pytest.mark.parametrize("defect, command", [(d, c) for d in BASE_DEFECTS for c in BASE_COMMANDS
                                             if (d, c) not in NOT_BAD_FOR])
def test_a_bad_base_is_one_line_naming_the_file(defect, command, bases, ctx, tmp_path):
    base = bases[defect]
    argv = base_commands(base, ctx)[command]
    line = assert_one_line_nothing_written(argv, 1, BASE_DEFECTS[defect][1], tmp_path, [base, ctx["files"]["patch"]])
    assert str(base) in line  # the user's path, never a temp name


FILE_KEYS = ("patch", "patch-truncated", "patch-not-json", "root", "a-folder", "a-file", "calib.txt", "not-utf8.txt",
             "not-utf8.yaml", "folder.yaml", "chat-bad-role.jsonl", "chat-no-assistant.jsonl", "pc-empty-completion.jsonl",
             "pc-mixed.jsonl")
OTHER_CASES = list(other_cases({"base": "", "data": "", "out": Path(), "files": dict.fromkeys(FILE_KEYS, Path())}))


@pytest.mark.parametrize("case", [pytest.param(c, marks=NO_CUDA) if "device-cuda" in c else c for c in OTHER_CASES])
def test_a_bad_option_file_or_output_is_one_line_with_nothing_written(case, ctx, tmp_path, tiny_llama_dir):
    argv, code, phrase = other_cases(ctx)[case]
    files = ctx["files"]
    assert_one_line_nothing_written(argv, code, phrase, tmp_path,
                                    [tiny_llama_dir, files["patch"], files["root"]])


def test_tune_out_that_is_a_file_says_so(ctx, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    line = assert_one_line_nothing_written(tune_args(ctx["base"], ctx["data"], target), 1, "", tmp_path, [target])
    assert line == f"error: the output {target} is a file, not a folder (give a folder path for the output)"


def test_sweep_with_an_unknown_task_leaves_no_empty_out_folder(ctx, tmp_path):
    assert_one_line_nothing_written(sweep_args(ctx["base"], ctx["data"], ctx["out"], "--task", "nosuch"), 1,
                                    "unknown task 'nosuch'", tmp_path, [])
    assert not ctx["out"].exists()


# ----------------------------------------------------------------------------- an unwritable output parent
@pytest.fixture()
def unwritable(tmp_path, monkeypatch) -> Path:
    """A folder this process may not create files in: chmod for a normal user; as root (which chmod does not
    stop) the immutable flag, where the file system has one; else os.access says no, as it would."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        yield folder
        subprocess.run(["chattr", "-i", str(folder)], check=True)
        return
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == folder else real_access(p, mode, **kw))
    yield folder


@pytest.mark.parametrize("command", ["tune", "apply", "export", "pull", "eval", "profile", "sweep"])
def test_an_unwritable_output_parent_names_the_users_path(command, unwritable, ctx, tmp_path):
    out = unwritable / "out"
    argv = {**base_commands(ctx["base"], {**ctx, "out": out}), "pull": ["pull", NOT_CACHED, "-o", out]}[command]
    line = assert_one_line_nothing_written(argv, 1, "cannot write", unwritable, [ctx["base"]])
    assert f"{out}" in line and "Permission denied" in line, line
    assert ".tmp" not in line and ".lock" not in line and "probe" not in line
