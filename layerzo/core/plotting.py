"""Matplotlib helpers shared by every figure (imported lazily, Agg backend: no display needed).

Figures are written atomically: to a temp file in the target folder, then
``os.replace`` so a reader never sees a half-written PNG.
"""

from __future__ import annotations

import os
from pathlib import Path

from layerzo.core.atomic import atomic_file
from layerzo.errors import ConfigError


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend; a ConfigError with the install hint when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("--plot needs matplotlib", "pip install 'layerzo[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure_atomic(fig, out: str | os.PathLike, **kwargs) -> Path:
    """Save ``fig`` to ``out`` (format from the suffix, png without one) via a temp file and a rename."""
    out = Path(out)
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format=(out.suffix.lstrip(".") or "png"), **kwargs)
    return out


def joined(xs, style: str = "-") -> str:
    """The line style for points at integer positions ``xs`` (layers): ``style`` over a gap-free run, none
    otherwise -- a line across a partial sweep's gaps would draw scores for layers it never ran."""
    return style if all(b - a == 1 for a, b in zip(xs, xs[1:])) else "none"
