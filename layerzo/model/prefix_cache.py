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

import hashlib
from contextlib import contextmanager
from typing import Any, Iterator

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
    originals = [layers[i] for i in range(first)]
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
        for i, module in enumerate(originals):
            layers[i] = module
