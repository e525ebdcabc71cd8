"""``layerzo apply``: shard-aware merge round trips, refusals that write nothing, replay."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import layerzo
from conftest import make_tiny_model
from layerzo.cli.main import app
from layerzo.errors import BaseMismatchError
from layerzo.patch.apply import apply_patch, map_keys
from layerzo.patch.provenance import PROVENANCE_NAME
from layerzo.patch.merge import apply_to_model
from layerzo.patch.format import LayerPatch
from layerzo.patch.manifest import MANIFEST_NAME, TRAJECTORY_NAME, WEIGHTS_NAME
from layerzo.io.safetensors import read_header
from patch_helpers import copy_tokenizer, edit_manifest, make_patch, replace_weights, reseal

IDS = torch.tensor([[1, 5, 42, 7, 300, 9, 12, 4000]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def load_dir(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_apply(*args):
    return CliRunner().invoke(app, ["apply", *map(str, args)])


@pytest.fixture(scope="module")
def base_model(tiny_llama_dir):
    return load_dir(tiny_llama_dir)


@pytest.fixture()
def patch_dir(base_model, tiny_llama_dir, tmp_path):
    return make_patch(base_model, 2, base_model=str(tiny_llama_dir)).save_pretrained(tmp_path / "patch")


def test_fixture_splits_layer_2_across_two_of_three_shards(tiny_llama_dir):
    index = json.loads((tiny_llama_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    layer2 = {v for k, v in index["weight_map"].items() if k.startswith("model.layers.2.")}
    assert len(shards) >= 3 and len(layer2) == 2


def test_sharded_round_trip_is_bit_exact_and_rewrites_only_touched_shards(tiny_llama_dir, base_model, patch_dir,
                                                                          tmp_path):
    before = tree_digest(tiny_llama_dir)
    out = tmp_path / "out"
    result = run_apply(tiny_llama_dir, patch_dir, "-o", out)
    assert result.exit_code == 0, result.output
    assert tree_digest(tiny_llama_dir) == before  # the base is never written

    index = json.loads((tiny_llama_dir / "model.safetensors.index.json").read_text())
    touched = {v for k, v in index["weight_map"].items() if k.startswith("model.layers.2.")}
    untouched = set(index["weight_map"].values()) - touched
    report = json.loads((out / PROVENANCE_NAME).read_text())
    assert set(report["rewritten"]) == touched
    for shard in untouched:
        assert (out / shard).read_bytes() == (tiny_llama_dir / shard).read_bytes()
        assert shard in report["linked"] and os.stat(out / shard).st_ino == os.stat(tiny_llama_dir / shard).st_ino
    for shard in touched:
        assert read_header(out / shard).metadata == read_header(tiny_llama_dir / shard).metadata == {"format": "pt"}
        assert (out / shard).read_bytes() != (tiny_llama_dir / shard).read_bytes()
    for name in ("config.json", "model.safetensors.index.json", "tokenizer.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_llama_dir / name).read_bytes()

    patched = load_dir(out)
    in_memory, _ = layerzo.load(tiny_llama_dir, patch_dir)
    assert torch.equal(logits(patched), logits(in_memory))
    assert not torch.equal(logits(patched), logits(base_model))
    for key, value in LayerPatch.from_pretrained(patch_dir).tensors.items():
        assert torch.equal(patched.get_parameter(key), value)


def test_patch_of_a_layer_in_one_shard_rewrites_one_shard(tiny_llama_dir, base_model, tmp_path):
    patch = make_patch(base_model, 0, base_model=str(tiny_llama_dir))
    report = apply_patch(tiny_llama_dir, patch, tmp_path / "out")
    assert len(report.rewritten) == 1 and len(report.linked) == 2
    assert torch.equal(logits(load_dir(tmp_path / "out")), logits(layerzo.load(tiny_llama_dir, patch)[0]))


def test_single_file_base(tiny_llama_dir, base_model, tmp_path):
    single = tmp_path / "single"
    base_model.save_pretrained(single)
    copy_tokenizer(tiny_llama_dir, single)
    assert (single / "model.safetensors").is_file()
    patch = make_patch(base_model, 3)
    report = apply_patch(single, patch, tmp_path / "out")
    assert report.rewritten == ["model.safetensors"]
    assert torch.equal(logits(load_dir(tmp_path / "out")), logits(layerzo.load(single, patch)[0]))


def test_bfloat16_base_gets_cast_patch_and_says_so(base_model, tmp_path):
    bf16 = tmp_path / "bf16"
    model = make_tiny_model("llama", seed=1).to(torch.bfloat16)
    model.save_pretrained(bf16)
    patch = make_patch(model.float(), 1)  # fingerprints of the bf16 values (hashing is dtype-independent)
    report = apply_patch(bf16, patch, tmp_path / "out")
    assert any("float32 -> bfloat16" in note for note in report.notes)
    out = load_dir(tmp_path / "out").to(torch.bfloat16)
    key = "model.layers.1.mlp.up_proj.weight"
    assert out.get_parameter(key).dtype == torch.bfloat16
    assert torch.equal(out.get_parameter(key), patch.tensors[key].to(torch.bfloat16))


def test_old_gpt2_checkpoint_without_prefix(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file, save_file

    model = make_tiny_model("gpt2", seed=2)
    folder = tmp_path / "gpt2"
    model.save_pretrained(folder)
    copy_tokenizer(tiny_llama_dir, folder)
    state = load_file(folder / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in state.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    assert "h.1.attn.c_attn.weight" in read_header(folder / "model.safetensors").tensors
    patch = make_patch(model, 1)
    assert next(iter(patch.tensors)).startswith("transformer.h.1.")
    report = apply_patch(folder, patch, tmp_path / "out")
    assert any("is stored as h.1." in note for note in report.notes)
    assert torch.equal(logits(load_dir(tmp_path / "out")), logits(layerzo.load(folder, patch)[0]))


def test_map_keys_prefers_exact_then_prefix():
    assert map_keys(["transformer.h.0.w"], ["h.0.w"], "transformer") == {"transformer.h.0.w": "h.0.w"}
    assert map_keys(["h.0.w"], ["transformer.h.0.w"], "transformer") == {"h.0.w": "transformer.h.0.w"}
    assert map_keys(["model.x"], ["model.x", "x"], "model") == {"model.x": "model.x"}
    with pytest.raises(BaseMismatchError, match="no tensor model.y"):
        map_keys(["model.y"], ["model.x"], "model")


# ---------------------------------------------------------------------------- refusals: nothing written
def _other_model(tmp_path, base_model, tiny_llama_dir):
    make_tiny_model("llama", seed=7).save_pretrained(tmp_path / "other")
    return tmp_path / "other", "differs from the one the patch was made from"


def _other_layer_count(tmp_path, base_model, tiny_llama_dir):
    make_tiny_model("llama", num_layers=6, seed=1).save_pretrained(tmp_path / "deep")
    return tmp_path / "deep", "has 6 layers"


def _other_architecture(tmp_path, base_model, tiny_llama_dir):
    make_tiny_model("qwen2", seed=1).save_pretrained(tmp_path / "qwen")
    return tmp_path / "qwen", "Qwen2ForCausalLM"


def _tampered_tensor(tmp_path, base_model, tiny_llama_dir):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "tampered"
    shutil.copytree(tiny_llama_dir, folder)
    shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]["model.layers.2.mlp.up_proj.weight"]
    state = load_file(folder / shard)
    state["model.layers.2.mlp.up_proj.weight"][0, 0] += 1e-3
    save_file(state, folder / shard, metadata={"format": "pt"})
    return folder, "base tensor model.layers.2.mlp.up_proj.weight differs"


@pytest.mark.parametrize("make_base", [_other_model, _other_layer_count, _other_architecture, _tampered_tensor])
def test_wrong_base_is_refused_with_nothing_written(make_base, tiny_llama_dir, base_model, patch_dir, tmp_path):
    base, needle = make_base(tmp_path, base_model, tiny_llama_dir)
    before = set(tmp_path.iterdir())
    result = run_apply(base, patch_dir, "-o", tmp_path / "out")
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in " ".join(result.stderr.split()), result.stderr
    assert set(tmp_path.iterdir()) == before  # no OUT, no temp dir


def test_force_overrides_only_the_fingerprint_and_says_what(tmp_path, tiny_llama_dir, base_model, patch_dir):
    base, _ = _tampered_tensor(tmp_path, base_model, tiny_llama_dir)
    result = run_apply(base, patch_dir, "-o", tmp_path / "out", "--force")
    assert result.exit_code == 0, result.output
    assert "--force: base tensor model.layers.2.mlp.up_proj.weight" in " ".join(result.stderr.split())
    deep, _ = _other_layer_count(tmp_path, base_model, tiny_llama_dir)
    assert run_apply(deep, patch_dir, "-o", tmp_path / "out2", "--force").exit_code == 1


def _newer_version(folder):
    edit_manifest(folder, format_version=99)
    return "newer"


def _truncated(folder):
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[:-10])
    reseal(folder)
    return "truncated"


def _corrupt(folder):
    data = bytearray((folder / WEIGHTS_NAME).read_bytes())
    data[9:20] = b"\x00" * 11
    (folder / WEIGHTS_NAME).write_bytes(bytes(data))
    return "sha256"


def _lm_head(folder):
    tensors = dict(LayerPatch.from_pretrained(folder).tensors)
    tensors["lm_head.weight"] = torch.zeros(49152, 32)
    replace_weights(folder, tensors)
    return "lm_head.weight lies outside the declared layer"


def _dotdot(folder):
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["files"]["../" + TRAJECTORY_NAME] = data["files"].pop(TRAJECTORY_NAME)
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    return "unsafe file name"


def _huge_shape(folder):
    import struct

    header = {"__metadata__": read_header(folder / WEIGHTS_NAME).metadata,
              "model.layers.2.mlp.up_proj.weight": {"dtype": "F32", "shape": [10**12, 10**12], "data_offsets": [0, 8]}}
    raw = json.dumps(header).encode()
    (folder / WEIGHTS_NAME).write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    reseal(folder)
    return "declares shape"


def _nan(folder):
    tensors = dict(LayerPatch.from_pretrained(folder).tensors)
    key = "model.layers.2.self_attn.o_proj.weight"
    tensors[key] = tensors[key].clone()
    tensors[key][1, 1] = float("nan")
    replace_weights(folder, tensors)
    return "NaN"


@pytest.mark.parametrize("defect", [_newer_version, _truncated, _corrupt, _lm_head, _dotdot, _huge_shape, _nan])
def test_bad_patch_is_refused_with_nothing_written(defect, tiny_llama_dir, patch_dir, tmp_path):
    needle = defect(patch_dir)
    before = tree_digest(tiny_llama_dir), set(tmp_path.iterdir())
    result = run_apply(tiny_llama_dir, patch_dir, "-o", tmp_path / "out")
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in " ".join(result.stderr.split()), result.stderr
    assert (tree_digest(tiny_llama_dir), set(tmp_path.iterdir())) == before


def test_existing_out_is_refused_and_overwrite_replaces_only_an_earlier_apply_output(tiny_llama_dir, patch_dir,
                                                                                      tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_apply(tiny_llama_dir, patch_dir, "-o", out)
    assert result.exit_code == 1 and "already exists" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --overwrite never replaces a folder that layerzo apply did not write
    result = run_apply(tiny_llama_dir, patch_dir, "-o", out, "--overwrite")
    assert result.exit_code == 1 and "not an earlier layerzo apply output" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    out2 = tmp_path / "out2"
    assert run_apply(tiny_llama_dir, patch_dir, "-o", out2).exit_code == 0
    (out2 / "config.json").write_text("{}")  # changed since: the rerun must replace it
    result = run_apply(tiny_llama_dir, patch_dir, "-o", out2, "--overwrite")
    assert result.exit_code == 0 and "replacing the previous layerzo apply output" in result.stderr
    assert (out2 / "config.json").read_text() != "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out2", "patch"]


def test_out_equal_to_base_is_refused(tiny_llama_dir, patch_dir):
    before = tree_digest(tiny_llama_dir)
    assert run_apply(tiny_llama_dir, patch_dir, "-o", tiny_llama_dir, "--overwrite").exit_code == 1
    assert tree_digest(tiny_llama_dir) == before


def test_failure_midway_leaves_no_out_and_no_temp_dir(tiny_llama_dir, patch_dir, tmp_path, monkeypatch):
    import layerzo.patch.apply as merge

    calls = []
    real = merge.write_shard

    def failing(path, tensors, metadata):
        calls.append(path)
        if len(calls) == 2:  # the second rewritten shard: the first is already on disk in the temp dir
            raise OSError(28, "No space left on device", str(path))
        return real(path, tensors, metadata)

    monkeypatch.setattr(merge, "write_shard", failing)
    before = tree_digest(tiny_llama_dir)
    result = run_apply(tiny_llama_dir, patch_dir, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "No space left" in result.stderr
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patch"]
    assert tree_digest(tiny_llama_dir) == before


def test_offline_hub_base_is_one_line(patch_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_apply("some-org/not-cached-model", patch_dir, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert "HF_HUB_OFFLINE" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_in_memory_mismatch_is_refused(base_model, tiny_llama_dir):
    patch = make_patch(base_model, 2)
    other = make_tiny_model("llama", seed=9)
    with pytest.raises(BaseMismatchError, match="differs"):
        apply_to_model(other, patch)
    with pytest.raises(BaseMismatchError, match="layers"):
        apply_to_model(make_tiny_model("llama", num_layers=3, seed=1), patch)


# ---------------------------------------------------------------------------- lora + replay
def test_lora_patch_merges_alpha_over_r_b_at_a(base_model, tiny_llama_dir, tmp_path):
    from layerzo.core.hashing import tensor_sha256
    from layerzo.patch.manifest import PatchManifest

    gen = torch.Generator().manual_seed(0)
    tensors, fingerprint = {}, {}
    for proj in ("q_proj", "v_proj"):
        stem = f"model.layers.2.self_attn.{proj}"
        w = base_model.get_parameter(stem + ".weight")
        tensors[stem + ".lora_A.weight"] = torch.randn(4, w.shape[1], generator=gen)
        tensors[stem + ".lora_B.weight"] = torch.randn(w.shape[0], 4, generator=gen) * 0.01
        fingerprint[stem + ".weight"] = tensor_sha256(w)
    base = make_patch(base_model, 2).manifest.to_dict()
    manifest = PatchManifest(**{**base, "kind": "lora", "base_fingerprint": fingerprint,
                                "lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}})
    patch = LayerPatch(manifest, tensors)
    report = apply_patch(tiny_llama_dir, patch.save_pretrained(tmp_path / "lora"), tmp_path / "out")
    assert report.rewritten
    out = load_dir(tmp_path / "out")
    stem = "model.layers.2.self_attn.v_proj"
    expected = base_model.get_parameter(stem + ".weight") + 2.0 * (tensors[stem + ".lora_B.weight"] @ tensors[stem + ".lora_A.weight"])
    assert torch.equal(out.get_parameter(stem + ".weight"), expected)
    assert torch.equal(logits(out), logits(layerzo.load(tiny_llama_dir, tmp_path / "lora")[0]))


# ---------------------------------------------------------------------------- demo GGUF
@pytest.mark.demo
def test_demo_gguf_base_round_trip(demo_model, tmp_path):
    from layerzo.model.loading import demo_model_path

    model = demo_model.model
    patch = make_patch(model, 3, scale=0.01, base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    out = tmp_path / "smollm2-patched"
    try:
        report = apply_patch(demo_model_path(), patch, out)
        assert report.base_kind == "gguf"
        reloaded = load_dir(out)
        got = logits(reloaded)
        del reloaded
        originals = {k: model.get_parameter(k).detach().clone() for k in patch.tensors}
        try:
            apply_to_model(model, patch)  # the in-memory path layerzo.load uses
            expected = logits(model)
        finally:
            with torch.no_grad():
                for k, v in originals.items():
                    model.get_parameter(k).copy_(v)
        assert torch.equal(got, expected)
        assert (out / "tokenizer.json").is_file() or (out / "tokenizer.model").is_file()
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_patch_from_layerzo_tune_applies_and_replays(tiny_llama_dir, data_dir, tmp_path):
    """End to end through the tune engineer's train.py: tune -> patch -> apply -> same logits; replay exact."""
    from layerzo.patch.replay import replay_patch
    from layerzo.tune.loop import tune
    from layerzo.tune.config import TuneConfig

    config = TuneConfig.from_dict(dict(task="sst2", model=str(tiny_llama_dir), data_dir=str(data_dir), layers="2", steps=3,
                        batch_size=2, lr=1e-2, num_train=8, num_dev=0, num_test=4, eval_every=3, max_length=64,
                        cache_lower_layers=False))
    patch_dir = tmp_path / "tuned"
    tune(config, patch_dir, progress=False)
    patch = LayerPatch.from_pretrained(patch_dir)
    assert patch.manifest.layers == (2,) and patch.trajectory
    report = apply_patch(tiny_llama_dir, patch_dir, tmp_path / "out")
    assert len(report.rewritten) == 2  # layer 2 straddles two shards
    assert torch.equal(logits(load_dir(tmp_path / "out")), logits(layerzo.load(tiny_llama_dir, patch_dir)[0]))
    replayed = replay_patch(tiny_llama_dir, patch)
    assert replayed.bit_exact and replayed.max_abs_diff == 0.0


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.unlink()  # a fresh file: the session fixture's copy stays whole
    path.write_bytes(data[:-100])


@pytest.mark.parametrize("damage, needle", [
    (lambda d: _truncate(d / "model-00001-of-00003.safetensors"), "model-00001-of-00003.safetensors is truncated"),
    (lambda d: (d / "extra.safetensors").write_bytes(b"\x40" + b"\0" * 7 + b"{}"), "extra.safetensors is truncated"),
    (lambda d: (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        **json.loads((d / "model.safetensors.index.json").read_text())["weight_map"],
        "model.embed_tokens.extra": "model-00001-of-00003.safetensors"}})),
     "shard model-00001-of-00003.safetensors holds no tensor model.embed_tokens.extra"),
])
def test_a_damaged_shard_the_patch_does_not_touch_is_refused_by_name_before_any_write(damage, needle, tiny_llama_dir,
                                                                                       patch_dir, tmp_path):
    """Shard 1 (embeddings + layer 0) is hard-linked, never rewritten, by a layer-2 patch: it is checked anyway."""
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    damage(base)
    before = tree_digest(base), sorted(p.name for p in tmp_path.iterdir())
    result = run_apply(base, patch_dir, "-o", tmp_path / "out")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert needle in " ".join(lines[0].split()) and str(base.resolve()) in lines[0]
    assert (tree_digest(base), sorted(p.name for p in tmp_path.iterdir())) == before  # no OUT, no temp, no lock
    with pytest.raises(layerzo.errors.ModelLoadError, match=needle.split(" ")[0]):
        apply_patch(base, patch_dir, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_a_base_whose_config_transformers_cannot_read_is_refused(tiny_llama_dir, patch_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "nosuch"}))
    result = run_apply(base, patch_dir, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "model_type 'nosuch' is not an architecture transformers" in result.stderr
    assert not (tmp_path / "out").exists()
