"""Content fingerprints of tensors and models.

A tensor's fingerprint is the sha256 of its shape and its values as
little-endian float32 (or its own bytes for integer tensors). Converting to
float32 is lossless for fp16/bf16/fp32, so a bf16 checkpoint and the same
weights loaded in fp32 share a fingerprint, while any changed value does not.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Mapping

import torch


def tensor_sha256(tensor: torch.Tensor) -> str:
    t = tensor.detach().to("cpu")
    if t.is_floating_point() and t.dtype != torch.float64:
        t = t.to(torch.float32)
    t = t.contiguous()
    h = hashlib.sha256()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if t.numel():
        h.update(t.view(torch.uint8).numpy())  # buffer protocol: hashes without an extra copy
    return h.hexdigest()


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {name: tensor_sha256(t) for name, t in sorted(tensors.items())}


def combine_sha256(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\n")
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (never the whole file at once)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
