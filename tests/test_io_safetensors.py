"""Safetensors I/O: header validation before any tensor is read, lazy sharded reading, atomic streamed writing."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerzo.errors import ModelLoadError, PatchFormatError
from layerzo.io.safetensors import (INDEX_NAME, SINGLE_WEIGHTS_NAME, CheckpointReader, ShardView, check_file_name,
                                    read_header, safetensors_dtype, write_shard)


def raw_file(path, header: dict, data_bytes: int) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_bytes)


def sharded_checkpoint(folder):
    """Two shards + index: a.* in shard 1, b.* in shard 2."""
    folder.mkdir()
    tensors = {"a.w": torch.arange(6.0).reshape(2, 3), "a.b": torch.ones(3), "b.w": torch.full((2, 2), 7.0)}
    shards = {"a.w": "s-1.safetensors", "a.b": "s-1.safetensors", "b.w": "s-2.safetensors"}
    for shard in set(shards.values()):
        save_file({k: v for k, v in tensors.items() if shards[k] == shard}, folder / shard, metadata={"format": "pt"})
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 64}, "weight_map": shards}))
    return tensors


# ----------------------------------------------------------------------------- header validation
def test_overlapping_offsets_are_refused(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    raw = json.dumps(header).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 12)
    with pytest.raises(PatchFormatError, match="overlaps"):
        read_header(tmp_path / "x.safetensors")


@pytest.mark.parametrize("name", ["../x", "/abs", "a/../b", "a//b", "c:\\x", "~/x", ""])
def test_unsafe_file_names(name):
    with pytest.raises(PatchFormatError):
        check_file_name(name, "test")
    assert check_file_name("sub/dir/file.json", "test") == "sub/dir/file.json"


def test_read_header_of_a_library_written_file(tmp_path):
    save_file({"w": torch.zeros(2, 3), "i": torch.arange(4, dtype=torch.int64)}, tmp_path / "x.safetensors",
              metadata={"format": "pt", "note": "hi"})
    header = read_header(tmp_path / "x.safetensors")
    assert header.metadata == {"format": "pt", "note": "hi"}
    assert {k: (t.dtype, t.shape, t.end - t.begin) for k, t in header.tensors.items()} == {
        "w": ("F32", (2, 3), 24), "i": ("I64", (4,), 32)}
    assert header.file_size == (tmp_path / "x.safetensors").stat().st_size


@pytest.mark.parametrize("header, data_bytes, match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 12, "padded"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "gap"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, 16, "needs 16 bytes"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, 8, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "invalid shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}, 8, "exactly dtype"),
    ({"__metadata__": {"format": 1}}, 0, "strings to strings"),
])
def test_inconsistent_headers_are_refused(tmp_path, header, data_bytes, match):
    raw_file(tmp_path / "x.safetensors", header, data_bytes)
    with pytest.raises(PatchFormatError, match=match):
        read_header(tmp_path / "x.safetensors")


def test_short_or_missing_files_raise_the_requested_error_class(tmp_path):
    (tmp_path / "short").write_bytes(b"\x01\x02")
    with pytest.raises(ModelLoadError, match="shorter than the 8-byte header length"):
        read_header(tmp_path / "short", error=ModelLoadError)
    with pytest.raises(ModelLoadError, match="cannot read"):
        read_header(tmp_path / "missing", error=ModelLoadError)


def test_the_header_size_cap_is_checked_before_reading_it(tmp_path):
    raw_file(tmp_path / "x.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 4)
    with pytest.raises(PatchFormatError, match="exceeds the 16-byte cap"):
        read_header(tmp_path / "x.safetensors", max_header_bytes=16)


# ----------------------------------------------------------------------------- writing
def test_write_shard_round_trips_and_aligns_by_element_size(tmp_path):
    tensors = {"z.half": torch.tensor([1.5, -2.0], dtype=torch.float16), "a.long": torch.arange(3),
               "m.float": torch.randn(2, 3, generator=torch.Generator().manual_seed(0)), "b.flag": torch.tensor([True])}
    write_shard(tmp_path / "x.safetensors", tensors, {"format": "pt", "kind": "test"})
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    header = read_header(tmp_path / "x.safetensors")
    assert header.metadata == {"format": "pt", "kind": "test"}
    assert header.header_size % 8 == 0
    order = sorted(header.tensors, key=lambda k: header.tensors[k].begin)
    assert order == ["a.long", "m.float", "z.half", "b.flag"]  # descending element size, then name
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_write_shard_is_deterministic(tmp_path):
    tensors = {"b": torch.ones(2, 2), "a": torch.zeros(3)}
    write_shard(tmp_path / "1.safetensors", tensors, {"z": "1", "a": "2"})
    write_shard(tmp_path / "2.safetensors", dict(reversed(list(tensors.items()))), {"a": "2", "z": "1"})
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()


class _ChangesShape(Mapping):
    """A lazy mapping whose tensor is another shape when it is read the second time (to write it)."""

    def __init__(self) -> None:
        self.reads = 0

    def __getitem__(self, key):
        self.reads += 1
        return torch.zeros(2) if self.reads == 1 else torch.zeros(3)

    def __iter__(self):
        return iter(["t"])

    def __len__(self) -> int:
        return 1


def test_a_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(ModelLoadError, match="changed dtype or shape"):
        write_shard(tmp_path / "x.safetensors", _ChangesShape(), None)
    assert list(tmp_path.iterdir()) == []


def test_unstorable_dtype_is_refused():
    assert safetensors_dtype(torch.zeros(1, dtype=torch.bfloat16)) == "BF16"
    with pytest.raises(ModelLoadError, match="complex64"):
        safetensors_dtype(torch.zeros(1, dtype=torch.complex64))


# ----------------------------------------------------------------------------- reading checkpoints
def test_checkpoint_reader_reads_tensors_across_shards_lazily(tmp_path):
    tensors = sharded_checkpoint(tmp_path / "ckpt")
    reader = CheckpointReader(tmp_path / "ckpt")
    assert reader.is_sharded and reader.shards == ["s-1.safetensors", "s-2.safetensors"]
    assert reader.index_metadata == {"total_size": 64}
    got = reader.tensors(["b.w", "a.w"])
    assert set(got) == {"a.w", "b.w"} and all(torch.equal(got[k], tensors[k]) for k in got)
    assert torch.equal(reader.tensor("a.b"), tensors["a.b"])
    assert reader.shard_metadata("s-2.safetensors") == {"format": "pt"}
    assert list(reader.load_shard("s-1.safetensors")) == ["a.b", "a.w"]


def test_checkpoint_reader_of_a_single_file(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / SINGLE_WEIGHTS_NAME)
    reader = CheckpointReader(tmp_path)
    assert not reader.is_sharded and reader.weight_map == {"w": SINGLE_WEIGHTS_NAME}


def test_checkpoint_reader_refusals(tmp_path):
    with pytest.raises(ModelLoadError, match="neither") as info:
        CheckpointReader(tmp_path)
    assert "pickled .bin checkpoints are refused" in info.value.one_line()
    sharded_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "s-2.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="s-2.safetensors named in .* is missing"):
        CheckpointReader(tmp_path / "ckpt")
    (tmp_path / "ckpt" / INDEX_NAME).write_text(json.dumps({"weight_map": {"a.w": "../escape.safetensors"}}))
    with pytest.raises(ModelLoadError, match="unsafe file name"):
        CheckpointReader(tmp_path / "ckpt")
    (tmp_path / "ckpt" / INDEX_NAME).write_text(json.dumps({"weight_map": ["not", "a", "map"]}))
    with pytest.raises(ModelLoadError, match="no valid weight_map"):
        CheckpointReader(tmp_path / "ckpt")


def test_shard_view_replaces_some_tensors_and_streams_the_rest(tmp_path):
    save_file({"keep": torch.arange(4.0), "swap": torch.zeros(2, 2)}, tmp_path / "in.safetensors",
              metadata={"format": "pt"})
    view = ShardView(tmp_path / "in.safetensors", {"swap": torch.ones(2, 2)})
    assert len(view) == 2 and view.spec("keep") == ("F32", (4,)) and view.spec("swap") == ("F32", (2, 2))
    with pytest.raises(RuntimeError, match="with block"):
        view["keep"]
    with view:
        write_shard(tmp_path / "out.safetensors", view, view.header.metadata)
    out = load_file(tmp_path / "out.safetensors")
    assert torch.equal(out["keep"], torch.arange(4.0)) and torch.equal(out["swap"], torch.ones(2, 2))
    with pytest.raises(ModelLoadError, match="holds no tensor nope"):
        ShardView(tmp_path / "in.safetensors", {"nope": torch.ones(1)})


@pytest.mark.parametrize("damage, needle", [
    (lambda d: (d / "s-2.safetensors").write_bytes((d / "s-2.safetensors").read_bytes()[:-4]), "s-2.safetensors: tensor b.w declares shape"),
    (lambda d: (d / "s-1.safetensors").write_bytes(struct.pack("<Q", 2**62) + (d / "s-1.safetensors").read_bytes()[8:]),
     "s-1.safetensors: declared safetensors header"),
    (lambda d: (d / INDEX_NAME).write_text(json.dumps({"weight_map": {"a.w": "s-1.safetensors", "a.b": "s-1.safetensors",
                                                                      "b.w": "s-2.safetensors", "c.w": "s-2.safetensors"}})),
     "shard s-2.safetensors holds no tensor c.w"),
])
def test_check_shards_reads_headers_only_and_names_the_damaged_shard(tmp_path, damage, needle):
    folder = tmp_path / "ckpt"
    sharded_checkpoint(folder)
    CheckpointReader(folder).check_shards()  # a whole checkpoint passes
    damage(folder)
    with pytest.raises(ModelLoadError) as info:
        CheckpointReader(folder).check_shards()
    assert needle in str(info.value) and str(folder) in str(info.value)


def test_check_shards_also_checks_files_the_index_does_not_name(tmp_path):
    folder = tmp_path / "ckpt"
    sharded_checkpoint(folder)
    (folder / "stray.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{}")  # header says 8 bytes, 2 follow
    reader = CheckpointReader(folder)
    reader.check_shards()
    with pytest.raises(ModelLoadError, match="stray.safetensors is truncated"):
        reader.check_shards(also=["stray.safetensors", "s-1.safetensors"])


def test_a_shard_that_is_a_folder_is_named_as_one(tmp_path):
    folder = tmp_path / "ckpt"
    sharded_checkpoint(folder)
    (folder / "s-2.safetensors").unlink()
    (folder / "s-2.safetensors").mkdir()
    with pytest.raises(ModelLoadError, match="s-2.safetensors named in .* is a folder, not a file"):
        CheckpointReader(folder)


def test_write_shard_gives_the_file_plain_permissions_not_mkstemps_0600(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        write_shard(tmp_path / "w.safetensors", {"w": torch.ones(2)}, {"format": "pt"})
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(umask)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o644


def test_the_library_refuses_every_malformed_file_our_parser_refuses(tmp_path):
    """Why the own header parser stays (see the module docstring): the library agrees on what is malformed,
    but says less; this pins the agreement, so a safetensors release that accepts one of these shows up."""
    import json as _json
    import struct

    import torch
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    from layerzo.errors import PatchFormatError
    from layerzo.io.safetensors import read_header

    save_file({"a": torch.zeros(4, 4), "b": torch.ones(4)}, tmp_path / "ok.safetensors")
    raw = (tmp_path / "ok.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, data = _json.loads(raw[8 : 8 + n]), raw[8 + n :]

    def variant(name, edit=None, tail=b"", cut=0, length=None):
        h = _json.loads(_json.dumps(header))
        if edit:
            edit(h)
        text = _json.dumps(h).encode()
        text += b" " * ((8 - len(text) % 8) % 8)
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(struct.pack("<Q", length or len(text)) + text + (data[: len(data) - cut] if cut else data) + tail)
        return path

    bad = [variant("truncated", cut=8),
           variant("huge", lambda h: h["a"].update(shape=[2**31, 2**31])),
           variant("overlap", lambda h: h["b"].update(data_offsets=[0, 16])),
           variant("gap", lambda h: h["b"].update(data_offsets=[68, 84]), tail=b"\0" * 4),
           variant("header62", length=2**62)]
    for path in bad:
        with pytest.raises(PatchFormatError):
            read_header(path)
        with pytest.raises(SafetensorError):
            with safe_open(path, "pt") as f:
                [f.get_tensor(k) for k in f.keys()]
    assert set(read_header(tmp_path / "ok.safetensors").tensors) == {"a", "b"}
