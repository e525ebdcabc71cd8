"""The layer-patch format: file names, manifest, trajectory, reader and writer side by side.

A patch is a folder (or a Hub repo) holding:

* ``layer_patch.safetensors`` - ONLY the tuned layer(s)' tensors under their
  state-dict names (``model.layers.3.mlp.up_proj.weight``), with string metadata
  ``format=pt``, ``layerzo_format_version``, ``layers`` and ``base_model``;
* ``layerzo_patch.json`` - the :class:`PatchManifest` (base model + revision,
  architecture, layer count, layers, dtype, the base fingerprint = tensor_sha256
  of every replaced base tensor, recipe, profile summary, metrics, and the
  sha256 of every other file);
* ``trajectory.jsonl`` - one :class:`TrajectoryStep` per applied ZO step
  (seeds + projected gradients), enough to rebuild the tensors from the base;
* ``README.md`` - a model card with YAML front matter.

Patches are untrusted input: everything is validated before any tensor is
loaded, and each problem is refused with one :class:`PatchError` line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from layerzo.core.atomic import atomic_dir, check_output_free
from layerzo.core.hashing import file_sha256
from layerzo.errors import PatchError, PatchFormatError
from layerzo.io import hub
from layerzo.io.safetensors import FLOAT_DTYPES, read_header, write_shard
from layerzo.model.lora import adapter_modules, lora_config, peft_state_dict
from layerzo.patch.card import build_model_card
from layerzo.patch.manifest import (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, CARD_NAME, MANIFEST_NAME, MAX_MANIFEST_BYTES, MAX_PATCH_HEADER_BYTES, PATCH_FILES,
                                    TRAJECTORY_NAME, WEIGHTS_NAME, PatchManifest, TrajectoryStep, check_names,
                                    infer_layer_path, read_trajectory, validate_tensors, weights_metadata)


class LayerPatch:
    """A layer patch in memory (PEFT-like: ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub``).

    ``tensors`` maps state-dict keys to CPU tensors of ``manifest.dtype``.
    A *trajectory-only* patch has no tensors (``weights_included`` is False):
    its trajectory rebuilds them from the base (:func:`layerzo.patch.replay.with_weights`).
    ``source``/``source_revision`` record where it was read from (the pinned
    commit when pulled from the Hub).
    """

    def __init__(self, manifest: PatchManifest, tensors: Mapping[str, Any], trajectory: Sequence[TrajectoryStep] = ()) -> None:
        if manifest.layer_path is None:
            if not tensors:
                raise PatchFormatError(f"{MANIFEST_NAME} field layer_path must be set for a trajectory-only patch")
            manifest = dataclasses.replace(manifest, layer_path=infer_layer_path(list(tensors)))
        if tensors:
            validate_tensors(manifest, tensors)
        else:
            check_names(manifest, dict.fromkeys(replay_order(manifest)))
        self.manifest = manifest
        self.tensors = dict(tensors)
        self.trajectory = list(trajectory)
        self.source: str | None = None
        self.source_revision: str | None = None

    @property
    def weights_included(self) -> bool:
        return bool(self.tensors)

    def __repr__(self) -> str:
        m = self.manifest
        return f"LayerPatch(base={m.base_model!r}, kind={m.kind}, layers={list(m.layers)}, tensors={len(self.tensors)}, steps={len(self.trajectory)})"

    # ---- reading -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, *, revision: str | None = None,
                        token: str | None = None) -> "LayerPatch":
        """Read a patch folder, or pull a Hub repo (pinned to the resolved commit) and read it."""
        path = Path(path_or_repo_id).expanduser()
        if path.is_file() and path.name in PATCH_FILES:
            path = path.parent
        if path.is_dir():
            patch = cls._from_dir(path)
            patch.source = str(path.resolve())
            return patch
        if path.is_file():
            raise PatchError(f"patch {path_or_repo_id} is a file, not a patch folder (a folder with {MANIFEST_NAME})",
                             "give a patch folder or a Hub repo id org/name")
        if not hub.looks_like_repo_id(str(path_or_repo_id)):
            raise PatchError(f"patch {path_or_repo_id} does not exist", "give a patch folder or a Hub repo id org/name")
        local, commit = hub.download_files(str(path_or_repo_id), PATCH_FILES, revision=revision, token=token,
                                           what="patch")
        patch = cls._from_dir(local)
        patch.source, patch.source_revision = str(path_or_repo_id), commit
        return patch

    @classmethod
    def _from_dir(cls, folder: Path) -> "LayerPatch":
        manifest_path, weights_path = folder / MANIFEST_NAME, folder / WEIGHTS_NAME
        if not manifest_path.is_file():
            raise PatchError(f"{folder} is not a layer patch: {MANIFEST_NAME} is missing")
        if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            raise PatchFormatError(f"{MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            data = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            raise PatchFormatError(f"{manifest_path} is not valid JSON") from None
        manifest = PatchManifest.from_dict(data)
        if manifest.layer_path is None:
            raise PatchFormatError(f"{MANIFEST_NAME} field layer_path must be set")
        if WEIGHTS_NAME not in manifest.files and TRAJECTORY_NAME not in manifest.files:
            raise PatchFormatError(f"{MANIFEST_NAME} lists neither {WEIGHTS_NAME} nor {TRAJECTORY_NAME}")
        for name, sha in manifest.files.items():
            if not (folder / name).is_file():
                raise PatchError(f"patch file {name} listed in {MANIFEST_NAME} is missing from {folder}")
            if file_sha256(folder / name) != sha:
                raise PatchError(f"patch file {name} does not match its sha256 in {MANIFEST_NAME} (corrupt or tampered)")
        tensors = _read_weights(weights_path, manifest) if WEIGHTS_NAME in manifest.files else {}
        trajectory = read_trajectory(folder / TRAJECTORY_NAME) if TRAJECTORY_NAME in manifest.files else []
        return cls(manifest, tensors, trajectory)

    # ---- writing -------------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | os.PathLike, *, overwrite: bool = False, weights: bool = True) -> Path:
        """Write the patch files atomically (temp dir in the same parent, then rename).

        ``weights=False`` writes a trajectory-only patch: manifest, card and
        trajectory (a few KB), no weight file; loading it rebuilds the weights
        from the base. A LoRA patch with weights is also written as a PEFT adapter.
        """
        out = Path(out_dir).expanduser().absolute()
        check_output_free(out, overwrite, "pass overwrite=True (--overwrite) or choose another folder")
        if not weights and self.manifest.metrics.get("replay", {}).get("tensor_order") is None:
            raise PatchError("this patch records no replay tensor order, so it cannot be saved without its weights")
        with atomic_dir(out, overwrite=overwrite) as tmp:
            names = [TRAJECTORY_NAME]
            (tmp / TRAJECTORY_NAME).write_text("".join(s.to_json() + "\n" for s in self.trajectory), encoding="utf-8")
            if weights:
                names += write_weights(tmp, self.manifest, self.tensors)
            files = {n: file_sha256(tmp / n) for n in sorted(names, key=PATCH_FILES.index)}
            self.manifest = dataclasses.replace(self.manifest, files=files)
            (tmp / MANIFEST_NAME).write_text(json.dumps(self.manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
            (tmp / CARD_NAME).write_text(build_model_card(self.manifest, len(self.trajectory)), encoding="utf-8")
        return out

    def push_to_hub(self, repo_id: str, *, token: str | None = None, private: bool = False, revision: str | None = None,
                    endpoint: str | None = None, commit_message: str | None = None, weights: bool = True) -> str:
        """Save to a temp folder (``weights=False``: trajectory only) and upload it; returns the commit URL."""
        m = self.manifest
        message = commit_message or f"layerzo patch: layer(s) {','.join(map(str, m.layers))} of {m.base_model}"
        with tempfile.TemporaryDirectory(prefix="layerzo-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "patch", weights=weights)
            return hub.upload_folder(folder, repo_id, PATCH_FILES, message, token=token, private=private,
                                     revision=revision, endpoint=endpoint)


def write_weights(folder: Path, manifest: PatchManifest, tensors: Mapping[str, Any]) -> list[str]:
    """The weight file(s) of a patch; returns their names. A LoRA patch adds the PEFT adapter files."""
    if not tensors:
        raise PatchError("the patch holds no tensors to write", "save it with weights=False (trajectory only)")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())}
    # our writer, not safetensors' save_file: that one orders metadata by a Rust HashMap,
    # so the same patch would not give the same bytes twice
    write_shard(folder / WEIGHTS_NAME, tensors, weights_metadata(manifest))
    if manifest.kind != "lora":
        return [WEIGHTS_NAME]
    write_shard(folder / ADAPTER_WEIGHTS_NAME, peft_state_dict(tensors), {"format": "pt"})
    (folder / ADAPTER_CONFIG_NAME).write_text(adapter_config_text(manifest, tensors), encoding="utf-8")
    return [WEIGHTS_NAME, ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]


def adapter_config_text(manifest: PatchManifest, tensors: Mapping[str, Any]) -> str:
    """``adapter_config.json`` as peft writes it, with sets as sorted lists (peft's own order follows
    the set's, which changes from process to process: the same patch must give the same bytes)."""
    lora = manifest.lora or {}
    config = lora_config(adapter_modules(tensors), int(lora["r"]), float(lora["alpha"]),
                         base_model=manifest.base_model, revision=manifest.base_revision).to_dict()
    clean = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}
    return json.dumps(clean, indent=2, sort_keys=True, default=str) + "\n"


def replay_order(manifest: PatchManifest) -> list[str]:
    """The tuned tensors' names in the order the run updated them (recorded in the manifest)."""
    info = manifest.metrics.get("replay") if isinstance(manifest.metrics.get("replay"), dict) else {}
    order = info.get("tensor_order")
    if not (isinstance(order, list) and order and all(isinstance(n, str) for n in order)):
        raise PatchFormatError(f"{MANIFEST_NAME} records no replay tensor_order, so its weights cannot be rebuilt")
    return order


def _read_weights(path: Path, manifest: PatchManifest) -> dict:
    """Validate the header (size cap, exact offsets, names, dtype, metadata) before loading any tensor."""
    from safetensors.torch import load_file

    header = read_header(path, max_header_bytes=MAX_PATCH_HEADER_BYTES, error=PatchFormatError)
    expected = weights_metadata(manifest)
    for k, v in expected.items():
        if header.metadata.get(k) != v:
            raise PatchError(f"{WEIGHTS_NAME} metadata {k}={header.metadata.get(k)!r} disagrees with the manifest ({v!r})")
    want = {v: k for k, v in FLOAT_DTYPES.items()}[manifest.dtype]
    for name, info in header.tensors.items():
        if info.dtype != want:
            raise PatchError(f"{WEIGHTS_NAME} tensor {name} is {info.dtype} but the manifest says {manifest.dtype}")
    # Names are checked before loading so an lm_head/embedding overwrite never reaches memory.
    check_names(manifest, header.tensors)
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error types; keep one line
        raise PatchFormatError(f"cannot read {WEIGHTS_NAME}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
