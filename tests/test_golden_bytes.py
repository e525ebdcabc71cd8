"""Behaviour pin for refactors: a fixed set of tune runs must keep writing the same patch bytes.

The sha256 values in ``fixtures/golden_patch_sha256.json`` were recorded with the
code as it stood before the package redesign (issue 12). Runs: tiny Llama and tiny
Qwen3, one layer, ``--layers all``, LoRA-ZO, q=2 with momentum, and a run stopped
by a crash right after a checkpoint and resumed.

Local paths (the tmp checkpoint and data folders) differ per test session, so the
manifest and card are hashed with those two paths replaced by placeholders; the
weight and trajectory files are hashed as they are. Regenerate the file only when
a change is MEANT to alter the bytes: ``LAYERZO_WRITE_GOLDEN=1 pytest tests/test_golden_bytes.py``.
That happened once, by design, after the redesign had passed against the first recording:
the reliability round made patches record the base's name instead of its local path, added
the ``keep`` recipe key and the ``kept``/``no_op`` metrics, and made the card agree with the
manifest; later the ``select`` recipe key and, for LoRA patches, the PEFT adapter files listed in
the manifest; then the ``objective``, ``max_new_tokens`` and ``prefix_cache_gb`` recipe keys (generative tasks; the
per-example lower-layer cache, on by default). There five runs kept their tensor and trajectory
bytes; llama_lora and qwen3_q2_momentum moved by fp32 rounding (a row's lower-layer output computed
in another batch), and with ``prefix_cache_gb=0`` both reproduced their previous trajectory bytes
exactly. Then the ``lr_search`` and ``paired_forward`` recipe keys (``--lr auto``; one forward for + and -,
off by default on CPU): only the manifest and the card changed. Every earlier time the trajectories, the tensor data (``tensor data``) and, after the
first time, the whole weight files came out identical (LoRA-ZO moved onto peft with the same bytes).

Per CPU kind. The numbers are bit-exact on one machine, not across CPU kinds: four of the seven runs
write other tensor and trajectory bytes on an AMD EPYC than on the Intel Xeon they were first recorded
on (fp32 matmul kernels round differently), the same code on both. So the weight, tensor-data and
trajectory digests hold a list, one value per CPU kind seen (recording adds this machine's value),
while the manifest and card are hashed with those files' sha256 replaced by placeholders: they must
match exactly everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import crash_after_a_checkpoint_then_resume, make_tiny_model
from layerzo.model.loading import load_model

GOLDEN = Path(__file__).parent / "fixtures" / "golden_patch_sha256.json"
PATCH_FILES = ("layer_patch.safetensors", "layerzo_patch.json", "trajectory.jsonl", "README.md")
# The files whose bytes are the run's numbers: fp32 kernels round differently on different CPU kinds
# (Intel Xeon with AVX-512 vs AMD EPYC), so each lists the digest of every CPU kind it was recorded on.
NUMERIC_FILES = ("tensor data", "layer_patch.safetensors", "trajectory.jsonl")
# num_dev=0: the final weights are the result, so every run records all its steps (a dev set whose
# accuracy never beats zero-shot would leave an empty trajectory and pin nothing); one run keeps a dev set.
COMMON = dict(task="sst2", steps=6, batch_size=4, num_train=24, num_dev=0, num_test=8, eval_every=2,
              lr=1e-3, eps=1e-2, eval_batch_size=8, max_length=64)
RUNS = {
    "llama_layer": dict(arch="llama", layers="2"),
    "llama_layer_dev": dict(arch="llama", layers="2", num_dev=8),
    "llama_all": dict(arch="llama", layers="all", lr=1e-4),
    "llama_lora": dict(arch="llama", layers="1", lora=True, lora_rank=4, lora_alpha=8.0),
    "qwen3_layer": dict(arch="qwen3", layers="1"),
    "qwen3_q2_momentum": dict(arch="qwen3", layers="2", q=2, momentum=0.9, weight_decay=0.01),
    "llama_resumed": dict(arch="llama", layers="2", momentum=0.5, checkpoint_every=3),
}


@pytest.fixture(scope="module")
def checkpoints(tiny_llama_dir, tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    qwen3 = tmp_path_factory.mktemp("tiny-qwen3")
    make_tiny_model("qwen3", num_layers=4, seed=3).save_pretrained(qwen3)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, qwen3 / f.name)
    return {"llama": tiny_llama_dir, "qwen3": qwen3}


def patch_digests(out: Path, placeholders: dict[str, str]) -> dict[str, str]:
    def unplaced(text: str) -> bytes:
        for path, tag in placeholders.items():
            text = text.replace(path, tag)
        return text.encode("utf-8")

    raw = {name: (out / name).read_bytes() for name in PATCH_FILES}
    digests: dict[str, str] = {}
    for name in PATCH_FILES:
        data = raw[name]
        if name.endswith(".safetensors"):  # the header's metadata names the base model's path
            n = int.from_bytes(data[:8], "little")
            digests["tensor data"] = hashlib.sha256(data[8 + n :]).hexdigest()  # the numbers alone
            data = unplaced(data[8 : 8 + n].decode("utf-8")) + data[8 + n :]
        digests[name] = hashlib.sha256(data).hexdigest()
    # the manifest and card carry the other files' sha256 (weights, trajectory, a LoRA patch's PEFT adapter):
    # the header's path changes the weights', and all follow the numbers, which are pinned above (per CPU
    # kind: see the module docstring)
    shas = {hashlib.sha256(f.read_bytes()).hexdigest(): f"<{f.name}_SHA>" for f in sorted(out.iterdir())
            if f.is_file() and f.name not in ("layerzo_patch.json", "README.md")}
    for name in ("layerzo_patch.json", "README.md"):
        text = raw[name].decode("utf-8")
        for sha, tag in shas.items():
            text = text.replace(sha, tag)
        digests[name] = hashlib.sha256(unplaced(text)).hexdigest()
    return digests


def run_golden(name: str, model_dir: Path, data_dir: Path, out: Path, monkeypatch) -> None:
    from layerzo.tune.loop import tune
    from layerzo.tune.config import TuneConfig

    spec = dict(RUNS[name])
    spec.pop("arch")
    config = TuneConfig.from_dict({"model": str(model_dir), "data_dir": str(data_dir), **COMMON, **spec})
    if name != "llama_resumed":
        tune(config, out, progress=False, loaded=load_model(str(model_dir)))
        return
    crash_after_a_checkpoint_then_resume(config, out, monkeypatch)  # the crash comes after the step-3 checkpoint


@pytest.mark.parametrize("name", list(RUNS))
def test_patch_bytes_match_the_recorded_run(name, checkpoints, data_dir, tmp_path, monkeypatch):
    model_dir = checkpoints[RUNS[name]["arch"]]
    out = tmp_path / "patch"
    run_golden(name, model_dir, data_dir, out, monkeypatch)
    trajectory = (out / "trajectory.jsonl").read_text().splitlines()
    if name != "llama_layer_dev":  # this run's best dev accuracy is at step 0: it pins the best-dev path
        assert len(trajectory) == COMMON["steps"]
    got = patch_digests(out, {str(model_dir.absolute()): "<MODEL>", str(Path(data_dir).absolute()): "<DATA>"})
    recorded = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if os.environ.get("LAYERZO_WRITE_GOLDEN") == "1":  # adds this machine's values to the accepted ones
        mine = {f: sorted(set(recorded.get(name, {}).get(f, [])) | {d}) if f in NUMERIC_FILES else [d]
                for f, d in got.items()}
        GOLDEN.write_text(json.dumps({**recorded, name: mine}, indent=2, sort_keys=True) + "\n")
        return
    assert name in recorded, f"no recorded digests for {name}; see the module docstring"
    assert set(got) == set(recorded[name])
    for f, digest in got.items():
        assert digest in recorded[name][f], (f"{name}: {f} changed" + (
            " (or this CPU kind rounds fp32 differently from the recorded ones: see the module docstring)"
            if f in NUMERIC_FILES else ""))
