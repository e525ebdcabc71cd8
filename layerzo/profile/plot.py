"""The profile figure: log10 max|h| and log10 max/median per layer, thresholds dashed, the pick starred.

Drawn with :mod:`layerzo.core.plotting` (Agg backend, atomic write).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from layerzo.core.plotting import pyplot, save_figure_atomic

if TYPE_CHECKING:  # pragma: no cover
    from layerzo.profile.run import ProfileReport


def plot_profile(report: "ProfileReport", out: str | os.PathLike) -> Path:
    """Two panels per layer: log10 max|h| and log10 max/median, thresholds dashed, the pick starred."""
    plt = pyplot()
    layers = list(range(len(report.layers)))
    log_max = [math.log10(s.max_abs) if s.max_abs > 0 else float("nan") for s in report.layers]
    log_ratio = [math.log10(s.ratio) if 0 < s.ratio < math.inf else float("nan") for s in report.layers]
    pick = report.pick.layer
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 0.3 * len(layers)), 6), sharex=True)
    try:
        for ax, values, threshold, label in (
            (ax1, log_max, report.config.max_threshold, "log10 max|h|"),
            (ax2, log_ratio, report.config.ratio_threshold, "log10 max/median"),
        ):
            ax.plot(layers, values, marker="o", markersize=3)
            ax.axhline(math.log10(threshold), linestyle="--", color="grey", label=f"threshold {threshold:g}")
            ax.axvline(pick, color="tab:red", alpha=0.3)
            ax.plot([pick], [values[pick]], marker="*", markersize=14, color="tab:red",
                    label=f"pick: layer {pick} ({report.pick.confidence})")
            ax.set_ylabel(label)
            ax.legend(loc="best", fontsize=8)
        ax2.set_xlabel("decoder layer")
        ax1.set_title(f"{report.model}: residual-stream activations ({report.num_tokens} tokens)", fontsize=9)
        fig.tight_layout()
        return save_figure_atomic(fig, out, dpi=120)
    finally:
        plt.close(fig)
