"""The layer-patch format's data: file names, the manifest, trajectory steps, and their checks.

The folder layout is described in :mod:`layerzo.patch.format` (the reader and
writer); this module holds what both the format and the model card need, so the
card can be built without importing the reader.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from layerzo.errors import PatchError, PatchFormatError
from layerzo.io.safetensors import FLOAT_DTYPES, check_file_name
from layerzo.model.layers import KNOWN_LAYER_PATHS

WEIGHTS_NAME = "layer_patch.safetensors"
MANIFEST_NAME = "layerzo_patch.json"
TRAJECTORY_NAME = "trajectory.jsonl"
CARD_NAME = "README.md"
FORMAT_VERSION = 1
# A LoRA patch is also a standard PEFT adapter: PeftModel.from_pretrained(base, PATCH) loads these two.
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PATCH_FILES = (WEIGHTS_NAME, MANIFEST_NAME, TRAJECTORY_NAME, CARD_NAME, ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)
KINDS = ("layers", "lora")

MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_TRAJECTORY_BYTES = 256 * 1024 * 1024
MAX_PATCH_HEADER_BYTES = 1024 * 1024  # a few dozen tensor entries need a few kB
KEY_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def _is_int(v: object) -> bool:
    return type(v) is int  # bool is an int subclass; a JSON `true` is not a layer index


def _is_number(v: object) -> bool:
    """A finite float, or an int a float holds exactly (``math.isfinite`` overflows on a 400-digit int)."""
    return (type(v) is float and math.isfinite(v)) or (type(v) is int and abs(v) <= 2**53)


@dataclass(frozen=True)
class PatchManifest:
    """What a patch is and which base it fits. ``base_fingerprint`` maps each base
    state-dict key the patch replaces (kind "layers") or modifies (kind "lora")
    to :func:`layerzo.core.hashing.tensor_sha256` of the base tensor."""

    format_version: int
    layerzo_version: str
    base_model: str
    base_revision: str | None
    architecture: str
    num_layers: int
    layers: tuple[int, ...]
    kind: str
    dtype: str
    base_fingerprint: dict[str, str]
    recipe: dict
    profile: dict | None
    metrics: dict
    layer_path: str | None = None  # "model.layers"; inferred from the keys when saving if None
    lora: dict | None = None  # kind "lora": {"r": int, "alpha": float, "target_modules": [...]}
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256, filled by save_pretrained

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> PatchFormatError:
            return PatchFormatError(f"patch manifest field {name} must be {want}, got {getattr(self, name)!r}")

        if not _is_int(self.format_version):
            raise bad("format_version", "an integer")
        if self.format_version != FORMAT_VERSION:
            newer = self.format_version > FORMAT_VERSION
            raise PatchFormatError(
                f"patch format version {self.format_version} is not supported (this layerzo reads version "
                f"{FORMAT_VERSION})" + ("; upgrade layerzo to read it" if newer else "")
            )
        for name in ("layerzo_version", "base_model", "architecture"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise bad(name, "a non-empty string")
        if self.base_revision is not None and not isinstance(self.base_revision, str):
            raise bad("base_revision", "a string or null")
        if not _is_int(self.num_layers) or self.num_layers < 1:
            raise bad("num_layers", "a positive integer")
        layers = self.layers
        if isinstance(layers, list):
            object.__setattr__(self, "layers", tuple(layers))
        if (not isinstance(self.layers, tuple) or not self.layers or not all(_is_int(i) for i in self.layers)
                or list(self.layers) != sorted(set(self.layers))):
            raise bad("layers", "a non-empty sorted list of distinct layer indices")
        if not all(0 <= i < self.num_layers for i in self.layers):
            raise PatchFormatError(f"patch manifest layers {list(self.layers)} out of range for num_layers={self.num_layers}")
        if self.kind not in KINDS:
            raise bad("kind", f"one of {', '.join(KINDS)}")
        if self.dtype not in FLOAT_DTYPES.values():
            raise bad("dtype", f"one of {', '.join(FLOAT_DTYPES.values())}")
        if not isinstance(self.base_fingerprint, dict) or not self.base_fingerprint:
            raise bad("base_fingerprint", "a non-empty object")
        for key, sha in self.base_fingerprint.items():
            if not isinstance(key, str) or not KEY_PATTERN.match(key) or not isinstance(sha, str) or not _SHA256.match(sha):
                raise PatchFormatError(f"patch manifest base_fingerprint entry {key!r}: {sha!r} is not a key -> sha256 hex")
        for name in ("recipe", "metrics"):
            if not isinstance(getattr(self, name), dict):
                raise bad(name, "an object")
        if self.profile is not None and not isinstance(self.profile, dict):
            raise bad("profile", "an object or null")
        if self.layer_path is not None and (not isinstance(self.layer_path, str) or not KEY_PATTERN.match(self.layer_path)):
            raise bad("layer_path", "a dotted module path like model.layers")
        if self.kind == "lora":
            lora = self.lora
            if not isinstance(lora, dict) or not _is_int(lora.get("r")) or lora["r"] < 1 or not _is_number(lora.get("alpha")):
                raise bad("lora", 'an object {"r": positive int, "alpha": number} for kind "lora"')
        if not isinstance(self.files, dict):
            raise bad("files", "an object")
        for name, sha in self.files.items():
            check_file_name(name, "patch manifest files")
            if name not in PATCH_FILES or not isinstance(sha, str) or not _SHA256.match(sha):
                raise PatchFormatError(f"patch manifest files entry {name!r}: {sha!r} is not a known patch file -> sha256")
        try:  # recipe/profile/metrics are written as JSON: refuse what cannot round-trip
            json.dumps([self.recipe, self.profile, self.metrics], allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise PatchFormatError(f"patch manifest recipe/profile/metrics are not plain JSON: {exc}") from None

    @property
    def lora_scale(self) -> float:
        """alpha / r for kind "lora" (W += scale * B @ A)."""
        if self.lora is None:
            raise PatchFormatError("patch kind is not lora: it has no LoRA scale")
        return float(self.lora["alpha"]) / int(self.lora["r"])

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers)
        return data

    @classmethod
    def from_dict(cls, data: object) -> "PatchManifest":
        """Build from parsed JSON, refusing missing or unknown keys (after the version check)."""
        if not isinstance(data, dict):
            raise PatchFormatError(f"{MANIFEST_NAME} must hold a JSON object")
        version = data.get("format_version")
        if _is_int(version) and version > FORMAT_VERSION:  # say "newer" before complaining about its fields
            raise PatchFormatError(
                f"patch format version {version} is newer than this layerzo supports ({FORMAT_VERSION}); upgrade layerzo"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        extra = sorted(set(data) - set(names))
        if missing:
            raise PatchFormatError(f"{MANIFEST_NAME} is missing field(s) {', '.join(missing)}")
        if extra:
            raise PatchFormatError(f"{MANIFEST_NAME} has unknown field(s) {', '.join(map(str, extra))}")
        if not isinstance(data["layers"], list):
            raise PatchFormatError(f"patch manifest field layers must be a list, got {data['layers']!r}")
        return cls(**data)


@dataclass(frozen=True)
class TrajectoryStep:
    """One applied ZO step: ``theta -= lr * (mean_i grads[i] * z(seeds[i]) + wd * theta)``."""

    step: int
    seeds: tuple[int, ...]
    grads: tuple[float, ...]
    lr: float

    def __post_init__(self) -> None:
        for name in ("seeds", "grads"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if not _is_int(self.step) or self.step < 0:
            raise PatchFormatError(f"trajectory step must be a non-negative integer, got {self.step!r}")
        if not isinstance(self.seeds, tuple) or not self.seeds or not all(_is_int(s) and 0 <= s < 2**63 for s in self.seeds):
            raise PatchFormatError(f"trajectory step {self.step}: seeds must be non-negative 63-bit ints, got {self.seeds!r}")
        if (not isinstance(self.grads, tuple) or len(self.grads) != len(self.seeds)
                or not all(_is_number(g) for g in self.grads)):
            raise PatchFormatError(f"trajectory step {self.step}: grads must be {len(self.seeds)} finite numbers, got {self.grads!r}")
        if not _is_number(self.lr):
            raise PatchFormatError(f"trajectory step {self.step}: lr must be a finite number, got {self.lr!r}")

    def to_json(self) -> str:
        return json.dumps({"step": self.step, "seeds": list(self.seeds), "grads": list(self.grads), "lr": self.lr})

    @classmethod
    def from_json(cls, line: str, where: str) -> "TrajectoryStep":
        try:
            data = json.loads(line)
        except (ValueError, RecursionError):
            raise PatchFormatError(f"{where}: not valid JSON") from None
        if not isinstance(data, dict) or set(data) != {"step", "seeds", "grads", "lr"}:
            raise PatchFormatError(f"{where}: a trajectory line needs exactly step, seeds, grads, lr")
        if not isinstance(data["seeds"], list) or not isinstance(data["grads"], list):
            raise PatchFormatError(f"{where}: seeds and grads must be lists")
        try:
            return cls(**data)
        except PatchFormatError as exc:
            raise PatchFormatError(f"{where}: {exc}") from None


def infer_layer_path(keys: Sequence[str]) -> str:
    """The decoder-layer path shared by all keys (``model.layers`` for ``model.layers.3.mlp...``)."""
    found = set()
    for key in keys:
        match = [p for p in KNOWN_LAYER_PATHS if re.match(re.escape(p) + r"\.\d+\.", key)]
        if not match:
            raise PatchError(f"patch tensor {key!r} is not inside a decoder layer", "only layer tensors may be patched")
        found.add(max(match, key=len))
    if len(found) != 1:
        raise PatchError(f"patch tensors come from several layer paths: {sorted(found)}")
    return found.pop()


def lora_base_key(key: str) -> str:
    """``...q_proj.lora_A.weight`` -> ``...q_proj.weight`` (the base weight it modifies)."""
    for suffix in LORA_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)] + ".weight"
    raise PatchError(f"LoRA patch tensor {key!r} must end with .lora_A.weight or .lora_B.weight")


def validate_tensors(manifest: PatchManifest, tensors: Mapping[str, Any]) -> None:
    """Check that tensors and manifest agree: names inside the declared layers only,
    the manifest dtype, finite values, and one fingerprint per replaced base tensor."""
    import torch

    if not tensors:
        raise PatchError("the patch holds no tensors", "a trajectory-only patch is rebuilt from its base first")
    check_names(manifest, tensors)
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise PatchError(f"patch tensor {key} is not a tensor")
        if str(t.dtype).removeprefix("torch.") != manifest.dtype:
            raise PatchError(f"patch tensor {key} is {str(t.dtype).removeprefix('torch.')} but the manifest says {manifest.dtype}")
        if t.is_floating_point() and not all_finite(t):
            raise PatchError(f"patch tensor {key} contains NaN or infinite values")
    if manifest.kind == "layers":
        replaced = set(tensors)
    else:
        replaced = {lora_base_key(k) for k in tensors}
        _check_lora_pairs(manifest, tensors)
    if replaced != set(manifest.base_fingerprint):
        diff = sorted(replaced ^ set(manifest.base_fingerprint))
        raise PatchError(f"patch tensors and manifest base_fingerprint disagree on {diff[0]} ({len(diff)} key(s) differ)")


def all_finite(tensor) -> bool:
    """True iff no element is NaN or ±inf. One float64 sum instead of ``isfinite(t).all()``
    (2-5x faster): any NaN/inf makes the sum non-finite, and a float64 sum of float32/16
    values cannot overflow, so a finite sum proves every element finite."""
    import torch

    return math.isfinite(float(tensor.sum(dtype=torch.float64)))


def _check_lora_pairs(manifest: PatchManifest, tensors: Mapping[str, Any]) -> None:
    r = int(manifest.lora["r"])  # type: ignore[index]
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            b_key = key[: -len(".lora_A.weight")] + ".lora_B.weight"
            a, b = tensors[key], tensors.get(b_key)
            if b is None:
                raise PatchError(f"LoRA patch has {key} but no {b_key}")
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
                raise PatchError(f"LoRA tensors {key} {tuple(a.shape)} / {b_key} {tuple(b.shape)} do not match r={r}")
        elif key.endswith(".lora_B.weight") and key[: -len(".lora_B.weight")] + ".lora_A.weight" not in tensors:
            raise PatchError(f"LoRA patch has {key} but no matching lora_A")


def weights_metadata(manifest: PatchManifest) -> dict[str, str]:
    return {
        "format": "pt",
        "layerzo_format_version": str(manifest.format_version),
        "layers": ",".join(map(str, manifest.layers)),
        "base_model": manifest.base_model,
        "kind": manifest.kind,
    }


def check_names(manifest: PatchManifest, names: Mapping[str, Any]) -> None:
    """Every key must be a plain state-dict name inside one of the declared layers."""
    layer_path = manifest.layer_path or infer_layer_path(list(names))
    for key in names:
        head = layer_path + "."
        index = key[len(head):].split(".", 1)[0] if isinstance(key, str) and key.startswith(head) else ""
        if not KEY_PATTERN.match(str(key)) or not index.isdigit() or int(index) not in manifest.layers:
            raise PatchError(
                f"patch tensor {key} lies outside the declared layer(s) {list(manifest.layers)} under {layer_path}",
                "a patch may only replace tensors of its own layers",
            )


def read_trajectory(path: Path) -> list[TrajectoryStep]:
    """Parse ``trajectory.jsonl`` (size-capped; steps strictly increasing)."""
    if not path.is_file():
        return []
    if path.stat().st_size > MAX_TRAJECTORY_BYTES:
        raise PatchFormatError(f"{path.name} is larger than {MAX_TRAJECTORY_BYTES} bytes")
    steps: list[TrajectoryStep] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PatchFormatError(f"{path.name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for number, line in enumerate(text.split("\n"), 1):  # only "\n" ends a JSONL line
        if line.strip():
            step = TrajectoryStep.from_json(line, f"{path.name}:{number}")
            if steps and step.step <= steps[-1].step:
                raise PatchFormatError(f"{path.name}:{number}: step {step.step} is not after step {steps[-1].step}")
            steps.append(step)
    return steps
