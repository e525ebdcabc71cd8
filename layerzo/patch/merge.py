"""Merging a layer patch into tensors in memory: the identity checks and the tensor maths.

:func:`merge_tensors` checks a patch against base tensors (key set, shapes,
fingerprints, dtypes, finiteness) and returns the merged ones;
:func:`apply_to_model` does it for a loaded model. Both the on-disk apply
(:mod:`layerzo.patch.apply`) and replay (:mod:`layerzo.patch.replay`) build on it.
"""

from __future__ import annotations

from typing import Mapping

from layerzo.core.hashing import tensor_sha256
from layerzo.errors import BaseMismatchError, PatchError
from layerzo.model.layers import find_layer_layout
from layerzo.patch.format import LayerPatch
from layerzo.patch.manifest import PatchManifest, all_finite, lora_base_key


def check_model_identity(patch: LayerPatch, architectures: list[str], num_layers: int | None) -> None:
    """Refuse a base of another architecture or layer count than the patch was made for."""
    m = patch.manifest
    architectures = list(dict.fromkeys(architectures))  # the class name and config.architectures often agree
    if architectures and m.architecture not in architectures:
        raise BaseMismatchError(f"the patch was made for {m.architecture} ({m.base_model}) but the base is "
                                f"{' / '.join(architectures)}", "apply it to the base model named in the patch")
    if num_layers is not None and num_layers != m.num_layers:
        raise BaseMismatchError(f"the patch was made for a {m.num_layers}-layer {m.base_model} but the base has "
                                f"{num_layers} layers", "apply it to the base model named in the patch")


def fingerprint_mismatches(m: PatchManifest, base: Mapping) -> list[str]:
    """The base keys whose tensor_sha256 differs from the one the patch was made from (sorted)."""
    return [key for key in sorted(m.base_fingerprint) if tensor_sha256(base[key]) != m.base_fingerprint[key]]


def mismatch_error(m: PatchManifest, key: str, tensor) -> BaseMismatchError:
    base_dtype = str(tensor.dtype).removeprefix("torch.")
    hint = (f"the base is loaded as {base_dtype} but the patch was made from {m.dtype} values: load it "
            f"as {m.dtype}" if base_dtype != m.dtype and m.kind == "layers" else
            "use the patch's base model, or --force to apply anyway")
    return BaseMismatchError(f"base tensor {key} differs from the one the patch was made from ({m.base_model})", hint)


def merge_tensors(patch: LayerPatch, base: Mapping, *, force: bool = False) -> tuple[dict, list[str]]:
    """New values of the base tensors the patch replaces, in each base tensor's dtype.

    ``base`` maps the patch's base keys (``manifest.base_fingerprint``) to the
    base tensors. Checks, in order: key present, shape equal, fingerprint equal
    (``force`` skips only this one, noting what it overrode), result finite.
    kind "layers": the patch tensor (cast to the base dtype); kind "lora":
    ``W + (alpha/r) · B @ A`` computed in float32. Returns (tensors, notes).
    """
    import torch

    m = patch.manifest
    notes: list[str] = []
    expected_shapes = _expected_shapes(patch)
    for key in sorted(m.base_fingerprint):
        if key not in base:
            raise BaseMismatchError(f"the base has no tensor {key}; the patch was made for {m.base_model}")
        if tuple(base[key].shape) != expected_shapes[key]:
            raise BaseMismatchError(f"base tensor {key} has shape {tuple(base[key].shape)} but the patch needs "
                                    f"{expected_shapes[key]}; the patch was made for {m.base_model}")
    for key in fingerprint_mismatches(m, base):
        if not force:
            raise mismatch_error(m, key, base[key])
        notes.append(f"--force: base tensor {key} does not match the patch's fingerprint; applied anyway")
    merged: dict = {}
    casts: set[str] = set()
    for key in sorted(m.base_fingerprint):
        target = base[key]
        if not target.is_floating_point():
            raise BaseMismatchError(f"base tensor {key} is {target.dtype} (quantized?); only float bases can be patched")
        if m.kind == "layers":
            value = patch.tensors[key]
        else:
            stem = key[: -len(".weight")]
            a, b = patch.tensors[stem + ".lora_A.weight"], patch.tensors[stem + ".lora_B.weight"]
            value = target.to(torch.float32) + m.lora_scale * (b.to(torch.float32) @ a.to(torch.float32))
        if value.dtype != target.dtype:
            casts.add(f"{str(value.dtype).removeprefix('torch.')} -> {str(target.dtype).removeprefix('torch.')}")
        changed = m.kind == "lora" or value.dtype != target.dtype  # a cast down can overflow to inf
        value = value.to(dtype=target.dtype, device="cpu").contiguous()
        if changed and not all_finite(value):
            raise PatchError(f"patched tensor {key} would contain NaN or infinite values")
        merged[key] = value
    notes += [f"cast patch tensors {c} to match the base" for c in sorted(casts)]
    return merged, notes


def _expected_shapes(patch: LayerPatch) -> dict[str, tuple[int, ...]]:
    if patch.manifest.kind == "layers":
        return {k: tuple(t.shape) for k, t in patch.tensors.items()}
    shapes = {}
    for key, t in patch.tensors.items():
        if key.endswith(".lora_A.weight"):
            b = patch.tensors[key[: -len(".lora_A.weight")] + ".lora_B.weight"]
            shapes[lora_base_key(key)] = (b.shape[0], t.shape[1])
    return shapes


def apply_to_model(model, patch: LayerPatch, *, force: bool = False) -> list[str]:
    """Patch a loaded model in place (after all checks); returns notes (casts, overrides)."""
    import torch

    params = dict(model.named_parameters())
    merged, notes = check_base(model, patch, force=force)
    with torch.no_grad():
        for key, value in merged.items():
            params[key].copy_(value)
    return notes


def check_base(model, patch: LayerPatch, *, force: bool = False) -> tuple[dict, list[str]]:
    """Refuse (BaseMismatchError) a patch whose base (architecture, layer count, layer path, keys, shapes,
    fingerprints) differs from ``model``'s, without touching the model: a wrong base is reported before any
    slow work. Returns :func:`merge_tensors`' merged tensors and notes."""
    layout = find_layer_layout(model)
    config = getattr(model, "config", None)
    check_model_identity(patch, [type(model).__name__, *(getattr(config, "architectures", None) or [])],
                         layout.num_layers)
    if patch.manifest.layer_path not in (None, layout.path):
        raise BaseMismatchError(f"the patch's layers live under {patch.manifest.layer_path} but this model's under {layout.path}")
    return merge_tensors(patch, dict(model.named_parameters()), force=force)
