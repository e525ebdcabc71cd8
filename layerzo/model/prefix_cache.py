"""Run the frozen decoder layers below the tuned one once per batch, not once per forward.

A ZO step evaluates the same batch 2·q times with different perturbations of
layers ≥ ``first``. Layers ``0 .. first-1`` see identical inputs and weights
every time, so their output (the input of layer ``first``) is captured on the
first forward of the batch and replayed afterwards: the lower layers are
temporarily replaced by modules that return the captured tensor.

The result is bit-identical to the plain forward (layer ``first`` receives
the very same tensor), and it requires that nothing below ``first`` is tuned
(no tuned embeddings), which the caller guarantees.

Across runs (a :class:`SharedLowerOutputs` passed to every run): a layer sweep tunes layer 0, 1,
2, ... of ONE base model on the SAME batches. Run k needs, per batch, the
output of base layer k-1; run k-1 already computed that of layer k-2. So the
sweep keeps, per batch, the deepest frozen output seen so far, and run k
only runs layer k-1 on top of it: the layers below the tuned one cost one
layer per batch per run instead of k. Valid while every layer below the
tuned one holds its base weights between runs (the sweep restores and
sha-checks each layer before the next run).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from layerzo.model.layers import LayerLayout, get_layers

SHARED_MAX_BYTES = 2 * 1024**3  # default cap of what a sweep keeps across runs


class _Replay(nn.Module):
    """Stands in for a lower decoder layer: returns the captured output of layer first-1."""

    def __init__(self, captured: dict) -> None:
        super().__init__()
        self._captured = captured

    def forward(self, *args, **kwargs):
        return self._captured["out"]


@contextmanager
def restored_layers(layers: nn.ModuleList, first: int) -> Iterator[list[nn.Module]]:
    """Yields layers ``0 .. first-1`` (the caller may replace them in ``layers``); puts them back on exit."""
    originals = [layers[i] for i in range(first)]
    try:
        yield originals
    finally:
        for i, module in enumerate(originals):
            layers[i] = module


class SharedLowerOutputs:
    """Per batch (keyed by its token ids and mask), the deepest frozen layer output seen so far."""

    def __init__(self, max_bytes: int = SHARED_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: dict[bytes, tuple[int, Any]] = {}  # key -> (level = index of the layer it feeds, output)

    @staticmethod
    def key(batch) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for t in (batch.input_ids, batch.attention_mask):
            h.update(repr(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.digest()

    def lookup(self, key: bytes, first: int) -> tuple[int, Any]:
        """(level, output) of the deepest entry usable for a run tuning ``first``, or (0, None)."""
        level, out = self._entries.get(key, (0, None))
        return (level, out) if level <= first else (0, None)

    def remember(self, key: bytes, level: int, output: Any) -> None:
        old_level, old = self._entries.get(key, (0, None))
        if level <= old_level:
            return
        grow = _nbytes(output) - (_nbytes(old) if old is not None else 0)
        if self.bytes + grow > self.max_bytes:
            return  # full: this batch's lower layers are recomputed per step, as without the cache
        self._entries[key] = (level, output)
        self.bytes += grow


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    return 0


@contextmanager
def cached_lower_layers(
    model: nn.Module, layout: LayerLayout, first: int, store: dict | None = None, batch=None,
    shared: SharedLowerOutputs | None = None,
) -> Iterator[None]:
    """Within the block, all forwards must use the SAME batch; layers < ``first`` run only once.

    ``store`` keeps the captured output beyond the block: pass the same dict
    again for the same batch (e.g. a fixed dev batch evaluated every N steps)
    and the lower layers do not run at all. ``shared`` (with ``batch``, the
    ScoringBatch the forwards use) lets the run start from a deeper output
    cached by an earlier run on the same base model. ``first == 0`` (nothing below the
    tuned layer) makes this a no-op.
    """
    if first <= 0:
        yield
        return
    layers = get_layers(model, layout)
    captured: dict = {} if store is None else store
    shared = shared if batch is not None else None
    key = shared.key(batch) if shared is not None else b""
    start, start_out = shared.lookup(key, first) if shared is not None and "out" not in captured else (0, None)
    if start == first:
        captured["out"] = start_out

    def replay() -> None:
        for i in range(first):
            layers[i] = _Replay(captured)

    def capture(module, args, output):
        captured["out"] = output
        if shared is not None:
            shared.remember(key, first, output)
        # Later forwards skip the lower layers. A model iterates a snapshot or an
        # iterator over already-visited slots, so the current forward is unaffected.
        replay()

    handle = None
    with restored_layers(layers, first) as originals:
        if "out" in captured:
            replay()
        else:
            if start > 0:  # an earlier run's output of layer start-1: run only layers start..first-1
                earlier = {"out": start_out}
                for i in range(start):
                    layers[i] = _Replay(earlier)
            handle = originals[-1].register_forward_hook(capture)
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()


# ----------------------------------------------------------------------------- generation
class _ReplayWithCache(nn.Module):
    """A lower layer during a replayed prefill: puts its saved KV-cache entry back and returns the saved output."""

    def __init__(self, index: int, store: dict) -> None:
        super().__init__()
        self._index, self._store = index, store

    def forward(self, *args, **kwargs):
        # found by type, not name: architectures pass it as cache=, layer_past= or positionally
        cache = next(a for a in (*kwargs.values(), *args) if isinstance(getattr(a, "layers", None), list))
        # a shallow copy: a decode step re-binds the layer's tensors (torch.cat), the saved ones stay intact
        cache.layers[self._index] = copy.copy(self._store["kv"][self._index])
        return self._store["out"]


def shares_prefill(cache: Any, first: int) -> bool:
    """Whether a generation cache can hold replayed lower-layer entries (a per-layer cache, like DynamicCache)."""
    layers = getattr(cache, "layers", None)
    return first > 0 and isinstance(layers, list) and len(layers) >= first


@contextmanager
def replayed_prefill(model: nn.Module, layout: LayerLayout, first: int, store: dict) -> Iterator[None]:
    """Around ONE prefill forward of a generation: layers < ``first`` run once per ``store``.

    The + and − generations of a ZO step read the same prompts, and layers
    below the tuned one are frozen, so their output AND their KV-cache entries
    for the prompt are the same in both. The first prefill captures them (the
    caller saves the cache entries with :func:`save_prefill`); later prefills
    with the same ``store`` skip those layers: each replayed layer writes its
    saved cache entry and returns the saved output. Decode steps run every
    layer normally (the generated tokens differ). ``first == 0``: a no-op.
    """
    if first <= 0:
        yield
        return
    layers = get_layers(model, layout)
    with restored_layers(layers, first) as originals:
        handle = None
        if "kv" in store:
            for i in range(first):
                layers[i] = _ReplayWithCache(i, store)
        else:
            handle = originals[-1].register_forward_hook(lambda module, args, output: store.__setitem__("out", output))
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()


def prefill_bytes(store: dict) -> int:
    """Bytes a kept prefill holds: the lower layers' output and their KV-cache tensors."""
    return _nbytes([store.get("out"), *(list(vars(layer).values()) for layer in store.get("kv", []))])


def save_prefill(store: dict, cache: Any, first: int) -> None:
    """After a capturing prefill: keep the lower layers' cache entries for the replays."""
    if "kv" not in store and "out" in store:
        store["kv"] = [copy.copy(cache.layers[i]) for i in range(first)]


# ----------------------------------------------------------------------------- across a run
EXAMPLE_CACHE_RAM_FRACTION = 4  # default budget: 1/4 of the machine's RAM, at most EXAMPLE_CACHE_MAX_BYTES
EXAMPLE_CACHE_MAX_BYTES = 8 * 1024**3


class _StopForward(Exception):
    """Raised by a hook once layer first-1 has run: a fill needs nothing above it."""


def default_example_cache_bytes() -> int:
    """The per-run cache budget when none is given: a quarter of the RAM, capped at 8 GiB."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: a conservative 1 GiB
        return 1024**3
    return min(ram // EXAMPLE_CACHE_RAM_FRACTION, EXAMPLE_CACHE_MAX_BYTES)


class ExampleCache:
    """Per training row, the input of the lowest tuned layer, computed ONCE for the whole run.

    A ZO run revisits the same training examples every epoch (MeZO: 320
    epochs), and layers below the tuned one are frozen, so a row's output of
    layer ``first-1`` never changes. :meth:`fill` computes it for every
    training row up front, in a fixed order of fixed batches (so a resumed run
    rebuilds the same values bit for bit), running only layers ``< first``;
    :meth:`assemble` re-pads the rows of any later batch into the tensor layer
    ``first`` reads. Rows are keyed by their real token ids: a row's output
    depends on nothing else (causal attention, positions from the mask, padded
    keys masked out), so the result equals the batch's own forward up to fp32
    rounding. Over ``max_bytes`` the cache gives up and stays empty: every
    step then recomputes its lower layers, as without it.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self.rows: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0
        self.gave_up = False

    @staticmethod
    def row_key(ids: torch.Tensor) -> bytes:
        return ids.detach().cpu().contiguous().numpy().tobytes()

    def fill(self, model: nn.Module, layout: LayerLayout, first: int, batches, forward: Callable[[Any], Any]) -> bool:
        """Run layers < ``first`` on every batch (``forward(batch)`` runs the model on one) and keep each row.

        Returns False (and keeps nothing) when the rows do not fit ``max_bytes``
        or layer ``first-1`` returns something other than one hidden-state tensor.
        """
        if first <= 0:
            return False
        captured: dict = {}

        def hook(module, args, output):
            captured["out"] = output
            raise _StopForward

        handle = get_layers(model, layout)[first - 1].register_forward_hook(hook)
        try:
            for batch in batches:
                with contextlib.suppress(_StopForward):
                    forward(batch)
                out = captured.pop("out", None)
                if not isinstance(out, torch.Tensor) or not self.keep_rows(batch, out):
                    return self.give_up()
        finally:
            handle.remove()
        return True

    def keep_rows(self, batch, out: torch.Tensor) -> bool:
        for r in range(out.shape[0]):
            n = int(batch.attention_mask[r].sum())
            key = self.row_key(batch.input_ids[r, batch.input_ids.shape[1] - n:])
            if key not in self.rows:
                row = out[r, out.shape[1] - n:].clone()
                self.bytes += row.numel() * row.element_size()
                self.rows[key] = row
        return self.bytes <= self.max_bytes

    def give_up(self) -> bool:
        self.rows.clear()
        self.bytes, self.gave_up = 0, True
        return False

    def assemble(self, batch) -> torch.Tensor | None:
        """The left-padded ``[R, T, H]`` input of layer ``first`` for ``batch``, or None if a row is missing."""
        if not self.rows:
            return None
        width = batch.input_ids.shape[1]
        rows = []
        for r in range(batch.input_ids.shape[0]):
            n = int(batch.attention_mask[r].sum())
            rows.append((n, self.rows.get(self.row_key(batch.input_ids[r, width - n:]))))
        if any(row is None for _, row in rows):
            self.misses += 1
            return None
        self.hits += 1
        first = rows[0][1]
        out = first.new_zeros((len(rows), width, first.shape[-1]))  # padded positions: masked out, never read
        for r, (n, row) in enumerate(rows):
            out[r, width - n:] = row
        return out

    def stats(self) -> dict:
        """Rows, bytes and the hit rate of the steps so far (for the progress line and metrics.jsonl)."""
        looked = self.hits + self.misses
        return {"rows": len(self.rows), "bytes": self.bytes, "hit_rate": self.hits / looked if looked else None,
                "gave_up": self.gave_up}


@contextmanager
def replayed_lower_output(model: nn.Module, layout: LayerLayout, first: int, output: torch.Tensor) -> Iterator[None]:
    """Within the block, layers < ``first`` are skipped: layer ``first`` reads ``output`` (an assembled batch)."""
    layers = get_layers(model, layout)
    captured = {"out": output}
    with restored_layers(layers, first):
        for i in range(first):
            layers[i] = _Replay(captured)
        yield


# ----------------------------------------------------------------------------- one forward for + and −
class _PairedLayer(nn.Module):
    """Layer ``first`` in a paired ± forward of 2·R rows: rows [0, R) under ``plus()``, rows [R, 2R) under ``minus()``.

    ``plus``/``minus`` are the engine's perturbation contexts (``θ ± eps·z``); the
    layers above are frozen, so they run once on all 2·R rows instead of twice on R.
    """

    def __init__(self, layer: nn.Module, rows: int, plus: Callable, minus: Callable) -> None:
        super().__init__()
        self.layer, self.rows, self.plus, self.minus = layer, rows, plus, minus

    def forward(self, hidden, *args, **kwargs):
        halves = []
        for part, perturb in ((slice(0, self.rows), self.plus), (slice(self.rows, 2 * self.rows), self.minus)):
            with perturb():
                halves.append(self.layer(hidden[part], *(_rows(a, part, 2 * self.rows) for a in args),
                                         **{k: _rows(v, part, 2 * self.rows) for k, v in kwargs.items()}))
        return _joined(halves[0], halves[1], self.rows)


def _rows(value: Any, part: slice, total: int) -> Any:
    """``value``'s rows ``part`` when it is per-row (a tensor of ≥ 2 dims with ``total`` rows: masks, positions,
    rotary tables); anything else (cache_position, flags, None) as it is."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == total:
        return value[part]
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, part, total) for v in value)
    return value


def _joined(a: Any, b: Any, rows: int) -> Any:
    """The two halves' outputs as one (a tensor, or a layer's output tuple: per-row tensors joined)."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b]) if a.dim() >= 1 and a.shape[0] == rows else a
    if isinstance(a, tuple):
        return tuple(_joined(x, y, rows) for x, y in zip(a, b))
    return a


@contextmanager
def paired_forward(model: nn.Module, layout: LayerLayout, first: int, output: torch.Tensor, plus: Callable,
                   minus: Callable) -> Iterator[None]:
    """Within the block a forward of 2·R rows (the batch twice) skips layers < ``first`` (they return
    ``output`` twice), runs layer ``first`` under + for the first R rows and − for the rest, and the
    layers above once on all 2·R."""
    layers = get_layers(model, layout)
    tuned = layers[first]
    with replayed_lower_output(model, layout, first, torch.cat([output, output])):
        layers[first] = _PairedLayer(tuned, output.shape[0], plus, minus)
        try:
            yield
        finally:
            layers[first] = tuned
