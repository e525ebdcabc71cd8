"""Fuzzing the parsers of untrusted files: patch manifests, safetensors headers, patch weights,
training checkpoints, trajectories, recipe YAML, user task YAML + JSONL, and GGUF models.

Each target gets random and mutated inputs (bit flips, truncations, splices, random JSON or
YAML, huge numbers, deep nesting, aliases, rewritten binary header fields) and must either
accept an input or refuse it with its own LayerzoError subclass (PatchError, CheckpointError,
ConfigError, TaskError, ...) whose message is one line without traceback text. Anything else
is a bug: another exception type, a multi-line message, a hang, a crash, a huge allocation.
A target does not stop at the first bug: it runs all its cases, collects every KIND of failure
(exception type and the file:line that raised it) with its smallest input, saved under
``$TMPDIR/layerzo-fuzz-<pid>/<target>/`` (or ``$LAYERZO_FUZZ_FAILURES``), and fails at the end with one
line per kind.

In-process targets have a per-example deadline and a peak-RSS check. The targets whose
parsers may hang or allocate without bound on hostile input (YAML aliases and templates, GGUF
headers that claim huge models) run every case in a forked child with a time limit and an
address-space limit, so a hang, a crash or a runaway allocation is caught and reported too.

Case counts: ``LAYERZO_FUZZ_EXAMPLES=N`` cases per target (default per CI run: 300, and 150 for
the targets that fork a child per case), ``LAYERZO_FUZZ_LONG=1`` at least 10,000 per target.
Every test prints its counts (``pytest -s``) and records the case count as ``fuzz_cases``.
"""

from __future__ import annotations

import collections
import faulthandler
import json
import os
import random
import re
import resource
import select
import shutil
import signal
import struct
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_tiny_model
from layerzo.data.tasks import load_task
from layerzo.errors import CheckpointError, ConfigError, LayerzoError, PatchError, TaskError
from layerzo.io.safetensors import read_header
from layerzo.model.loading import load_model
from layerzo.patch.format import LayerPatch
from layerzo.patch.manifest import MANIFEST_NAME, WEIGHTS_NAME, PatchManifest, TrajectoryStep, read_trajectory
from layerzo.tune.checkpoint import STATE_JSON, Checkpoint, load_checkpoint, save_checkpoint
from layerzo.tune.config import build_config, load_recipe
from patch_helpers import make_patch, reseal, sha256_file

REPO = Path(__file__).resolve().parents[1]
CI_EXAMPLES = 300  # per target and CI run: keep CI fast
FORKED_CI_EXAMPLES = 150  # the targets that fork a child per case (~50 ms each)
LONG_EXAMPLES = 10_000  # LAYERZO_FUZZ_LONG=1: at least this many per target
MAX_RSS_GROWTH_MB = 512  # the largest honest input here is a few kB; a "huge shape" must never be allocated
CHILD_SECONDS = 5.0  # forked targets: one case may take this long (a valid tiny GGUF loads in ~0.1 s)
CHILD_EXTRA_BYTES = 2 << 30  # ... and grow its address space by this much at most
MAX_MESSAGE_CHARS = 10_000  # a refusal that long echoes the input back instead of describing it
# one folder per run (concurrent runs must not delete each other's findings); LAYERZO_FUZZ_FAILURES overrides it
FAILURES_DIR = Path(os.environ.get("LAYERZO_FUZZ_FAILURES")
                    or Path(tempfile.gettempdir()) / f"layerzo-fuzz-{os.getpid()}")


def fuzz_examples(ci: int = CI_EXAMPLES, environ: Mapping[str, str] = os.environ) -> int:
    """Cases per target: ``ci``, or LAYERZO_FUZZ_EXAMPLES; LAYERZO_FUZZ_LONG=1 makes it at least 10,000."""
    explicit = environ.get("LAYERZO_FUZZ_EXAMPLES", "").strip()
    n = int(explicit) if explicit else ci
    return max(n, LONG_EXAMPLES) if environ.get("LAYERZO_FUZZ_LONG", "").strip() not in ("", "0") else n


MAX_EXAMPLES = fuzz_examples()


def fuzz_settings(n: int = MAX_EXAMPLES, deadline: int | None = 5000):
    return settings(max_examples=n, deadline=deadline, database=None, derandomize=False,
                    suppress_health_check=list(HealthCheck))


FUZZ = fuzz_settings()

HUGE = st.sampled_from([2**31, 2**32 + 1, 2**53 + 1, 2**63, 2**64 + 7, 10**30, -1, -(2**63), 10**300, 10**400,
                        -(10**400)])  # 10**400: past float range, where math.isfinite and float() overflow
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), HUGE, st.floats(allow_nan=True, allow_infinity=True),
                      st.text(max_size=40))
JSON = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                     st.dictionaries(st.text(max_size=12), inner, max_size=6)),
                    max_leaves=30)
DEEP = st.integers(min_value=500, max_value=200_000).flatmap(
    lambda n: st.sampled_from(["[" * n + "]" * n, '{"a":' * n + "1" + "}" * n, "[" * n]))


# ----------------------------------------------------------------------------- outcomes
def raise_site(exc: BaseException) -> str:
    """``layerzo/x.py:12`` (the innermost layerzo frame) and, if deeper, the frame that raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"

    def short(frame) -> str:
        path = frame.filename
        for root in ("site-packages" + os.sep, str(REPO) + os.sep):
            if root in path:
                path = path.split(root, 1)[1]
        path = re.sub(r"^.*[/\\]lib[/\\]python3\.\d+[/\\]", "", path)  # the standard library: json/decoder.py
        return f"{path}:{frame.lineno}"

    ours = [f for f in frames if f"{os.sep}layerzo{os.sep}" in f.filename or f"{os.sep}cli{os.sep}" in f.filename]
    inner = short(frames[-1])
    if ours and short(ours[-1]) != inner:
        return f"{short(ours[-1])} (raised in {inner})"
    return inner


def classify(exc: BaseException, expected: type[Exception]) -> dict:
    """One exception as a JSON-able outcome: a proper refusal, or a failure of some kind."""
    message, hint = str(exc), getattr(exc, "hint", None) or ""
    cause = exc.__cause__ or exc.__context__
    while cause is not None and not isinstance(cause, MemoryError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, expected) and cause is not None:  # refused, but only after trying to allocate gigabytes
        return {"status": "failure", "kind": f"MemoryError at {raise_site(cause)}, refused as {type(exc).__name__}",
                "detail": repr(message[:300])}
    if isinstance(exc, expected):
        if any(bad in text for text in (message, hint) for bad in ("\n", "\r", "Traceback")):
            return {"status": "failure", "kind": f"multi-line {type(exc).__name__} message at {raise_site(exc)}",
                    "detail": repr(message[:300])}
        if len(message) + len(hint) > MAX_MESSAGE_CHARS:
            return {"status": "failure", "kind": f"{type(exc).__name__} message over {MAX_MESSAGE_CHARS} chars at "
                                                 f"{raise_site(exc)}", "detail": repr(message[:200] + " ...")}
        return {"status": "refused", "length": len(message) + len(hint), "message": message[:160]}
    first = (message.splitlines() or [""])[0][:300]
    return {"status": "failure", "kind": f"{type(exc).__module__}.{type(exc).__qualname__} at {raise_site(exc)}",
            "detail": repr(first)}


def outcome(call: Callable[[], object], expected: type[Exception]) -> dict:
    try:
        call()
    except Exception as exc:  # MemoryError and RecursionError included: they are findings too
        return classify(exc, expected)
    return {"status": "accepted"}


def address_space_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * resource.getpagesize()


def forked(call: Callable[[], object], expected: type[Exception], seconds: float = CHILD_SECONDS) -> dict:
    """:func:`outcome` of ``call`` in a forked child with a time and address-space limit."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: limit, call, report one JSON document, leave without any cleanup
        code = 0
        try:
            os.close(read_fd)
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            limit = address_space_bytes() + CHILD_EXTRA_BYTES
            limit = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
            with os.fdopen(write_fd, "wb") as pipe:
                pipe.write(json.dumps(outcome(call, expected)).encode())
        except BaseException:  # pragma: no cover - reported by the parent as "no result"
            code = 70
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks, deadline = [], time.monotonic() + seconds
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while True:
            ready, _, _ = select.select([pipe], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"status": "failure", "kind": f"hang (no answer within {seconds:g} s)", "detail": ""}
            chunk = pipe.read(65536)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if chunks:
        return json.loads(b"".join(chunks))
    if os.WIFSIGNALED(status):
        return {"status": "failure", "kind": f"crash (signal {os.WTERMSIG(status)})", "detail": ""}
    return {"status": "failure", "kind": f"child exited {os.WEXITSTATUS(status)} without a result", "detail": ""}


class Outcomes:
    """What one target's cases did; failures are grouped by kind, each with its smallest input."""

    def __init__(self, name: str, expected: type[Exception]) -> None:
        self.name, self.expected = name, expected
        self.ran = self.accepted = self.refused = self.longest = 0
        self.failures: dict[str, list] = {}  # kind -> [count, detail, smallest sample {file name: bytes}]
        self.reasons: collections.Counter = collections.Counter()  # refusal messages, numbers and paths blanked
        self.t0 = time.monotonic()

    def judge(self, result: dict, sample: dict[str, bytes]) -> None:
        self.ran += 1
        if result["status"] == "accepted":
            self.accepted += 1
        elif result["status"] == "refused":
            self.refused += 1
            self.longest = max(self.longest, result["length"])
            self.reasons[re.sub(r"\S*/\S*|\d+", "#", result["message"])[:70]] += 1
        else:
            entry = self.failures.setdefault(result["kind"], [0, result["detail"], sample])
            entry[0] += 1
            if sum(map(len, sample.values())) < sum(map(len, entry[2].values())):
                entry[2] = sample

    def call(self, fn: Callable[[], object], sample: dict[str, bytes]) -> None:
        self.judge(outcome(fn, self.expected), sample)

    def call_forked(self, fn: Callable[[], object], sample: dict[str, bytes]) -> None:
        self.judge(forked(fn, self.expected), sample)

    def report(self, record_property, minimum: int = MAX_EXAMPLES) -> None:
        lines = [f"fuzz {self.name}: {self.ran} cases in {time.monotonic() - self.t0:.0f} s, {self.accepted} accepted, "
                 f"{self.refused} refused (longest message {self.longest} chars), {len(self.failures)} failure kind(s)"]
        folder = FAILURES_DIR / re.sub(r"\W+", "-", self.name)
        shutil.rmtree(folder, ignore_errors=True)
        for i, (kind, (count, detail, sample)) in enumerate(sorted(self.failures.items())):
            where = folder / f"{i:02d}"
            where.mkdir(parents=True)
            (where / "KIND.txt").write_text(f"{kind}\n{detail}\n")
            for name, data in sample.items():
                (where / name).write_bytes(data)
            lines.append(f"  {count}x {kind}: {detail} [smallest input: {where}]")
        common = ", ".join(f"{n}x {reason!r}" for reason, n in self.reasons.most_common(4))
        print("\n" + "\n".join(lines) + f"\n  most common refusals: {common}")
        record_property("fuzz_cases", self.ran)
        assert self.ran >= minimum // 2, f"hypothesis ran only {self.ran} cases"  # not silently skipped
        if self.failures:
            pytest.fail("\n".join(lines), pytrace=False)


# ----------------------------------------------------------------------------- mutations
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


# numbers JSON can spell but Python cannot always take: past float range, past the int-digit limit
BIG_NUMBER_TEXTS = st.sampled_from([
    "9" * 400, "-" + "9" * 400, "9" * 4301, "9" * 5000, "1e400", "-1e400", "1e-400", "0." + "0" * 400 + "1",
    "1" + "0" * 309, "18446744073709551616", "9223372036854775808", "-9223372036854775809", "1E+999999999"])
NUMBER = re.compile(r"(?<![\w.\"])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w.\"])")


@st.composite
def big_numbers(draw, text: str) -> str:
    """``text`` with 1-3 of its numbers replaced by huge ones (spelled out: json.dumps cannot write them)."""
    spans = [m.span() for m in NUMBER.finditer(text)]
    chosen = draw(st.lists(st.sampled_from(spans), min_size=1, max_size=3, unique=True)) if spans else []
    for start, end in sorted(chosen, reverse=True):
        text = text[:start] + draw(BIG_NUMBER_TEXTS) + text[end:]
    return text


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


# YAML's own traps: implicit types (dates, sexagesimal, octal), tags, aliases, anchors, merge keys,
# block scalars, complex keys, numbers past float range or int-digit limits.
YAML_TOKENS = st.sampled_from([
    "null", "~", "", "true", "yes", "on", "off", "NaN", ".nan", ".inf", "-.inf", "1e400", "-1e400", "1.0e+400",
    "0x7fffffffffffffff", "0o777", "0b101", "1_000", "1:30", "190:20:30", "2001-12-14", "2001-12-14t21:59:43.10-05:00",
    "!!binary aGVsbG8=", "!!python/object/apply:os.getcwd []", "!!python/name:os.getcwd", "!!set {a, b}",
    "!!omap [a: 1]", "!!pairs [a: 1]", "!!float abc", "!!int 1.5", "!!int 0x", "!!str 5", "!!bool maybe",
    "!!timestamp x", "!!null x", "!!map [1]", "!!seq {a: 1}", "!custom x", "*nope", "&a [1, *a]", "&b {x: *b}",
    "[1, 2, 3]", "{}", "[]", "{a: 1}", "[0, -1, 99]", '"line\\nbreak"', "'single'", "|\n  block\n  text",
    ">\n  folded", "? [a, b]\n: c", "- 1\n- 2", "-", "- - -", "{? [a]: b}", "[*x]", "<<: {a: 1}", "%TAG ! x",
    "---", "...", "\t", '"\\x00"', '"\\ud800"', "9" * 400, "9" * 5000, "1" * 4301, "-" + "7" * 4400, "1e" + "9" * 400,
    "0." + "0" * 5000 + "1", "[" * 2000, "{a: " * 1500,
])
YAML_VALUES = st.one_of(YAML_TOKENS, st.integers().map(str), HUGE.map(str), st.floats().map(repr),
                        st.text(max_size=20).map(json.dumps), st.text(max_size=20))


@st.composite
def yaml_line_mutations(draw, text: str, values=YAML_VALUES) -> str:
    """``text`` (a flat ``key: value`` YAML) with 1-3 lines edited: a value, a key, indentation, or a line."""
    lines = text.splitlines() or [""]
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        key, sep, rest = lines[i].partition(":")
        op = draw(st.sampled_from(["value", "value", "value", "key", "indent", "duplicate", "drop", "insert"]))
        if op == "value" and sep:
            lines[i] = f"{key}: {draw(values)}"
        elif op == "key" and sep:
            lines[i] = f"{draw(YAML_VALUES)}:{rest}"
        elif op == "indent":
            lines[i] = " " * draw(st.integers(1, 4)) + lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "drop" and len(lines) > 1:
            del lines[i]
        else:
            lines.insert(i, draw(YAML_TOKENS))
    return "\n".join(lines) + "\n"


@st.composite
def billion_laughs(draw, keys: list[str]) -> str:
    """``key: [&l0 [lol, ...], &l1 [*l0, ...], ...]``: a few hundred bytes that mean width**depth leaves."""
    key, depth, width = draw(st.sampled_from(keys)), draw(st.integers(2, 9)), draw(st.integers(2, 9))
    while draw(st.integers(0, 5)) and width**depth > 10**5:  # mostly sizes a parser can afford to expand
        depth -= 1
    levels = [f"&l0 [{', '.join(['lol'] * width)}]"]
    levels += [f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, depth)]
    return f"{key}: [{', '.join(levels)}]\n"


def mutated_json_lines(valid: bytes):
    """A JSONL file: bytes mutated, or one line replaced by random/mutated JSON, deep nesting, or garbage."""
    lines = valid.decode().splitlines()

    @st.composite
    def one_line(draw) -> bytes:
        i = draw(st.integers(0, len(lines) - 1))
        new = draw(st.one_of(json_mutations(json.loads(lines[i])), big_numbers(lines[i]), JSON.map(json.dumps), DEEP,
                             st.binary(max_size=24).map(lambda b: b.decode("latin-1")), st.just("")))
        edited = lines[:i] + [new] + lines[i + 1:]
        if draw(st.booleans()):
            edited = draw(st.permutations(edited))
        return ("\n".join(edited) + "\n").encode("utf-8", "surrogatepass")

    return st.one_of(byte_mutations(valid), one_line(), st.binary(max_size=64))


def fuzz_folder(strategy, template: Path | None, write, load, error, name: str, record_property) -> Outcomes:
    """For each drawn input: ``write(folder, data)``, then ``load(folder)``: accepted, or one ``error`` line.

    ``folder`` is a private copy of ``template`` (an empty folder when None),
    removed afterwards; the peak RSS may not jump. Returns the outcomes.
    """
    count, before = Outcomes(name, error), peak_rss_mb()
    if template is None:
        folder = Path(tempfile.mkdtemp(prefix="layerzo-fuzz-")) / "work"
        folder.mkdir()
    else:
        folder = fresh_copy(template)

    @FUZZ
    @given(strategy)
    def run(data):
        write(folder, data)
        count.call(lambda: load(folder), {"input": data})

    try:
        run()
    finally:
        shutil.rmtree(folder.parent)
    count.report(record_property)
    assert peak_rss_mb() - before < MAX_RSS_GROWTH_MB
    return count


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fresh_copy(template: Path) -> Path:
    work = Path(tempfile.mkdtemp(prefix="layerzo-fuzz-"))
    return Path(shutil.copytree(template, work / template.name))


@pytest.fixture()
def fork_safe(monkeypatch):
    """Forked children must not warn about (or deadlock on) the tokenizers' thread pool."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


# ----------------------------------------------------------------------------- the harness itself
def test_case_counts_keep_ci_fast_and_the_long_mode_runs_ten_thousand():
    assert fuzz_examples(environ={}) == CI_EXAMPLES == 300
    assert fuzz_examples(FORKED_CI_EXAMPLES, environ={}) == FORKED_CI_EXAMPLES == 150
    assert fuzz_examples(environ={"LAYERZO_FUZZ_EXAMPLES": "50"}) == 50
    assert fuzz_examples(FORKED_CI_EXAMPLES, environ={"LAYERZO_FUZZ_LONG": "1"}) == LONG_EXAMPLES == 10_000
    assert fuzz_examples(environ={"LAYERZO_FUZZ_LONG": "1", "LAYERZO_FUZZ_EXAMPLES": "20000"}) == 20_000
    assert fuzz_examples(environ={"LAYERZO_FUZZ_LONG": "0"}) == CI_EXAMPLES


def test_the_harness_tells_refusals_from_failures(fork_safe):
    # a ConfigError that keeps its text as given (LayerzoError itself folds and clips it), named as the real one
    Raw = type("ConfigError", (ConfigError,), {"__str__": lambda self: self.raw, "__module__": "layerzo.errors",
                                               "__qualname__": "ConfigError"})

    def refuse(message="bad input"):
        error = Raw(message)
        error.raw = message
        raise error

    assert outcome(lambda: None, ConfigError) == {"status": "accepted"}
    assert outcome(refuse, ConfigError) == {"status": "refused", "length": 9, "message": "bad input"}
    assert outcome(lambda: refuse("two\nlines"), ConfigError)["kind"].startswith("multi-line ConfigError message")
    assert outcome(lambda: refuse("Traceback (most recent call last):"), ConfigError)["status"] == "failure"
    assert outcome(lambda: refuse("x" * 20_000), ConfigError)["kind"].startswith("ConfigError message over 10000")
    wrong = outcome(lambda: refuse(), PatchError)
    assert wrong["status"] == "failure" and wrong["kind"].startswith("layerzo.errors.ConfigError at ")
    crash = outcome(lambda: {}["k"], ConfigError)
    assert crash["kind"].startswith("builtins.KeyError at tests/test_fuzz.py:") and crash["detail"] == "\"'k'\""
    assert forked(refuse, ConfigError) == {"status": "refused", "length": 9, "message": "bad input"}
    assert forked(lambda: time.sleep(30), ConfigError, seconds=0.5)["kind"] == "hang (no answer within 0.5 s)"
    segfault = lambda: (faulthandler.disable(), os.kill(os.getpid(), signal.SIGSEGV))  # noqa: E731 (no dump)
    assert forked(segfault, ConfigError)["kind"] == "crash (signal 11)"
    assert forked(lambda: bytearray(4 << 30), ConfigError)["kind"].startswith("builtins.MemoryError at ")

    def wrapped():
        try:
            bytearray(4 << 30)
        except MemoryError as exc:
            raise ConfigError("cannot load it") from exc

    assert forked(wrapped, ConfigError)["kind"].startswith("MemoryError at tests/test_fuzz.py:")


# ----------------------------------------------------------------------------- templates
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
    count, before = Outcomes("manifest dict", PatchError), peak_rss_mb()

    @FUZZ
    @given(st.one_of(JSON, json_mutations(valid).map(json.loads)))
    def run(doc):
        count.call(lambda: PatchManifest.from_dict(doc), {"manifest.json": json.dumps(doc).encode()})

    run()
    count.report(record_property=record_property)
    assert peak_rss_mb() - before < MAX_RSS_GROWTH_MB


def test_fuzz_manifest_file(patch_template, record_property):
    """LayerPatch.from_pretrained with the manifest file's bytes mutated, replaced or deeply nested."""
    valid_bytes = (patch_template / MANIFEST_NAME).read_bytes()
    valid = json.loads(valid_bytes)
    fuzz_folder(st.one_of(byte_mutations(valid_bytes), json_mutations(valid).map(str.encode), DEEP.map(str.encode),
                          JSON.map(lambda d: json.dumps(d).encode()),
                          big_numbers(valid_bytes.decode()).map(str.encode)),
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
            text = draw(st.one_of(DEEP, big_numbers(json.dumps(header))))
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


# ----------------------------------------------------------------------------- trajectories
def test_fuzz_trajectory(tmp_path, record_property):
    """read_trajectory on mutated trajectory.jsonl files: only PatchError (PatchFormatError)."""
    steps = [TrajectoryStep(0, (5, 6), (0.25, -0.5), 1e-3), TrajectoryStep(2, (7,), (1.5,), 1e-3),
             TrajectoryStep(3, (2**63 - 1,), (-3e-8,), 5e-4)]
    valid = "".join(s.to_json() + "\n" for s in steps).encode()
    path = tmp_path / "trajectory.jsonl"
    path.write_bytes(valid)
    assert read_trajectory(path) == steps  # the template itself is valid
    count, before = Outcomes("trajectory", PatchError), peak_rss_mb()

    @FUZZ
    @given(mutated_json_lines(valid))
    def run(data):
        path.write_bytes(data)
        count.call(lambda: read_trajectory(path), {"trajectory.jsonl": data})

    run()
    count.report(record_property=record_property)
    assert count.refused > 0 and peak_rss_mb() - before < MAX_RSS_GROWTH_MB


# ----------------------------------------------------------------------------- checkpoints
def test_fuzz_checkpoint_state_json(checkpoint_template, record_property):
    """load_checkpoint with checkpoint.json mutated (bytes and JSON): only CheckpointError."""
    load_checkpoint(checkpoint_template)  # the template itself is valid
    valid_bytes = (checkpoint_template / STATE_JSON).read_bytes()
    valid = json.loads(valid_bytes)
    count = fuzz_folder(st.one_of(byte_mutations(valid_bytes), json_mutations(valid).map(str.encode),
                                  DEEP.map(str.encode), big_numbers(valid_bytes.decode()).map(str.encode)),
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


# ----------------------------------------------------------------------------- recipe YAML
RECIPE_KEYS = ["model", "task", "layers", "lr", "steps", "seed", "dtype", "lora", "max_length", "weight_decay"]


def test_fuzz_recipe_yaml(tmp_path, fork_safe, record_property):
    """load_recipe + build_config (what ``--recipe`` does) on mutated recipe YAML: accepted or one ConfigError line."""
    valid = (REPO / "recipes" / "smollm2-135m.yaml").read_bytes()
    path = tmp_path / "recipe.yaml"
    path.write_bytes(valid)
    build_config(load_recipe(path))  # the template itself is valid
    count = Outcomes("recipe yaml", ConfigError)
    plain = "".join(line for line in valid.decode().splitlines(keepends=True) if not line.startswith("#"))
    texts = st.one_of(yaml_line_mutations(plain).map(str.encode), byte_mutations(valid),
                      big_numbers(plain).map(str.encode),
                      json_mutations(load_recipe(path)).map(str.encode),  # JSON is YAML too
                      billion_laughs(RECIPE_KEYS).map(str.encode), DEEP.map(str.encode), st.binary(max_size=64))

    @fuzz_settings(fuzz_examples(FORKED_CI_EXAMPLES), deadline=None)  # each case has the child's time limit
    @given(texts)
    def run(data):
        path.write_bytes(data)
        count.call_forked(lambda: build_config(load_recipe(path)), {"recipe.yaml": data})

    run()
    count.report(record_property, minimum=fuzz_examples(FORKED_CI_EXAMPLES))


# ----------------------------------------------------------------------------- user task YAML + JSONL
TASK_YAML = """name: fuzz_sentiment
train: train.jsonl
validation: validation.jsonl
template: "Review: {text}\\nSentiment:"
candidates: {negative: " negative", positive: " positive"}
label_field: sentiment
label_map: {neg: negative, pos: positive}
"""
TASK_KEYS = ["name", "train", "validation", "template", "candidates", "label_field", "label_map"]
TASK_VALUES = st.one_of(YAML_VALUES, st.sampled_from([
    # data paths, relative to the YAML (never absolute: a fuzzer must not open /dev/...)
    "train.jsonl", "validation.jsonl", "missing.jsonl", ".", "sub", "train.jsonl/", "./../x.jsonl", "task.yaml",
    # templates
    '"{text}"', '"{}"', '"{0}"', '"{text.upper}"', '"{text[0]}"', '"{text!r}"', '"{text!z}"', '"{text:d}"',
    '"{text:>99999999999}"', '"{text:>400000000}"', '"{text:{sentiment}}"', '"{text:{id}}"', '"{text"', '"}"',
    '"{{text}}"', '"{sentiment}"', '"{id} {text}"', '"{missing}"', '"{text} {{"', '"{ text }"', '"{text:%}"',
    # candidates and label maps
    "[a, b]", '[" a", " b"]', "[]", '{1: " one", "1": " uno"}', '{neg: " n", neg: " m"}', '{true: " t", 1: " one"}',
    '{2001-12-14: " date", x: " x"}', '{!!binary aGk=: " b"}', '{1.5: " x", .nan: " y"}', '{[1]: x}',
    '{neg: negative, pos: nowhere}', '{? [a]: b}', '{"": " empty"}', '{a: ""}', "{a: 1}", "{a: [x]}",
]))


def task_files() -> dict[str, bytes]:
    fixtures = REPO / "tests" / "fixtures" / "custom"
    return {"task.yaml": TASK_YAML.encode(), "train.jsonl": (fixtures / "train.jsonl").read_bytes(),
            "validation.jsonl": (fixtures / "validation.jsonl").read_bytes()}


@st.composite
def task_folders(draw) -> dict[str, bytes]:
    """The three files of a user task, at least one of them mutated."""
    files = task_files()
    yaml_edit = st.one_of(yaml_line_mutations(TASK_YAML, TASK_VALUES).map(str.encode),
                          byte_mutations(files["task.yaml"]),
                          billion_laughs(TASK_KEYS).map(lambda t: (TASK_YAML + t).encode()))
    which = draw(st.sets(st.sampled_from(sorted(files)), min_size=1))
    for name in which:
        files[name] = draw(yaml_edit if name == "task.yaml" else mutated_json_lines(files[name]))
    return files


def test_fuzz_user_task(tmp_path, fork_safe, record_property):
    """load_task on a folder with a task YAML and its JSONL files, mutated: accepted or one TaskError line."""
    folder = tmp_path / "task"
    folder.mkdir()

    def load():
        return load_task(folder / "task.yaml", num_train=4, num_dev=2, num_test=4, seed=0)

    for name, data in task_files().items():
        (folder / name).write_bytes(data)
    assert len(load().train) == 4  # the template itself is valid
    count = Outcomes("user task", TaskError)

    @fuzz_settings(fuzz_examples(FORKED_CI_EXAMPLES), deadline=None)  # each case has the child's time limit
    @given(task_folders())
    def run(files):
        for name, data in files.items():
            (folder / name).write_bytes(data)
        count.call_forked(load, files)

    run()
    count.report(record_property, minimum=fuzz_examples(FORKED_CI_EXAMPLES))


# ----------------------------------------------------------------------------- GGUF
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE vocabularies are spelled in it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return dict(zip(printable + others, map(chr, printable + [256 + i for i in range(len(others))])))


def write_tiny_gguf(path: Path, layers: int = 2, hidden: int = 16, heads: int = 2, inter: int = 32) -> Path:
    """A llama GGUF of a few tens of kB: byte-level BPE tokenizer (259 tokens), random fp32 weights."""
    import gguf

    tokens = [*bytes_to_unicode().values(), "Ġa", "Ġb", "<|endoftext|>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(["Ġ a", "Ġ b"])
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_bos_token_id(len(tokens) - 1)
    rng = np.random.default_rng(0)
    kv = hidden // heads
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.attn_q.weight": (hidden, hidden),
                       f"blk.{i}.attn_k.weight": (kv, hidden), f"blk.{i}.attn_v.weight": (kv, hidden),
                       f"blk.{i}.attn_output.weight": (hidden, hidden), f"blk.{i}.ffn_norm.weight": (hidden,),
                       f"blk.{i}.ffn_gate.weight": (inter, hidden), f"blk.{i}.ffn_up.weight": (inter, hidden),
                       f"blk.{i}.ffn_down.weight": (hidden, inter)})
    for name, shape in shapes.items():
        writer.add_tensor(name, (0.02 * rng.standard_normal(shape)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_slots(path: Path, values_only: bool) -> list[list[tuple[int, int, str]]]:
    """Per header field (metadata and tensor infos): its numbers as (offset, size, numpy kind).

    ``values_only``: only the numbers a field SAYS (hyper-parameters, token ids, tensor dims, types
    and offsets), not the lengths and type codes that frame it.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = []
    for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        slots, pos = [], field.offset
        for index, part in enumerate(field.parts):
            numeric = part.dtype != np.uint8 or part.nbytes == 1  # uint8 runs are string bytes
            if numeric and (index in field.data or not values_only):
                slots += [(pos + k * part.itemsize, part.itemsize, part.dtype.kind) for k in range(min(part.size, 64))]
            pos += part.nbytes
        out.append(slots)
    return [slots for slots in out if slots]


INTERESTING = {  # by (size, kind): values at the edges of what a field can say
    (4, "u"): [0, 1, 2, 3, 7, 64, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1],
    (4, "i"): [0, 1, -1, 3, 2**31 - 1, -(2**31)],
    (8, "u"): [0, 1, 2, 5440, 40768, 2**32, 2**40, 2**63, 2**64 - 1],
    (8, "i"): [0, -1, 2**63 - 1, -(2**63)],
    (4, "f"): [0.0, -1.0, 1e38, float("nan"), float("inf"), float("-inf")],
    (1, "u"): [0, 1, 2, 255], (1, "b"): [0, 1, 2, 255], (1, "i"): [0, 1, -1],
}
PACK = {(1, "u"): "<B", (1, "b"): "<B", (1, "i"): "<b", (4, "u"): "<I", (4, "i"): "<i", (8, "u"): "<Q",
        (8, "i"): "<q", (4, "f"): "<f", (8, "f"): "<d", (2, "u"): "<H", (2, "i"): "<h"}


def gguf_mutations(valid: bytes, path: Path, data_offset: int):
    """Header numbers set to edge values (hyper-parameters, token ids, dims, tensor types and offsets;
    or the counts, lengths and type codes that frame them), header bytes mutated, or the file cut short."""
    said, framing = gguf_slots(path, values_only=True), gguf_slots(path, values_only=False)

    @st.composite
    def number(draw, fields) -> bytes:
        buf = bytearray(valid)
        for _ in range(draw(st.integers(1, 3))):
            pos, size, kind = draw(st.sampled_from(draw(st.sampled_from(fields))))
            choices = INTERESTING.get((size, kind), [0])
            near = st.integers(0, 40) if kind in "uib" else st.floats(width=32)
            value = draw(st.one_of(st.sampled_from(choices), near))
            buf[pos:pos + size] = struct.pack(PACK[(size, kind)], value)
        return bytes(buf)

    header = byte_mutations(valid[4:data_offset]).map(lambda h: valid[:4] + h + valid[data_offset:])  # magic kept
    cut = st.integers(0, len(valid) - 1).map(lambda n: valid[:n])
    return st.one_of(number(said), number(said), number(said), number(framing), header, cut, byte_mutations(valid))


class SilentlyWrong(Exception):
    """load_model accepted a file but the model is not (only) what the file holds."""


def load_gguf_exactly(path: Path) -> None:
    """load_model, and if it accepts the file: every parameter and every layer of the model came from it."""
    import gguf

    loaded = load_model(path)
    tensors = gguf.GGUFReader(str(path)).tensors
    blocks = {t.name.split(".")[1] for t in tensors if t.name.startswith("blk.")}
    in_file = sum(int(t.n_elements) for t in tensors)
    in_model = sum(p.numel() for p in loaded.model.parameters())
    if in_model > in_file:
        raise SilentlyWrong(f"accepted: the model has {in_model} parameters, the file holds {in_file} values "
                            f"(the rest are random)")
    if loaded.layout.num_layers != len(blocks):
        raise SilentlyWrong(f"accepted: the model has {loaded.layout.num_layers} layers, the file {len(blocks)}")


@pytest.fixture(scope="module")
def gguf_template(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_the_tiny_gguf_loads(gguf_template):
    load_gguf_exactly(gguf_template)
    loaded = load_model(gguf_template)
    assert loaded.layout.num_layers == 2 and loaded.model.config.hidden_size == 16
    assert loaded.tokenizer(" a b").input_ids == [256, 257]


def test_fuzz_gguf(gguf_template, tmp_path, fork_safe, record_property):
    """load_model on mutated tiny GGUF files: accepted or one LayerzoError line; no hang, crash or huge allocation."""
    import gguf

    load_model(gguf_template)  # valid; and the parent has imported everything once, so each child is quick
    valid = gguf_template.read_bytes()
    strategy = gguf_mutations(valid, gguf_template, gguf.GGUFReader(str(gguf_template)).data_offset)
    path = tmp_path / "m.gguf"
    count = Outcomes("gguf", LayerzoError)
    n = fuzz_examples(FORKED_CI_EXAMPLES)

    @fuzz_settings(n, deadline=None)  # each case has the child's time limit
    @given(strategy)
    def run(data):
        path.write_bytes(data)
        count.call_forked(lambda: load_gguf_exactly(path), {"m.gguf": data})

    run()
    count.report(record_property=record_property, minimum=n)
