"""Helpers shared by the patch/merge/api/hub tests: make a layer patch from a model,
and rewrite a saved patch's files while keeping its sha256 list consistent (so a
test exercises exactly one defect, not the sha check)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from layerzo import __version__
from layerzo.core.hashing import tensor_sha256
from layerzo.model.layers import find_layer_layout, layer_parameter_names
from layerzo.patch.format import LayerPatch
from layerzo.patch.manifest import FORMAT_VERSION, MANIFEST_NAME, WEIGHTS_NAME, PatchManifest, TrajectoryStep


def make_patch(model, layer: int = 2, *, scale: float = 0.05, seed: int = 0, base_model: str = "tiny/llama",
               trajectory: tuple[TrajectoryStep, ...] = ()) -> LayerPatch:
    """A "layers" patch of ``layer``: every parameter of it plus seeded noise (float32)."""
    layout = find_layer_layout(model)
    state = model.state_dict()
    names = layer_parameter_names(model, layout, layer)
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: state[n] + scale * torch.randn(state[n].shape, generator=gen) for n in names}
    manifest = PatchManifest(
        format_version=FORMAT_VERSION, layerzo_version=__version__, base_model=base_model, base_revision=None,
        architecture=type(model).__name__, num_layers=layout.num_layers, layers=(layer,), kind="layers",
        dtype="float32", base_fingerprint={n: tensor_sha256(state[n]) for n in names},
        recipe={"task": "sst2", "lr": 1e-6, "eps": 1e-3, "steps": 2}, profile={"dominant_layer": layer},
        metrics={"base": {"accuracy": 0.5}, "patched": {"accuracy": 0.625}},
    )
    return LayerPatch(manifest, tensors, list(trajectory))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_manifest(folder: Path, **changes) -> None:
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            data.pop(key)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2))


def reseal(folder: Path) -> None:
    """Recompute the manifest's file hashes after a test changed a file on purpose."""
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["files"] = {name: sha256_file(folder / name) for name in data["files"]}
    path.write_text(json.dumps(data, indent=2))


def replace_weights(folder: Path, tensors: dict, metadata: dict | None = None, fingerprint: bool = True) -> None:
    """Write new patch weights (keeping the original metadata unless given) and reseal."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(folder / WEIGHTS_NAME, framework="pt") as fh:
        meta = dict(fh.metadata())
    save_file(tensors, folder / WEIGHTS_NAME, metadata=metadata if metadata is not None else meta)
    if fingerprint:
        data = json.loads((folder / MANIFEST_NAME).read_text())
        data["base_fingerprint"] = {k: data["base_fingerprint"].get(k, "0" * 64) for k in tensors}
        (folder / MANIFEST_NAME).write_text(json.dumps(data, indent=2))
    reseal(folder)


def copy_tokenizer(src: Path, dst: Path) -> Path:
    """Give a hand-made checkpoint dir the tiny fixture's tokenizer files (layerzo.load needs one)."""
    import shutil

    for f in Path(src).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, Path(dst) / f.name)
    return Path(dst)
