"""Run the frozen decoder layers below the tuned one once per batch, not once per forward.

A ZO step evaluates the same batch 2·q times with different perturbations of
layers ≥ ``first``. Layers ``0 .. first-1`` see identical inputs and weights
every time, so their output (the input of layer ``first``) is captured on the
first forward of the batch and replayed afterwards: the lower layers are
temporarily replaced by modules that return the captured tensor.

The result is bit-identical to the plain forward (layer ``first`` receives
the very same tensor), and it requires that nothing below ``first`` is tuned
(no tuned embeddings), which the caller guarantees.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .layers import LayerLayout, get_layers


class _Replay(nn.Module):
    """Stands in for a lower decoder layer: returns the captured output of layer first-1."""

    def __init__(self, captured: dict) -> None:
        super().__init__()
        self._captured = captured

    def forward(self, *args, **kwargs):
        return self._captured["out"]


@contextmanager
def cached_lower_layers(
    model: nn.Module, layout: LayerLayout, first: int, store: dict | None = None
) -> Iterator[None]:
    """Within the block, all forwards must use the SAME batch; layers < ``first`` run only once.

    ``store`` keeps the captured output beyond the block: pass the same dict
    again for the same batch (e.g. a fixed dev batch evaluated every N steps)
    and the lower layers do not run at all. ``first == 0`` (nothing below the
    tuned layer) makes this a no-op.
    """
    if first <= 0:
        yield
        return
    layers = get_layers(model, layout)
    originals = [layers[i] for i in range(first)]
    captured: dict = {} if store is None else store

    def replay() -> None:
        for i in range(first):
            layers[i] = _Replay(captured)

    def capture(module, args, output):
        captured["out"] = output
        # Later forwards skip the lower layers. A model iterates a snapshot or an
        # iterator over already-visited slots, so the current forward is unaffected.
        replay()

    handle = None
    if "out" in captured:
        replay()
    else:
        handle = originals[-1].register_forward_hook(capture)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        for i, module in enumerate(originals):
            layers[i] = module
