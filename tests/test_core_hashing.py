"""Content fingerprints: equal values give equal digests, any change (value, shape) gives another."""

from __future__ import annotations

import hashlib

import torch

from layerzo.core.hashing import combine_sha256, file_sha256, tensor_sha256, tensors_sha256


def test_equal_tensors_share_a_digest_and_a_changed_value_does_not():
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
    assert tensor_sha256(a) == tensor_sha256(a.clone())
    b = a.clone()
    b[2, 3] = torch.nextafter(b[2, 3], torch.tensor(10.0))  # the smallest possible change
    assert tensor_sha256(a) != tensor_sha256(b)
    assert len(tensor_sha256(a)) == 64 and int(tensor_sha256(a), 16) >= 0


def test_the_shape_is_part_of_the_digest():
    a = torch.arange(12, dtype=torch.float32)
    assert tensor_sha256(a.reshape(3, 4)) != tensor_sha256(a.reshape(4, 3)) != tensor_sha256(a)


def test_low_precision_copies_of_the_same_values_share_the_fp32_digest():
    bf16 = (torch.randn(5, 6, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
    assert tensor_sha256(bf16) == tensor_sha256(bf16.float())
    half = torch.tensor([0.5, -2.0, 3.25], dtype=torch.float16)
    assert tensor_sha256(half) == tensor_sha256(half.float())


def test_non_contiguous_views_and_gradients_hash_by_value():
    a = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    assert tensor_sha256(a.t()) == tensor_sha256(a.t().contiguous())
    assert tensor_sha256(a.clone().requires_grad_(True)) == tensor_sha256(a)


def test_integer_and_empty_tensors_are_hashed_with_their_dtype():
    ints = torch.tensor([1, 2, 3], dtype=torch.int64)
    assert tensor_sha256(ints) == tensor_sha256(ints.clone())
    assert tensor_sha256(ints) != tensor_sha256(ints.to(torch.int32))  # integers keep their own bytes
    assert tensor_sha256(torch.zeros(0, 3)) != tensor_sha256(torch.zeros(3, 0))


def test_tensors_sha256_is_keyed_and_sorted():
    named = {"b": torch.ones(2), "a": torch.zeros(2)}
    digests = tensors_sha256(named)
    assert list(digests) == ["a", "b"]
    assert digests == {"a": tensor_sha256(torch.zeros(2)), "b": tensor_sha256(torch.ones(2))}


def test_combine_sha256_depends_on_every_part_and_their_order():
    assert combine_sha256(["x", "y"]) == combine_sha256(iter(["x", "y"]))
    assert combine_sha256(["x", "y"]) != combine_sha256(["y", "x"])
    assert combine_sha256(["xy"]) != combine_sha256(["x", "y"])  # parts are separated, not concatenated


def test_file_sha256_matches_hashlib_across_block_boundaries(tmp_path):
    data = bytes(range(256)) * 5000  # > 1 MiB: more than one read block
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
