"""Model loading: local checkpoints (single file and sharded), dtype, refusals and errors."""

from __future__ import annotations

import json
import shutil
import struct
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


# ----------------------------------------------------------------------------- checks before loading
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_folder_that_is_no_model_gets_a_whole_sentence(tmp_path):
    from layerzo.model.loading import check_model_folder

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(ModelLoadError) as info:
        load_model(tmp_path / "notes")
    assert str(info.value) == (f"{(tmp_path / 'notes').resolve()} is not a model: expected a checkpoint folder "
                               "(config.json with safetensors weights: model.safetensors, or "
                               "model.safetensors.index.json and its shards) or a .gguf file; found 1 entry: a.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="found an empty folder"):
        check_model_folder(tmp_path / "empty")
    (tmp_path / "ggufs").mkdir()
    (tmp_path / "ggufs" / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError) as info:
        check_model_folder(tmp_path / "ggufs")
    assert "give the .gguf file itself" in info.value.one_line()


@pytest.mark.parametrize("config, needle", [
    (b"{oops", "config.json is not valid JSON (Expecting property name enclosed in double quotes at line 1)"),
    (b"\xff\xfe{}", "config.json is not UTF-8 text"),
    (b"[1, 2]", "config.json must hold a JSON object, found a list"),
    (b'{"hidden_size": 8}', "config.json has no model_type"),
    (b'{"model_type": "nosuch"}', "model_type 'nosuch' is not an architecture transformers"),
])
def test_a_bad_config_is_named_before_transformers_reads_it(single_file_dir, tmp_path, config, needle):
    from layerzo.model.loading import read_model_config

    folder = _copy(single_file_dir, tmp_path / "m")
    (folder / "config.json").write_bytes(config)
    with pytest.raises(ModelLoadError) as info:
        load_model(folder)
    assert needle in str(info.value) and str(folder.resolve()) in str(info.value)
    with pytest.raises(ModelLoadError):
        read_model_config(folder)


def test_custom_code_accepts_an_unknown_model_type_that_names_its_code(tmp_path):
    from layerzo.model.loading import read_model_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mine", "auto_map": {"AutoConfig": "c.C"}}))
    assert read_model_config(tmp_path, custom_code=True)["model_type"] == "mine"
    with pytest.raises(ModelLoadError) as info:
        read_model_config(tmp_path)
    assert "--trust-remote-code" in info.value.one_line()


def test_config_that_is_a_folder_and_weights_that_are_damaged_are_named(tiny_llama_dir, tmp_path):
    folder = _copy(tiny_llama_dir, tmp_path / "m")
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    with pytest.raises(ModelLoadError, match="config.json is a folder, not a file"):
        load_model(folder)
    folder = _copy(tiny_llama_dir, tmp_path / "m2")
    shard = folder / "model-00003-of-00003.safetensors"
    shard.write_bytes(struct.pack("<Q", 2**62) + shard.read_bytes()[8:])
    with pytest.raises(ModelLoadError, match=f"{shard.name} is not a valid safetensors file .*header too large"):
        load_model(folder)
    folder = _copy(tiny_llama_dir, tmp_path / "m3")
    shard = folder / "model-00001-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match=f"{shard.name} is not a valid safetensors file"):
        load_model(folder)


def test_no_tokenizer_and_a_broken_tokenizer_are_one_line(single_file_dir, tmp_path):
    folder = _copy(single_file_dir, tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(ModelLoadError, match="has no tokenizer: expected tokenizer.json"):
        load_model(folder)
    folder = _copy(single_file_dir, tmp_path / "m2")
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as info:
        load_model(folder)
    assert str(info.value).startswith(f"cannot load the tokenizer of model {folder.resolve()}: ")
    assert "\n" not in str(info.value)


def test_a_bad_gguf_is_named(tmp_path):
    (tmp_path / "x.gguf").write_text("not a gguf")
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        load_model(tmp_path / "x.gguf")
    demo = demo_model_path()
    (tmp_path / "cut.gguf").write_bytes(demo.read_bytes()[:1_000_000])
    with pytest.raises(ModelLoadError) as info:
        load_model(tmp_path / "cut.gguf")
    assert "cut.gguf" in str(info.value) and "truncated" in info.value.one_line()


def test_check_device_refuses_what_this_machine_lacks():
    from layerzo.model.loading import check_device

    check_device("cpu")
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        check_device("gpu0")
    with pytest.raises(ConfigError, match="'meta' is not available"):
        check_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'cuda' is not available on this machine"):
            check_device("cuda")
    else:
        check_device("cuda")
        with pytest.raises(ConfigError, match="does not exist"):
            check_device(f"cuda:{torch.cuda.device_count()}")


def test_a_checkpoint_missing_a_tensor_is_refused_not_filled_with_random_values(tiny_llama_dir, tmp_path):
    """transformers fills missing weights with random values and loads "fine"; layerzo refuses (found by fuzzing GGUF)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from layerzo.errors import ModelLoadError

    folder = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, folder)
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    state = {}
    for shard in tiny_llama_dir.glob("model-*.safetensors"):
        state.update(load_file(shard))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lacks 1 tensor\(s\) the model needs \(e.g. model.layers.1.mlp.up_proj"):
        load_model(str(folder))
