"""Fuzzing the parsers of untrusted files: patch manifests, safetensors headers, training checkpoints.

Each target gets random and mutated inputs (bit flips, truncations, splices, random
JSON, huge numbers, deep nesting) and may only ever refuse them with its own error
class (PatchError / CheckpointError): no other exception, no hang (a per-example
deadline), no huge allocation (the process's peak RSS may not jump). Every test
counts the cases it ran and prints the count (``pytest -s``); it is also attached
to the test report as the ``fuzz_cases`` property.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_tiny_model
from layerzo.tune.checkpoint import STATE_JSON, Checkpoint, load_checkpoint, save_checkpoint
from layerzo.errors import CheckpointError
from layerzo.errors import PatchError
from layerzo.patch.format import LayerPatch
from layerzo.patch.manifest import MANIFEST_NAME, WEIGHTS_NAME, PatchManifest, TrajectoryStep
from layerzo.io.safetensors import read_header
from patch_helpers import make_patch, reseal, sha256_file

MAX_EXAMPLES = int(os.environ.get("LAYERZO_FUZZ_EXAMPLES", "300"))  # raise it for a long local fuzz run
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=5000, database=None, derandomize=False,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAX_RSS_GROWTH_MB = 512  # the largest honest input here is a few kB; a "huge shape" must never be allocated

HUGE = st.sampled_from([2**31, 2**32 + 1, 2**53 + 1, 2**63, 2**64 + 7, 10**30, -1, -(2**63), 10**300])
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), HUGE, st.floats(allow_nan=True, allow_infinity=True),
                      st.text(max_size=40))
JSON = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                     st.dictionaries(st.text(max_size=12), inner, max_size=6)),
                    max_leaves=30)
DEEP = st.integers(min_value=500, max_value=200_000).flatmap(
    lambda n: st.sampled_from(["[" * n + "]" * n, '{"a":' * n + "1" + "}" * n, "[" * n]))


@st.composite
def byte_mutations(draw, data: bytes) -> bytes:
    """1-4 edits of ``data``: bit flips, truncation, insertion, deletion, splice of random bytes."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "splice", "length"]))
        pos = draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del buf[pos:pos + draw(st.integers(1, 64))]
        elif op == "splice":
            chunk = draw(st.binary(min_size=1, max_size=16))
            buf[pos:pos + len(chunk)] = chunk
        elif op == "length" and len(buf) >= 8:  # a safetensors header-length prefix of any size
            buf[:8] = struct.pack("<Q", draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, len(buf)))))
    return bytes(buf)


def paths_of(value, prefix=()):
    """Every (path, value) inside a parsed JSON document."""
    yield prefix, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        yield from paths_of(v, prefix + (k,))


@st.composite
def json_mutations(draw, doc) -> str:
    """``doc`` with 1-3 of: a value replaced by random JSON / a huge number, a key deleted or added."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        path, _ = draw(st.sampled_from(list(paths_of(doc))))
        if not path:
            doc = draw(JSON)
            continue
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "replace", "huge", "delete", "add"]))
        if op == "replace":
            parent[path[-1]] = draw(JSON)
        elif op == "huge":
            parent[path[-1]] = draw(HUGE)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = draw(JSON)
        else:
            parent.append(draw(JSON))
    return json.dumps(doc)  # NaN / Infinity are written as such: json.loads accepts them, so must we


class Counter:
    def __init__(self) -> None:
        self.ran = 0
        self.refused = 0

    def report(self, name: str, record_property) -> None:
        print(f"\nfuzz {name}: {self.ran} cases, {self.refused} refused")
        record_property("fuzz_cases", self.ran)
        assert self.ran >= MAX_EXAMPLES // 2, f"hypothesis ran only {self.ran} cases"  # not silently skipped


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def patch_template(tmp_path_factory) -> Path:
    model = make_tiny_model("llama", num_layers=4, seed=7)
    steps = [TrajectoryStep(0, (5, 6), (0.25, -0.5), 1e-3)]
    return make_patch(model, 1, trajectory=steps).save_pretrained(tmp_path_factory.mktemp("fuzz") / "patch")


@pytest.fixture(scope="module")
def checkpoint_template(tmp_path_factory) -> Path:
    gen = torch.Generator().manual_seed(0)
    names = ["model.layers.1.mlp.up_proj.weight", "model.layers.1.input_layernorm.weight"]
    shapes = [(6, 4), (4,)]
    params = {n: torch.randn(s, generator=gen) for n, s in zip(names, shapes)}
    rng = random.Random(3)
    rng.getrandbits(63)
    ckpt = Checkpoint(
        identity={"recipe": {"lr": 1e-3, "seed": 0}, "layers": [1], "names": names,
                  "base_fingerprint": {n: "ab" * 32 for n in names}},
        step=3, params=params, best_weights={n: t * 2 for n, t in params.items()}, momentum={0: torch.ones(6, 4)},
        best={"dev_acc": 0.5, "step": 2, "trajectory_len": 1}, bad_in_row=1, seed_rng=rng.getstate(), batches=(1, 8),
        trajectory=[TrajectoryStep(1, (9,), (0.5,), 1e-3)],
        rows=[{"step": i + 1, "loss_plus": 0.7, "applied": True} for i in range(3)],
        zero_shot=(0.5, 0.25), last_dev=0.5, rejected=1, seconds={"step_seconds": 0.5})
    return save_checkpoint(tmp_path_factory.mktemp("fuzz") / "out.ckpt", ckpt)


def fresh_copy(template: Path) -> Path:
    work = Path(tempfile.mkdtemp(prefix="layerzo-fuzz-"))
    return Path(shutil.copytree(template, work / template.name))


def fuzz_folder(strategy, template: Path | None, write, load, error, name: str, record_property) -> Counter:
    """For each drawn input: ``write(folder, data)``, then ``load(folder)``, where only ``error`` may escape.

    ``folder`` is a private copy of ``template`` (an empty folder when None),
    removed afterwards; the peak RSS may not jump. Returns the counts.
    """
    count, before = Counter(), peak_rss_mb()
    if template is None:
        folder = Path(tempfile.mkdtemp(prefix="layerzo-fuzz-")) / "work"
        folder.mkdir()
    else:
        folder = fresh_copy(template)

    @FUZZ
    @given(strategy)
    def run(data):
        count.ran += 1
        write(folder, data)
        try:
            load(folder)
        except error:
            count.refused += 1

    try:
        run()
    finally:
        shutil.rmtree(folder.parent)
    count.report(name, record_property)
    assert peak_rss_mb() - before < MAX_RSS_GROWTH_MB
    return count


def test_checkpoint_round_trip_is_exact(checkpoint_template):
    """The template the checkpoint fuzzers mutate is itself read back exactly (the baseline is valid)."""
    ckpt = load_checkpoint(checkpoint_template)
    assert ckpt.step == 3 and ckpt.batches == (1, 8) and ckpt.bad_in_row == 1 and ckpt.rejected == 1
    assert ckpt.trajectory == [TrajectoryStep(1, (9,), (0.5,), 1e-3)] and ckpt.zero_shot == (0.5, 0.25)
    assert torch.equal(ckpt.momentum[0], torch.ones(6, 4)) and set(ckpt.params) == set(ckpt.best_weights)
    assert all(torch.equal(ckpt.best_weights[n], 2 * ckpt.params[n]) for n in ckpt.params)
    rng = random.Random()
    rng.setstate(ckpt.seed_rng)
    expected = random.Random(3)
    expected.getrandbits(63)
    assert rng.getrandbits(63) == expected.getrandbits(63)


# ----------------------------------------------------------------------------- manifests
def test_fuzz_manifest_dict(patch_template, record_property):
    """PatchManifest.from_dict on random JSON and on mutated valid manifests."""
    valid = json.loads((patch_template / MANIFEST_NAME).read_text())
    count, before = Counter(), peak_rss_mb()

    @FUZZ
    @given(st.one_of(JSON, json_mutations(valid).map(json.loads)))
    def run(doc):
        count.ran += 1
        try:
            PatchManifest.from_dict(doc)
        except PatchError:
            count.refused += 1

    run()
    count.report("manifest dict", record_property)
    assert peak_rss_mb() - before < MAX_RSS_GROWTH_MB


def test_fuzz_manifest_file(patch_template, record_property):
    """LayerPatch.from_pretrained with the manifest file's bytes mutated, replaced or deeply nested."""
    valid_bytes = (patch_template / MANIFEST_NAME).read_bytes()
    valid = json.loads(valid_bytes)
    fuzz_folder(st.one_of(byte_mutations(valid_bytes), json_mutations(valid).map(str.encode), DEEP.map(str.encode),
                          JSON.map(lambda d: json.dumps(d).encode())),
                patch_template, lambda folder, data: (folder / MANIFEST_NAME).write_bytes(data),
                LayerPatch.from_pretrained, PatchError, "manifest file", record_property)


# ----------------------------------------------------------------------------- safetensors headers
def header_mutations(valid: bytes):
    """Re-encoded headers: entries with random/huge shapes, offsets, dtypes; any length prefix."""
    (n,) = struct.unpack("<Q", valid[:8])
    header, body = json.loads(valid[8:8 + n]), valid[8 + n:]

    @st.composite
    def make(draw) -> bytes:
        text = draw(json_mutations(header))
        if draw(st.booleans()):
            text = draw(DEEP)
        raw = text.encode()
        length = draw(st.one_of(st.just(len(raw)), st.integers(0, 2**64 - 1)))
        return struct.pack("<Q", length) + raw + body[: draw(st.integers(0, len(body)))]

    return make()


def test_fuzz_safetensors_header(patch_template, record_property):
    """read_header on mutated patch weights: only PatchFormatError (a PatchError), never a crash."""
    valid = (patch_template / WEIGHTS_NAME).read_bytes()
    fuzz_folder(st.one_of(byte_mutations(valid), header_mutations(valid), st.binary(max_size=64)),
                None, lambda folder, data: (folder / "x.safetensors").write_bytes(data),
                lambda folder: read_header(folder / "x.safetensors"), PatchError, "safetensors header", record_property)


def test_fuzz_patch_weights_through_the_reader(patch_template, record_property):
    """Mutated weights with a RESEALED sha256 (so the header and value checks, not the hash,
    must catch them) through LayerPatch.from_pretrained: only PatchError."""
    valid = (patch_template / WEIGHTS_NAME).read_bytes()

    def write(folder: Path, data: bytes) -> None:
        (folder / WEIGHTS_NAME).write_bytes(data)
        reseal(folder)

    count = fuzz_folder(st.one_of(byte_mutations(valid), header_mutations(valid)), patch_template, write,
                        LayerPatch.from_pretrained, PatchError, "patch weights", record_property)
    assert count.refused > 0


# ----------------------------------------------------------------------------- checkpoints
def test_fuzz_checkpoint_state_json(checkpoint_template, record_property):
    """load_checkpoint with checkpoint.json mutated (bytes and JSON): only CheckpointError."""
    load_checkpoint(checkpoint_template)  # the template itself is valid
    valid_bytes = (checkpoint_template / STATE_JSON).read_bytes()
    valid = json.loads(valid_bytes)
    count = fuzz_folder(st.one_of(byte_mutations(valid_bytes), json_mutations(valid).map(str.encode),
                                  DEEP.map(str.encode)),
                        checkpoint_template, lambda folder, data: (folder / STATE_JSON).write_bytes(data),
                        load_checkpoint, CheckpointError, "checkpoint json", record_property)
    assert count.refused > 0


def test_fuzz_checkpoint_tensors(checkpoint_template, record_property):
    """load_checkpoint with the state tensors mutated and the sha256 resealed: only CheckpointError."""
    state = json.loads((checkpoint_template / STATE_JSON).read_text())
    name = state["tensors"]["file"]
    valid = (checkpoint_template / name).read_bytes()

    def write(folder: Path, data: bytes) -> None:
        (folder / name).write_bytes(data)
        state["tensors"]["sha256"] = sha256_file(folder / name)
        (folder / STATE_JSON).write_text(json.dumps(state))

    count = fuzz_folder(st.one_of(byte_mutations(valid), header_mutations(valid)), checkpoint_template, write,
                        load_checkpoint, CheckpointError, "checkpoint tensors", record_property)
    assert count.refused > 0
