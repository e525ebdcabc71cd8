"""Model loading: local checkpoints (single file and sharded), dtype, refusals and errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model
from layerzo.errors import ConfigError, ModelLoadError, OfflineError
from layerzo.core.env import is_offline
from layerzo.model.loading import (
    DEMO_GGUF_FILE,
    DEMO_MODEL_ID,
    ModelSource,
    demo_model_path,
    load_model,
    resolve_source,
    torch_dtype,
)


@pytest.fixture(scope="module")
def single_file_dir(tmp_path_factory, tokenizer_dir) -> Path:
    model = make_tiny_model("llama", num_layers=2, seed=4)
    out = tmp_path_factory.mktemp("single")
    model.save_pretrained(out)  # one model.safetensors
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_load_single_file_checkpoint(single_file_dir):
    assert sorted(p.name for p in single_file_dir.glob("*.safetensors")) == ["model.safetensors"]
    loaded = load_model(single_file_dir)
    assert loaded.source == ModelSource("dir", str(single_file_dir.resolve()))
    assert loaded.num_layers == 2 and loaded.layout.path == "model.layers"
    assert _same_weights(loaded.model, make_tiny_model("llama", num_layers=2, seed=4))
    assert loaded.tokenizer.pad_token is not None
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_load_sharded_checkpoint(tiny_llama_dir):
    assert len(list(tiny_llama_dir.glob("*.safetensors"))) >= 3
    loaded = load_model(tiny_llama_dir)
    assert loaded.num_layers == 4
    assert _same_weights(loaded.model, make_tiny_model("llama", num_layers=4, seed=1))


def test_load_bfloat16(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir, dtype="bfloat16")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_unknown_dtype_is_config_error():
    with pytest.raises(ConfigError, match="float8"):
        torch_dtype("float8")


def test_missing_path_is_one_line_model_load_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as info:
        load_model(missing)
    assert str(missing) in str(info.value) and "\n" not in info.value.one_line()


def test_hub_id_while_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert is_offline()
    with pytest.raises(OfflineError) as info:
        load_model("layerzo-tests/definitely-not-cached-model")
    assert "definitely-not-cached-model" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)


def test_bin_only_checkpoint_is_refused(tmp_path, single_file_dir):
    ckpt = tmp_path / "bin-only"
    ckpt.mkdir()
    for f in single_file_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, ckpt / f.name)
    # not even a valid pickle: the loader must refuse by name, never try to unpickle it
    (ckpt / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ModelLoadError) as info:
        load_model(ckpt)
    assert "\n" not in info.value.one_line() and "safetensors" in str(info.value)


def test_resolve_source_cases(tmp_path, monkeypatch):
    demo = resolve_source(None)
    assert demo.kind == "gguf" and Path(demo.location).name == DEMO_GGUF_FILE and demo.name == DEMO_MODEL_ID
    assert resolve_source("demo") == demo
    assert resolve_source(tmp_path) == ModelSource("dir", str(tmp_path.resolve()))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert resolve_source(gguf) == ModelSource("gguf", str(gguf.resolve()))
    assert resolve_source(gguf).name == str(gguf.resolve())
    other = tmp_path / "weights.pt"
    other.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        resolve_source(other)
    monkeypatch.chdir(tmp_path)  # so "org/name" is not a local folder
    hub = resolve_source("org/name", revision="v1")
    assert hub == ModelSource("hub", "org/name", "v1") and hub.name == "org/name"
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source("./missing/model")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source("a/b/c")


def test_demo_model_path_is_the_installed_gguf():
    path = demo_model_path()
    assert path.name == DEMO_GGUF_FILE and path.is_file() and path.stat().st_size > 10_000_000
