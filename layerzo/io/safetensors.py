"""Lazy, shard-aware safetensors I/O: header validation, checkpoint reading, atomic shard writing.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of JSON header +
the raw tensor bytes. :func:`read_header` parses and validates the header
itself, with a size cap, BEFORE any tensor is touched, so an untrusted file
with enormous declared shapes, overlapping or truncated data is refused
without allocating anything. Tensor data is then read by the safetensors
library (``load_file`` / ``safe_open``).

Why a header parser of our own next to ``safe_open``: measured 2026-12-01 with
safetensors 0.7 (tests/test_io_safetensors.py checks it), ``safe_open`` refuses
the same malformed files (truncated data, a shape whose size overflows,
overlapping or gapped offsets, a header declaring 2^62 bytes) but with one
generic message ("invalid offset for tensor `b`") and a fixed 100 MB header
cap; layerzo needs per-file caps (1 MB for a patch, 16 MB for a checkpoint
state), the byte ranges (to stream untouched tensors when a shard is rewritten)
and messages that name the file, the tensor and the offsets. :class:`CheckpointReader` follows mergekit's
lazy loader: it reads ``model.safetensors.index.json``'s ``weight_map`` and
opens one shard at a time, so peak memory stays near one shard.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from layerzo.core.atomic import plain_file_mode
from layerzo.errors import LayerzoError, ModelLoadError, PatchFormatError

SINGLE_WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit

# bits per element of every safetensors dtype (sub-byte types pack several per byte)
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6,
    "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}
FLOAT_DTYPES: dict[str, str] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: dtype (safetensors name), shape and byte range within the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    header_size: int
    file_size: int


def check_file_name(name: object, what: str, error: type[LayerzoError] = PatchFormatError) -> str:
    """Refuse a file name from an untrusted source that could escape its folder.

    Allowed: a relative POSIX path without ``..``/``.``/empty components or backslashes.
    """
    if not isinstance(name, str) or not name:
        raise error(f"{what}: file name must be a non-empty string, got {name!r}")
    parts = name.split("/")
    if name.startswith(("/", "~")) or "\\" in name or ":" in name or "\x00" in name or any(
        p in ("", ".", "..") for p in parts
    ):
        raise error(f"{what}: unsafe file name {name!r} (absolute, '..' or empty path components are refused)")
    return name


def read_header(
    path: str | os.PathLike,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    error: type[LayerzoError] = PatchFormatError,
) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file without reading tensor data.

    Invariants checked: header length within ``max_header_bytes`` and the file;
    valid UTF-8 JSON object; string→string ``__metadata__``; every entry has a known
    dtype, a shape of non-negative ints and ``end - begin == prod(shape) * bits / 8``;
    the byte ranges are disjoint and cover the data section exactly (so a
    truncated or padded file is caught).
    """
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise error(f"{path.name} is not a safetensors file: {file_size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > max_header_bytes:
                raise error(f"{path.name}: declared safetensors header of {n} bytes exceeds the {max_header_bytes}-byte cap")
            if 8 + n > file_size:
                raise error(f"{path.name} is truncated: header declares {n} bytes but the file has {file_size}")
            raw = fh.read(n)
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise error(f"{path.name}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise error(f"{path.name}: safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise error(f"{path.name}: safetensors __metadata__ must map strings to strings")
    data_size = file_size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path.name, name, entry, data_size, error)
    position = 0
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != position:
            kind = "overlaps another tensor" if info.begin < position else "leaves a gap before it"
            raise error(f"{path.name}: tensor {name} {kind} (offset {info.begin}, expected {position})")
        position = info.end
    if position != data_size:
        state = "truncated" if position > data_size else "padded with unexplained bytes"
        raise error(f"{path.name} is {state}: tensors need {position} data bytes, the file has {data_size}")
    return SafetensorsHeader(tensors=tensors, metadata=dict(metadata), header_size=n, file_size=file_size)


def _tensor_info(file: str, name: str, entry: object, data_size: int, error: type[LayerzoError]) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise error(f"{file}: header entry {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:  # a list/dict dtype is unhashable: check the type first
        raise error(f"{file}: tensor {name} has unknown dtype {str(dtype)[:40]!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise error(f"{file}: tensor {name} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise error(f"{file}: tensor {name} has invalid data_offsets {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d  # Python ints: no overflow, so a shape of 2**62 x 2**62 is caught below
    nbytes = (numel * DTYPE_BITS[dtype] + 7) // 8
    if nbytes > data_size:
        raise error(f"{file}: tensor {name} declares shape {shape} ({nbytes} bytes) but the file holds {data_size} data bytes")
    if offsets[1] - offsets[0] != nbytes:
        raise error(f"{file}: tensor {name} of shape {shape} needs {nbytes} bytes but data_offsets span {offsets[1] - offsets[0]}")
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])


class CheckpointReader:
    """Lazy view of a local safetensors checkpoint (single file or sharded with an index).

    Nothing is loaded on construction except the index (or one header);
    tensors are read per shard on demand.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        single = self.directory / SINGLE_WEIGHTS_NAME
        if index.is_file():
            self.index_metadata, self.weight_map = _read_index(index)
        elif single.is_file():
            header = read_header(single, error=ModelLoadError)
            self.index_metadata = None
            self.weight_map = {k: SINGLE_WEIGHTS_NAME for k in header.tensors}
        else:
            raise ModelLoadError(
                f"{self.directory} has neither {SINGLE_WEIGHTS_NAME} nor {INDEX_NAME}",
                "give a safetensors checkpoint directory (pickled .bin checkpoints are refused)",
            )
        for shard in set(self.weight_map.values()):
            path = self.directory / shard
            if not path.is_file():
                state = "is a folder, not a file" if path.is_dir() else "is missing"
                raise ModelLoadError(f"{self.directory}: shard {shard} named in {INDEX_NAME} {state}")

    def check_shards(self, also: Sequence[str] = ()) -> None:
        """Every shard whole, by its header alone (no tensor is read): the header parses, the data
        length matches the file size, and every key the index maps to the shard is in it.

        ``also``: other safetensors files of the folder (not in the index) to check the same way.
        """
        for shard in [*self.shards, *(a for a in also if a not in self.weight_map.values())]:
            try:
                header = self.header(shard)
            except ModelLoadError as exc:
                raise ModelLoadError(f"{self.directory}: {exc}",
                                     "the checkpoint is damaged: download or copy it again") from None
            missing = sorted(k for k, s in self.weight_map.items() if s == shard and k not in header.tensors)
            if missing:
                raise ModelLoadError(f"{self.directory}: shard {shard} holds no tensor {missing[0]}, which "
                                     f"{INDEX_NAME if self.is_sharded else 'the checkpoint'} maps to it",
                                     "the checkpoint's shards and index do not match: download or copy it again")

    @property
    def is_sharded(self) -> bool:
        return self.index_metadata is not None

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def shard_path(self, shard: str) -> Path:
        return self.directory / shard

    def header(self, shard: str) -> SafetensorsHeader:
        return read_header(self.shard_path(shard), error=ModelLoadError)

    def shard_metadata(self, shard: str) -> dict[str, str]:
        return self.header(shard).metadata

    def tensor(self, key: str):
        """One tensor, read lazily from the shard that holds it (torch.Tensor, on CPU)."""
        from safetensors import safe_open

        with safe_open(self.shard_path(self.weight_map[key]), framework="pt") as fh:
            return fh.get_tensor(key)

    def tensors(self, keys: list[str]) -> dict:
        """Several tensors, opening each needed shard once."""
        from safetensors import safe_open

        by_shard: dict[str, list[str]] = {}
        for key in keys:
            by_shard.setdefault(self.weight_map[key], []).append(key)
        out = {}
        for shard, names in sorted(by_shard.items()):
            with safe_open(self.shard_path(shard), framework="pt") as fh:
                for name in names:
                    out[name] = fh.get_tensor(name)
        return out

    def load_shard(self, shard: str) -> dict:
        """All tensors of one shard, in the shard's own order."""
        from safetensors.torch import load_file

        return load_file(self.shard_path(shard))


def _read_index(path: Path) -> tuple[dict, dict[str, str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ModelLoadError(f"{path} is not valid UTF-8 JSON") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ModelLoadError(f"{path} has no valid weight_map (key -> shard file)")
    for shard in set(weight_map.values()):
        check_file_name(shard, str(path), ModelLoadError)
    metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    return metadata, dict(weight_map)


TORCH_TO_SAFETENSORS = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2", "uint16": "U16", "uint32": "U32", "uint64": "U64",
}


def safetensors_dtype(tensor) -> str:
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in TORCH_TO_SAFETENSORS:
        raise ModelLoadError(f"dtype {name} cannot be stored in safetensors")
    return TORCH_TO_SAFETENSORS[name]


def write_shard(path: str | os.PathLike, tensors: Mapping, metadata: Mapping[str, str] | None) -> None:
    """Write a safetensors file atomically (temp file in the same folder + os.replace).

    ``tensors`` may be a lazy mapping (see :class:`ShardView`): values are
    fetched one at a time in write order and streamed to disk, so peak memory
    is about one tensor rather than one shard (safetensors' own ``save_file``
    makes a bytes copy of every tensor first). Layout follows the library:
    header padded to 8 bytes, tensors ordered by descending element size then
    name, so every tensor is aligned to its element size.
    """
    import torch

    path = Path(path)
    specs = {name: _spec(tensors, name) for name in tensors}
    order = sorted(specs, key=lambda n: (-DTYPE_BITS[specs[n][0]], n))
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape = specs[name]
        numel = 1
        for d in shape:
            numel *= d
        nbytes = (numel * DTYPE_BITS[dtype] + 7) // 8
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            for name in order:
                tensor = tensors[name]
                if (safetensors_dtype(tensor), tuple(tensor.shape)) != specs[name]:
                    raise ModelLoadError(f"tensor {name} changed dtype or shape while being written")
                data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                fh.write(memoryview(data.numpy()))
                del tensor, data
        os.chmod(tmp, plain_file_mode())  # like every other output file, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _spec(tensors: Mapping, name: str) -> tuple[str, tuple[int, ...]]:
    if isinstance(tensors, ShardView):
        return tensors.spec(name)
    t = tensors[name]
    return safetensors_dtype(t), tuple(t.shape)


class ShardView(Mapping):
    """One shard of a checkpoint with some tensors replaced, read lazily tensor by tensor.

    ``spec(name)`` answers dtype and shape from the header without reading data.
    Use as a context manager (keeps the shard open while writing).
    """

    def __init__(self, path: str | os.PathLike, replacements: Mapping) -> None:
        self.path = Path(path)
        self.header = read_header(self.path, error=ModelLoadError)
        unknown = set(replacements) - set(self.header.tensors)
        if unknown:
            raise ModelLoadError(f"{self.path.name} holds no tensor {sorted(unknown)[0]}")
        self.replacements = dict(replacements)
        self._handle = None

    def __enter__(self) -> "ShardView":
        from safetensors import safe_open

        self._handle = safe_open(self.path, framework="pt")
        self._handle.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.__exit__(*exc)
            self._handle = None

    def spec(self, name: str) -> tuple[str, tuple[int, ...]]:
        if name in self.replacements:
            t = self.replacements[name]
            return safetensors_dtype(t), tuple(t.shape)
        info = self.header.tensors[name]
        return info.dtype, info.shape

    def __getitem__(self, name: str):
        if name in self.replacements:
            return self.replacements[name]
        if self._handle is None:
            raise RuntimeError("ShardView must be used inside a with block")
        return self._handle.get_tensor(name)

    def __iter__(self):
        return iter(self.header.tensors)

    def __len__(self) -> int:
        return len(self.header.tensors)
