"""GGUF out: a layer patch merged into a ``.gguf`` base and written as a ``.gguf`` that llama.cpp runs.

:func:`apply_patch_gguf` writes OUT = BASE with the patched layer's tensors
replaced and everything else byte-identical to BASE:

* the key/value metadata section is copied as raw bytes, and ``layerzo.*`` keys
  are appended (patch fingerprint, layers, sha256 of the base file, ...);
* every untouched tensor's bytes are copied as they are (``os.copy_file_range``:
  the kernel copies them, nothing passes through Python), tensor by tensor;
* the patched tensors get llama.cpp's layout - HF state-dict names become GGUF
  names (``model.layers.11.self_attn.q_proj.weight`` → ``blk.11.attn_q.weight``,
  ``gguf.get_tensor_name_map``) and attn_q / attn_k rows are permuted exactly as
  llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel.permute``) does - and are
  encoded as ``gguf_type`` (F16 by default; 1-D tensors and norms always F32,
  the converter's rule "most of the codebase that takes in 1D tensors or norms
  only handles F32").

Everything is checked before a byte is written: the architecture is one whose
layout this module has verified against llama.cpp and transformers (``llama``
only; any other is refused), the layer count, names and shapes, the patch's
base fingerprint against the dequantized base tensors (``gguf.quants.dequantize``
then the inverse permutation - what transformers' GGUF loader does, so a patch
tuned on ``load_model("x.gguf")`` matches), the target type can encode every
tensor, and the encoded values are finite. OUT is written to a temp file beside
it and renamed into place; an existing OUT is replaced only with ``overwrite``
and only if it is an earlier GGUF written here.

The header is walked with ``struct`` instead of ``gguf.GGUFReader``: that reader
builds numpy views per array element, which takes ~3 s for the demo's 49k-token
vocabulary (copying the whole 94 MiB file takes ~0.1 s); skipping the same bytes
takes ~10 ms, and copying them raw keeps the metadata byte-identical by
construction. The sha256 of the base (``layerzo.base_sha256``) and the patch
fingerprint are computed in threads beside the checks and the copy. Type sizes, names and (de)quantization come from the ``gguf`` package.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from layerzo.core.atomic import atomic_file
from layerzo.core.hashing import combine_sha256, tensor_sha256
from layerzo.core.outputs import check_output, output_lock
from layerzo.io.gguf import GGUFHeader, GGUFTensor, pad, read_gguf_header, read_tensor, tensor_nbytes
from layerzo.errors import (ArchitectureError, BaseMismatchError, ConfigError, ModelLoadError, OutputExistsError,
                            PatchError)
from layerzo.model.loading import DTYPES, resolve_source
from layerzo.patch.format import LayerPatch
from layerzo.patch.provenance import GGUFApplyReport
from layerzo.patch.manifest import all_finite
from layerzo.patch.merge import check_model_identity
from layerzo.patch.replay import with_weights
from layerzo.version import __version__

VERIFIED_ARCHITECTURES = ("llama",)  # GGUF general.architecture values whose layout is verified here
HF_ARCHITECTURE = {"llama": "LlamaForCausalLM"}  # what transformers builds from each of them
WRITABLE_TYPES = ("F16", "F32", "Q8_0")  # plus the base's own type when the gguf package can encode it
DEFAULT_TYPE = "F16"
METADATA_PREFIX = "layerzo."
MARKER_KEY = "layerzo.patch_fingerprint"  # marks a GGUF written by apply_patch_gguf
BASE_SHA_KEY = "layerzo.base_sha256"
_SHA_PLACEHOLDER = "0" * 64
_COPY_BLOCK = 8 << 20
def llama_permute(weights, n_head: int, n_head_kv: int | None = None):
    """HF → GGUF row order of attn_q / attn_k (llama.cpp ``convert_hf_to_gguf.py`` ``LlamaModel.permute``)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def llama_unpermute(weights, n_head: int, n_head_kv: int | None = None):
    """GGUF → HF row order (transformers ``LlamaTensorProcessor._reverse_permute_weights``); inverse of the above."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    dim = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, dim, 2, *weights.shape[1:]).swapaxes(2, 1).reshape(weights.shape)


def llama_heads(header: GGUFHeader) -> tuple[int, int]:
    """(attention heads, key/value heads) of a llama GGUF; per-layer head counts are refused."""
    arch = header.architecture
    n_head = header.values.get(f"{arch}.attention.head_count")
    n_kv = header.values.get(f"{arch}.attention.head_count_kv", n_head)
    if type(n_head) is not int or type(n_kv) is not int or n_head <= 0 or n_kv <= 0 or n_head % n_kv:
        raise ArchitectureError(f"{header.path.name}: {arch}.attention.head_count {n_head!r} / head_count_kv {n_kv!r} "
                                "are not one positive head count each; per-layer head counts are not supported")
    return n_head, n_kv


def gguf_names(header: GGUFHeader, keys: Sequence[str]) -> dict[str, str]:
    """HF state-dict key → GGUF tensor name (``gguf.get_tensor_name_map``), each present in the base."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next(a for a, name in MODEL_ARCH_NAMES.items() if name == header.architecture)
    name_map = get_tensor_name_map(arch, int(header.values.get(f"{header.architecture}.block_count") or 0))
    names = {}
    for key in keys:
        name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None or header.tensor(name) is None:
            raise BaseMismatchError(f"the base GGUF {header.path.name} has no tensor for {key}"
                                    + (f" (looked for {name})" if name else ""),
                                    "apply the patch to the base model named in it")
        names[key] = name
    return names


# ---------------------------------------------------------------------------- the output type
def encodable(qtype) -> bool:
    """True if the gguf package can write ``qtype`` (probed on one zero block)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, quants

    try:
        quants.quantize(np.zeros((1, GGML_QUANT_SIZES[qtype][0]), dtype=np.float32), qtype)
    except (NotImplementedError, quants.QuantError, ValueError):
        return False
    return True


def resolve_gguf_type(name: str | None, replaced: Sequence[GGUFTensor]):
    """The ``GGMLQuantizationType`` to write the patched matrices in: F16, F32, Q8_0, or the base's own type."""
    from gguf import GGMLQuantizationType

    wanted = (name or DEFAULT_TYPE).strip().upper()
    own = sorted({t.type_name for t in replaced if len(t.dims) > 1})
    extra = [o for o in own if o not in WRITABLE_TYPES and encodable(GGMLQuantizationType[o])]
    choices = [*WRITABLE_TYPES, *extra]
    if wanted in choices:
        return GGMLQuantizationType[wanted]
    if wanted not in GGMLQuantizationType.__members__:
        why = "it is not a GGML tensor type"
    elif not encodable(GGMLQuantizationType[wanted]):
        why = "the gguf package cannot encode it"
    else:
        why = f"it is neither F16/F32/Q8_0 nor the base's own type ({', '.join(own) or 'none'})"
    raise ConfigError(f"--gguf-type {name} cannot be written: {why}", f"choose one of {', '.join(choices)}")


def tensor_type_for(gguf_name: str, ndim: int, qtype):
    """The type one patched tensor is written in: F32 for 1-D tensors and norms (llama.cpp's converter rule)."""
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType.F32 if ndim <= 1 or gguf_name.endswith("_norm.weight") else qtype


def encode(values, qtype, name: str):
    """float32 numpy (numpy order) → the array whose bytes are ``qtype``'s encoding; refuses non-finite results."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, quants

    if qtype == GGMLQuantizationType.F32:
        data, check = np.ascontiguousarray(values, dtype=np.float32), None
    elif qtype == GGMLQuantizationType.F16:  # torch's cast: same round-to-nearest-even as numpy's, several x faster
        data, check = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).half().numpy(), None
    else:
        data = quants.quantize(np.ascontiguousarray(values, dtype=np.float32), qtype)
        check = quants.dequantize(data, qtype)
    sample = data if check is None else check
    if not all_finite(torch.from_numpy(np.asarray(sample))):
        raise PatchError(f"patched tensor {name} would contain NaN or infinite values as {qtype.name}")
    return data


# ---------------------------------------------------------------------------- checks + the new tensors
@dataclass
class Replacement:
    """A patched tensor, encoded and ready to write."""

    key: str
    tensor: GGUFTensor  # the base entry it replaces
    ggml_type: int
    data: Any  # numpy array whose bytes are written


def check_identity(header: GGUFHeader, patch: LayerPatch) -> None:
    """Refuse an unverified architecture, another model family or layer count, or an already-patched base."""
    arch = header.architecture
    if arch not in VERIFIED_ARCHITECTURES:
        raise ArchitectureError(f"GGUF output is verified for the {', '.join(VERIFIED_ARCHITECTURES)} architecture "
                                f"only; {header.path.name} is {arch or 'of unknown architecture'}",
                                "write a safetensors checkpoint instead: -o a folder")
    m = patch.manifest
    check_model_identity(patch, [HF_ARCHITECTURE[arch]], header.values.get(f"{arch}.block_count"))
    if m.layer_path not in (None, "model.layers"):
        raise BaseMismatchError(f"the patch's layers live under {m.layer_path}, not model.layers as in a {arch} GGUF")
    marked = sorted(k for k in header.values if k.startswith(METADATA_PREFIX))
    if marked:
        raise BaseMismatchError(f"{header.path.name} is already a layerzo-patched GGUF (it has {marked[0]})",
                                "apply patches to the original base GGUF")


def fingerprint_dtypes(patch: LayerPatch) -> list[str]:
    """The dtypes the base may have been loaded in when the patch was made: float32 (load_model's default),
    the patch's dtype and the recipe's ``dtype``; a fingerprint matching any of them is the same base."""
    m = patch.manifest
    wanted = ["float32", m.dtype, (m.recipe or {}).get("dtype")]
    return [d for i, d in enumerate(wanted) if d in DTYPES and d not in wanted[:i]]


def fingerprint_matches(hf_values, want: str, dtypes: Sequence[str]) -> bool:
    import torch

    t = torch.from_numpy(hf_values)
    return any(tensor_sha256(t if d == "float32" else t.to(getattr(torch, d))) == want for d in dtypes)


def plan_replacements(header: GGUFHeader, patch: LayerPatch, gguf_type: str | None, *,
                      force: bool = False) -> tuple[list[Replacement], Any, list[str]]:
    """Every check, then each patched tensor merged, laid out for llama.cpp and encoded.

    Returns (replacements in base-file order, the resolved type, notes). Raises before
    anything is written; peak memory is one layer (encoded) plus one tensor in float32.
    """
    import numpy as np

    check_identity(header, patch)
    m = patch.manifest
    names = gguf_names(header, sorted(m.base_fingerprint))
    qtype = resolve_gguf_type(gguf_type, [header.tensor(n) for n in names.values()])
    expected = _expected_shapes(patch)
    for key, name in names.items():
        base = header.tensor(name)
        if base.shape != expected[key]:
            raise BaseMismatchError(f"base tensor {name} ({key}) has shape {base.shape} but the patch needs "
                                    f"{expected[key]}; the patch was made for {m.base_model}")
        target = tensor_type_for(name, len(base.dims), qtype)
        if not rows_fit(base.dims, target):
            raise ConfigError(f"--gguf-type {qtype.name} cannot encode {name}: its rows of {base.dims[0]} values are "
                              f"not a multiple of the type's block", "choose F16 or F32")
    n_head, n_kv = llama_heads(header)
    dtypes, notes, out = fingerprint_dtypes(patch), [], []
    for key, name in sorted(names.items(), key=lambda kv: header.tensor(kv[1]).offset):
        base = header.tensor(name)
        heads = n_head if ".attn_q." in name else n_kv if ".attn_k." in name else None
        hf = read_tensor(header, base)
        if heads is not None:
            hf = llama_unpermute(hf, n_head, heads)
        if not fingerprint_matches(np.ascontiguousarray(hf), m.base_fingerprint[key], dtypes):
            if not force:
                raise BaseMismatchError(f"base tensor {name} ({key}) differs from the one the patch was made from "
                                        f"({m.base_model})", "use the patch's base model, or --force to apply anyway")
            notes.append(f"--force: base tensor {key} does not match the patch's fingerprint; applied anyway")
        merged = _merged_value(patch, key, hf)
        if heads is not None:
            merged = llama_permute(merged, n_head, heads)
        target = tensor_type_for(name, len(base.dims), qtype)
        data = encode(merged, target, name)
        if data.nbytes != tensor_nbytes(base.dims, target):  # pragma: no cover - a gguf package bug
            raise PatchError(f"encoding {name} as {target.name} gave {data.nbytes} bytes, not "
                             f"{tensor_nbytes(base.dims, target)}")
        out.append(Replacement(key, base, int(target), data))
    return out, qtype, notes


def rows_fit(dims: Sequence[int], qtype) -> bool:
    """True if rows of ``dims[0]`` values split into whole blocks of ``qtype``."""
    from gguf import GGML_QUANT_SIZES

    return not dims or int(dims[0]) % GGML_QUANT_SIZES[qtype][0] == 0


def _expected_shapes(patch: LayerPatch) -> dict[str, tuple[int, ...]]:
    m = patch.manifest
    if m.kind == "layers":
        return {k: tuple(t.shape) for k, t in patch.tensors.items()}
    shapes = {}
    for key in m.base_fingerprint:
        stem = key[: -len(".weight")]
        a, b = patch.tensors[stem + ".lora_A.weight"], patch.tensors[stem + ".lora_B.weight"]
        shapes[key] = (b.shape[0], a.shape[1])
    return shapes


def _merged_value(patch: LayerPatch, key: str, base_hf):
    """The new value in HF layout, float32 numpy: the patch tensor, or W + (alpha/r)·B@A for LoRA."""
    import numpy as np
    import torch

    m = patch.manifest
    if m.kind == "layers":
        return patch.tensors[key].detach().to("cpu", torch.float32).numpy()
    stem = key[: -len(".weight")]
    a = patch.tensors[stem + ".lora_A.weight"].to(torch.float32)
    b = patch.tensors[stem + ".lora_B.weight"].to(torch.float32)
    return (torch.from_numpy(np.ascontiguousarray(base_hf)) + m.lora_scale * (b @ a)).numpy()


def patch_fingerprint(patch: LayerPatch) -> str:
    """sha256 over the patch's tensors (name and tensor_sha256 of each, sorted)."""
    return combine_sha256(f"{k}={tensor_sha256(v)}" for k, v in sorted(patch.tensors.items()))


# ---------------------------------------------------------------------------- writing
def _encode_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def layerzo_metadata(patch: LayerPatch, qtype_name: str,
                     fingerprint: str | None = None) -> list[tuple[str, str | list[int]]]:
    """The keys appended to OUT's metadata (``fingerprint``: :func:`patch_fingerprint`, computed if not given);
    :func:`write_gguf` adds ``layerzo.base_sha256`` after them."""
    m = patch.manifest
    return [
        ("layerzo.version", __version__),
        ("layerzo.base_model", m.base_model),
        ("layerzo.patch_kind", m.kind),
        ("layerzo.layers", [int(i) for i in m.layers]),
        ("layerzo.tensor_type", qtype_name),
        ("layerzo.base_fingerprint", combine_sha256(f"{k}={v}" for k, v in sorted(m.base_fingerprint.items()))),
        (MARKER_KEY, fingerprint or patch_fingerprint(patch)),
    ]


def encode_metadata(entries: Sequence[tuple[str, str | list[int]]]) -> bytes:
    """GGUF key/value bytes: strings as STRING, int lists as ARRAY of INT32."""
    from gguf import GGUFValueType as V

    out = bytearray()
    for key, value in entries:
        out += _encode_string(key)
        if isinstance(value, str):
            out += struct.pack("<I", V.STRING) + _encode_string(value)
        else:
            out += struct.pack("<IIQ", V.ARRAY, V.INT32, len(value)) + struct.pack(f"<{len(value)}i", *value)
    return bytes(out)


def build_header(header: GGUFHeader, extra_kv: bytes, n_extra: int,
                 types: dict[str, int]) -> tuple[bytes, list[int], int]:
    """OUT's header (padded to the alignment), each tensor's data offset in base order, and the data size."""
    from gguf import GGUF_MAGIC

    infos, offsets, cursor = bytearray(), [], 0
    for t in header.tensors:
        ggml_type = types.get(t.name, t.ggml_type)
        infos += _encode_string(t.name) + struct.pack("<I", len(t.dims))
        infos += struct.pack(f"<{len(t.dims)}Q", *t.dims) + struct.pack("<IQ", ggml_type, cursor)
        offsets.append(cursor)
        cursor += pad(tensor_nbytes(t.dims, ggml_type), header.alignment)
    head = struct.pack("<IIQQ", GGUF_MAGIC, header.version, len(header.tensors), header.kv_count + n_extra)
    body = head + header.kv_bytes + extra_kv + bytes(infos)
    return body + bytes(pad(len(body), header.alignment) - len(body)), offsets, cursor


class _RangeCopier:
    """Copies byte ranges file → file with ``copy_file_range`` (in the kernel), or pread/pwrite where unsupported."""

    def __init__(self, src: int, dst: int) -> None:
        self.src, self.dst = src, dst
        self.kernel = hasattr(os, "copy_file_range")

    def copy(self, src_offset: int, dst_offset: int, count: int) -> None:
        while count > 0:
            n = self._step(src_offset, dst_offset, count)
            if n <= 0:
                raise ModelLoadError("the base GGUF ended early while it was being copied (was it changed?)")
            src_offset, dst_offset, count = src_offset + n, dst_offset + n, count - n

    def _step(self, src_offset: int, dst_offset: int, count: int) -> int:
        if self.kernel:
            try:
                return os.copy_file_range(self.src, self.dst, count, src_offset, dst_offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                    raise
                self.kernel = False
        block = os.pread(self.src, min(count, _COPY_BLOCK), src_offset)
        return _pwrite_all(self.dst, block, dst_offset) if block else 0


def _pwrite_all(fd: int, data, offset: int) -> int:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return done


def write_gguf(header: GGUFHeader, replacements: Sequence[Replacement], metadata: Sequence[tuple[str, Any]],
               path: Path, base_sha256: Callable[[], str]) -> None:
    """Write OUT to ``path``: BASE's metadata bytes + ``metadata`` + ``layerzo.base_sha256``, the replaced
    tensors' new bytes, every other tensor copied byte for byte.

    ``base_sha256()`` is called once the tensor data is written (the hash may still be running in a
    thread); its 64 hex digits overwrite a placeholder of the same length, the metadata's last bytes.
    """
    metadata = [*metadata, (BASE_SHA_KEY, _SHA_PLACEHOLDER)]
    extra = encode_metadata(metadata)
    by_name = {r.tensor.name: r for r in replacements}
    head, offsets, size = build_header(header, extra, len(metadata), {r.tensor.name: r.ggml_type for r in replacements})
    sha_at = 24 + len(header.kv_bytes) + len(extra) - 64  # the placeholder: the last 64 bytes of the metadata
    src = os.open(header.path, os.O_RDONLY)
    try:
        dst = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(dst, head, 0)
            copier = _RangeCopier(src, dst)
            for t, offset in zip(header.tensors, offsets):
                if t.name in by_name:
                    _pwrite_all(dst, by_name[t.name].data, len(head) + offset)
                else:
                    copier.copy(header.data_offset + t.offset, len(head) + offset, t.n_bytes)
            os.ftruncate(dst, len(head) + size)  # the last tensor's padding, as GGUFWriter writes it
            digest = base_sha256()
            if len(digest) != len(_SHA_PLACEHOLDER):  # pragma: no cover - a stopped or broken hash
                raise PatchError(f"the sha256 of {header.path.name} could not be computed")
            _pwrite_all(dst, digest.encode("ascii"), sha_at)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _hash_file(path: Path, stop: threading.Event) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            if stop.is_set():
                return ""
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- the command
def apply_patch_gguf(base: str | os.PathLike | None, patch: LayerPatch | str | os.PathLike, out: str | os.PathLike, *,
                     gguf_type: str | None = None, overwrite: bool = False, force: bool = False,
                     token: str | None = None, log: Callable[[str], None] | None = None) -> GGUFApplyReport:
    """Write the GGUF ``out`` = the GGUF ``base`` (None = the demo) with ``patch`` applied (see the module doc).

    ``gguf_type``: F16 (default), F32, Q8_0, or the base's own type of the patched
    matrices when the gguf package can encode it.
    """
    source = resolve_source(base)
    if source.kind != "gguf":
        raise ConfigError(f"a .gguf output needs a .gguf base, but {source.location} is a "
                          f"{'Hub model' if source.kind == 'hub' else 'checkpoint folder'}",
                          "give a .gguf BASE, or write a checkpoint folder (-o DIR)")
    base_path = Path(source.location)
    patch_path = patch.source if isinstance(patch, LayerPatch) else patch
    plan = check_output(out, inputs=[base_path, patch_path], overwrite=overwrite, command="layerzo apply", kind="file")
    out_path = Path(out).expanduser().absolute()
    with output_lock(out_path, "layerzo apply"):
        if plan.replaces:
            _check_replaceable(out_path)
            if log:
                log(plan.note("layerzo apply"))
        if not isinstance(patch, LayerPatch):
            patch = LayerPatch.from_pretrained(patch, token=token)
        header = read_gguf_header(base_path)
        check_identity(header, patch)  # before a trajectory-only patch is replayed on the base
        patch = with_weights(patch, base_path)
        stop = threading.Event()
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="layerzo-sha256") as pool:
            digest: Future = pool.submit(_hash_file, base_path, stop)  # overlaps the checks and the copy
            fingerprint: Future = pool.submit(patch_fingerprint, patch)  # overlaps the checks
            try:
                report = _apply(header, patch, out_path, gguf_type, force, digest.result, fingerprint.result,
                                source.name)
            except BaseException:
                stop.set()
                raise
    return report


def _apply(header: GGUFHeader, patch: LayerPatch, out: Path, gguf_type: str | None, force: bool,
           base_sha256: Callable[[], str], fingerprint: Callable[[], str], base_name: str) -> GGUFApplyReport:
    replacements, qtype, notes = plan_replacements(header, patch, gguf_type, force=force)
    metadata = layerzo_metadata(patch, qtype.name, fingerprint())
    with atomic_file(out) as tmp:
        write_gguf(header, replacements, metadata, tmp, base_sha256)
    from gguf import GGMLQuantizationType

    written = {r.tensor.name: GGMLQuantizationType(r.ggml_type).name for r in replacements}
    layers = ", ".join(map(str, patch.manifest.layers))
    notes.append(f"rewrote {len(written)} tensor(s) of layer {layers} as {qtype.name} (1-D tensors and norms as F32); "
                 f"copied {len(header.tensors) - len(written)} tensor(s) and {header.kv_count} metadata key(s) "
                 "byte for byte")
    return GGUFApplyReport(out=str(out), base=base_name, base_kind="gguf", base_revision=None, patch=patch.source,
                           patch_revision=patch.source_revision,
                           layers=list(patch.manifest.layers), gguf_type=qtype.name, base_sha256=base_sha256(),
                           patch_fingerprint=dict(metadata)[MARKER_KEY], tensors_rewritten=written,
                           tensors_copied=len(header.tensors) - len(written),
                           metadata_added=[k for k, _ in metadata] + [BASE_SHA_KEY],
                           rewritten=[out.name], notes=notes)


def _check_replaceable(out: Path) -> None:
    """``--overwrite`` replaces only a GGUF this function wrote (it carries ``layerzo.patch_fingerprint``)."""
    if out.is_dir():
        raise OutputExistsError(f"the output {out} is a folder, not a .gguf file", "give a file path for a .gguf output")
    try:
        marked = MARKER_KEY in read_gguf_header(out).values
    except ModelLoadError:
        marked = False
    if not marked:
        raise OutputExistsError(f"{out} is not an earlier layerzo apply GGUF output (it has no {MARKER_KEY}); "
                                "--overwrite only replaces what this command wrote", "choose another output file")
