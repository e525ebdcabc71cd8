"""The layer-patch format: round trip and every refusal of an untrusted patch."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from conftest import make_tiny_model
from layerzo.errors import OutputExistsError, PatchError, PatchFormatError
from layerzo.patch.format import LayerPatch
from layerzo.patch.manifest import CARD_NAME, FORMAT_VERSION, MANIFEST_NAME, TRAJECTORY_NAME, WEIGHTS_NAME, PatchManifest, TrajectoryStep
from layerzo.io.safetensors import read_header
from patch_helpers import edit_manifest, make_patch, replace_weights, reseal

STEPS = (TrajectoryStep(0, (11, 12), (0.5, -0.25), 1e-3), TrajectoryStep(1, (13, 14), (1.5, 0.0), 1e-3))


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama", num_layers=4, seed=3)


@pytest.fixture()
def saved(model, tmp_path):
    return make_patch(model, 2, trajectory=STEPS).save_pretrained(tmp_path / "patch")


def refuse(folder, error=PatchError, match=None) -> str:
    with pytest.raises(error, match=match) as info:
        LayerPatch.from_pretrained(folder)
    line = info.value.one_line()
    assert "\n" not in line
    return line


def test_round_trip_keeps_tensors_manifest_and_trajectory(model, saved):
    patch = make_patch(model, 2, trajectory=STEPS)
    loaded = LayerPatch.from_pretrained(saved)
    assert sorted(p.name for p in saved.iterdir()) == sorted([WEIGHTS_NAME, MANIFEST_NAME, TRAJECTORY_NAME, CARD_NAME])
    assert loaded.tensors.keys() == patch.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], patch.tensors[k]) for k in patch.tensors)
    assert loaded.trajectory == list(STEPS)
    m = loaded.manifest
    assert (m.layers, m.kind, m.dtype, m.num_layers, m.layer_path) == ((2,), "layers", "float32", 4, "model.layers")
    assert m.base_fingerprint == patch.manifest.base_fingerprint
    assert set(m.files) == {WEIGHTS_NAME, TRAJECTORY_NAME}
    # only the tuned layer's tensors are in the file, with the documented metadata
    header = read_header(saved / WEIGHTS_NAME)
    assert all(k.startswith("model.layers.2.") for k in header.tensors)
    assert header.metadata["format"] == "pt" and header.metadata["layers"] == "2"
    assert header.metadata["layerzo_format_version"] == str(FORMAT_VERSION)
    assert (saved / TRAJECTORY_NAME).stat().st_size < 4096


def test_saving_is_deterministic_and_atomic(model, tmp_path):
    a = make_patch(model, 1).save_pretrained(tmp_path / "a")
    b = make_patch(model, 1).save_pretrained(tmp_path / "b")
    for name in (WEIGHTS_NAME, MANIFEST_NAME, TRAJECTORY_NAME, CARD_NAME):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    with pytest.raises(OutputExistsError):
        make_patch(model, 1, seed=5).save_pretrained(a)
    make_patch(model, 1, seed=5).save_pretrained(a, overwrite=True)
    assert (a / WEIGHTS_NAME).read_bytes() != (b / WEIGHTS_NAME).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temp dirs left behind


def test_newer_format_version_is_refused(saved):
    edit_manifest(saved, format_version=FORMAT_VERSION + 1)
    assert "newer" in refuse(saved, PatchFormatError)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"base_model": ...}, "missing field"),
        ({"surprise": 1}, "unknown field"),
        ({"num_layers": "4"}, "num_layers"),
        ({"layers": [9]}, "out of range"),
        ({"layers": [True]}, "layers"),
        ({"kind": "full"}, "kind"),
        ({"dtype": "int8"}, "dtype"),
        ({"base_fingerprint": {"model.layers.2.mlp.up_proj.weight": "xyz"}}, "sha256"),
        ({"format_version": 0}, "not supported"),
        ({"files": {"../evil.safetensors": "0" * 64}}, "unsafe file name"),
        ({"files": {"/etc/passwd": "0" * 64}}, "unsafe file name"),
    ],
)
def test_bad_manifest_fields_are_refused(saved, changes, match):
    edit_manifest(saved, **changes)
    refuse(saved, PatchFormatError, match)


def test_manifest_must_be_json_object(saved):
    (saved / MANIFEST_NAME).write_text("[1, 2]")
    refuse(saved, PatchFormatError, "JSON object")
    (saved / MANIFEST_NAME).write_text("{not json")
    refuse(saved, PatchFormatError, "not valid JSON")


@pytest.mark.parametrize("key", ["lm_head.weight", "model.embed_tokens.weight", "model.layers.3.mlp.up_proj.weight",
                                 "model.norm.weight"])
def test_tensors_outside_the_declared_layer_are_refused(saved, key):
    tensors = dict(LayerPatch.from_pretrained(saved).tensors)
    tensors[key] = torch.zeros(4, 4)
    replace_weights(saved, tensors)
    assert "outside the declared layer" in refuse(saved)


def test_path_like_tensor_names_are_refused(saved):
    tensors = dict(LayerPatch.from_pretrained(saved).tensors)
    tensors["model.layers.2/../../lm_head.weight"] = torch.zeros(2)
    replace_weights(saved, tensors, fingerprint=False)
    refuse(saved, PatchError, "outside the declared layer")


def test_tampered_weights_fail_the_sha_check(saved):
    data = bytearray((saved / WEIGHTS_NAME).read_bytes())
    data[-3] ^= 0x40
    (saved / WEIGHTS_NAME).write_bytes(bytes(data))
    assert "sha256" in refuse(saved)


@pytest.mark.parametrize("cut", [1, 7, 100, 3000])
def test_truncated_weights_are_refused_even_with_a_matching_sha(saved, cut):
    data = (saved / WEIGHTS_NAME).read_bytes()
    (saved / WEIGHTS_NAME).write_bytes(data[: max(len(data) - cut, 0)])
    reseal(saved)  # the header check, not the sha, must catch it
    line = refuse(saved, PatchFormatError)
    assert "truncated" in line or "data_offsets" in line or "declares" in line


def test_garbage_weights_header_is_refused(saved):
    (saved / WEIGHTS_NAME).write_bytes(struct.pack("<Q", 12) + b"{not json!!}" + b"\0" * 16)
    reseal(saved)
    refuse(saved, PatchFormatError, "not valid JSON")
    (saved / WEIGHTS_NAME).write_bytes(struct.pack("<Q", 2**40) + b"{}")
    reseal(saved)
    refuse(saved, PatchFormatError, "exceeds")


def test_enormous_declared_shape_is_refused_before_loading(saved):
    header = {"__metadata__": read_header(saved / WEIGHTS_NAME).metadata,
              "model.layers.2.mlp.up_proj.weight": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 16]}}
    raw = json.dumps(header).encode()
    (saved / WEIGHTS_NAME).write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    reseal(saved)
    assert "declares shape" in refuse(saved, PatchFormatError)


def test_nan_values_are_refused(saved):
    tensors = dict(LayerPatch.from_pretrained(saved).tensors)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    replace_weights(saved, tensors)
    assert "NaN" in refuse(saved)


def test_manifest_and_safetensors_disagreeing_is_refused(saved):
    tensors = LayerPatch.from_pretrained(saved).tensors
    replace_weights(saved, dict(tensors), metadata={"format": "pt", "layerzo_format_version": "1", "layers": "3",
                                                    "base_model": "tiny/llama", "kind": "layers"})
    assert "disagrees with the manifest" in refuse(saved)


def test_dtype_disagreement_is_refused(saved):
    tensors = {k: v.to(torch.bfloat16) for k, v in LayerPatch.from_pretrained(saved).tensors.items()}
    replace_weights(saved, tensors)
    assert "manifest says float32" in refuse(saved)


def test_fingerprint_must_cover_exactly_the_patch_tensors(saved):
    data = json.loads((saved / MANIFEST_NAME).read_text())
    data["base_fingerprint"].pop(sorted(data["base_fingerprint"])[0])
    (saved / MANIFEST_NAME).write_text(json.dumps(data))
    assert "disagree" in refuse(saved)


def test_missing_files_are_refused(saved):
    (saved / TRAJECTORY_NAME).unlink()
    assert "missing" in refuse(saved)
    (saved / WEIGHTS_NAME).unlink()
    assert "missing" in refuse(saved)


@pytest.mark.parametrize("line", ['{"step": 0}', "not json", '{"step": 0, "seeds": [1], "grads": [NaN], "lr": 0.1}',
                                  '{"step": 0, "seeds": [1, 2], "grads": [1.0], "lr": 0.1}',
                                  '{"step": 0, "seeds": [-1], "grads": [1.0], "lr": 0.1}',
                                  '{"step": 0, "seeds": [1], "grads": [1.0], "lr": 0.1, "x": 1}'])
def test_bad_trajectory_lines_are_refused(saved, line):
    (saved / TRAJECTORY_NAME).write_text(line + "\n")
    reseal(saved)
    assert f"{TRAJECTORY_NAME}:1" in refuse(saved, PatchFormatError)


def test_trajectory_steps_must_increase(saved):
    (saved / TRAJECTORY_NAME).write_text(STEPS[1].to_json() + "\n" + STEPS[0].to_json() + "\n")
    reseal(saved)
    refuse(saved, PatchFormatError, "not after")


def test_constructor_validates_like_the_reader(model):
    patch = make_patch(model, 2)
    with pytest.raises(PatchError, match="outside the declared layer"):
        LayerPatch(patch.manifest, {**patch.tensors, "lm_head.weight": torch.zeros(2)})
    with pytest.raises(PatchFormatError, match="seeds"):
        TrajectoryStep(step=0, seeds=(True,), grads=(1.0,), lr=0.1)
    with pytest.raises(PatchFormatError, match="layers"):
        PatchManifest(**{**patch.manifest.to_dict(), "layers": (2, 1)})


def test_nonexistent_patch_path_is_one_line(tmp_path):
    with pytest.raises(PatchError, match="does not exist"):
        LayerPatch.from_pretrained(tmp_path / "nope")


def test_a_lora_patch_is_a_standard_peft_adapter_with_layerzos_logits(tiny_llama_dir, data_dir, tmp_path):
    """PeftModel.from_pretrained(base, PATCH) loads a LoRA-ZO patch; its logits equal layerzo.load's (fp32)."""
    import layerzo
    from peft import PeftModel

    from layerzo.model.loading import load_model
    from layerzo.tune.config import TuneConfig
    from layerzo.tune.loop import tune

    out = tmp_path / "lora"
    config = TuneConfig.from_dict({"model": str(tiny_llama_dir), "data_dir": str(data_dir), "layers": "1,2",
                                   "lora": True, "lora_rank": 4, "lora_alpha": 8.0, "steps": 4, "batch_size": 4,
                                   "num_train": 16, "num_dev": 0, "num_test": 0, "lr": 5e-2, "eps": 1e-2})
    tune(config, out, progress=False)
    files = json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4 and adapter["lora_alpha"] == 8.0
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(3))
    base = load_model(str(tiny_llama_dir)).model
    peft_model = PeftModel.from_pretrained(base, str(out))
    ours, _ = layerzo.load(str(tiny_llama_dir), str(out))
    with torch.no_grad():
        peft_logits, our_logits = peft_model(input_ids=ids).logits, ours(input_ids=ids).logits
        plain = load_model(str(tiny_llama_dir)).model(input_ids=ids).logits
    assert not torch.equal(peft_logits, plain)  # the adapters moved
    torch.testing.assert_close(peft_logits, our_logits, atol=1e-5, rtol=1e-5)
    # the two files carry the same adapters
    from safetensors.torch import load_file

    mine, theirs = load_file(out / WEIGHTS_NAME), load_file(out / "adapter_model.safetensors")
    assert {f"base_model.model.{k}" for k in mine} == set(theirs)
    assert all(torch.equal(mine[k], theirs[f"base_model.model.{k}"]) for k in mine)
    # same run, same bytes (peft's own config writer would order its sets differently per process)
    tune(config, tmp_path / "again", progress=False)
    assert (tmp_path / "again" / "adapter_config.json").read_bytes() == (out / "adapter_config.json").read_bytes()


def test_the_four_patch_files_get_the_same_permissions(saved):
    """The weights are written through a temp file (mkstemp: 0600); they get the mode of the other three."""
    modes = {p.name: p.stat().st_mode & 0o777 for p in saved.iterdir()}
    assert sorted(modes) == sorted([WEIGHTS_NAME, MANIFEST_NAME, TRAJECTORY_NAME, CARD_NAME])
    assert len(set(modes.values())) == 1, modes


def test_a_file_given_as_the_patch_says_it_is_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(PatchError, match="is a file, not a patch folder"):
        LayerPatch.from_pretrained(tmp_path / "notes.txt")
