"""The sweep figure, per task: test accuracy (bars) + dev accuracy (line) per layer, and mean train loss.

The profiled pick's bar is red, the best layer's bar is outlined; horizontal
lines mark zero-shot test accuracy and the whole-model MeZO test accuracy; a
grey band spans two standard errors of the test set below the best layer.
Uses :mod:`layerzo.core.plotting` (Agg backend, atomic write).
"""

from __future__ import annotations

import os
from pathlib import Path

from layerzo.core.plotting import joined, pyplot, save_figure_atomic


def plot_sweep(doc: dict, out: str | os.PathLike) -> Path:
    """Write the PNG for a sweep summary (``layerzo.sweep.report.summarize``'s document)."""
    plt = pyplot()
    tasks = list(doc["tasks"].values())
    width = max(9.0, 0.32 * max((len(s["layers"]) for s in tasks), default=1) + 4.5)  # + room for the legend
    fig, axes = plt.subplots(2 * len(tasks), 1, figsize=(width, 5.6 * len(tasks)), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2] * len(tasks)})
    try:
        for k, s in enumerate(tasks):
            _panel(axes[2 * k, 0], s, doc)
            _loss_panel(axes[2 * k + 1, 0], s)
        axes[-1, 0].set_xlabel("decoder layer tuned alone")
        fig.tight_layout()
        return save_figure_atomic(fig, out, dpi=120)
    finally:
        plt.close(fig)


def _loss_panel(ax, s: dict) -> None:
    """Mean training loss over the run per layer: every run saw the same batches, so this is a paired comparison."""
    rows = [r for r in s["layers"] if r.get("mean_loss") is not None]
    xs = [r["layer"] for r in rows]
    ax.plot(xs, [r["mean_loss"] for r in rows], color="tab:purple", marker="o", markersize=3, linestyle=joined(xs),
            label="mean train loss over the run (same batches for every layer)")
    pick = next((r for r in rows if r["layer"] == s["profiled_pick"]), None)
    if pick is not None:
        ax.plot([pick["layer"]], [pick["mean_loss"]], marker="*", markersize=12, color="tab:red", linestyle="none",
                label=f"profiled pick: layer {pick['layer']}")
    full = s.get("full")
    if full and full.get("mean_loss") is not None:
        ax.axhline(full["mean_loss"], color="tab:green", linestyle=":", linewidth=2,
                   label=f"full-model MeZO {full['mean_loss']:.3f}")
    if rows:
        ax.set_xticks([r["layer"] for r in rows])
        ax.tick_params(axis="x", labelsize=7)
    ax.set_ylabel("mean train loss")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, borderaxespad=0)


def _panel(ax, s: dict, doc: dict) -> None:
    from matplotlib.patches import Patch

    m = s.get("metric_label", "acc")
    rows = [r for r in s["layers"] if r.get("test_acc") is not None]
    xs = [r["layer"] for r in rows]
    test = [100 * r["test_acc"] for r in rows]
    colors = ["tab:red" if r["layer"] == s["profiled_pick"] else "tab:blue" for r in rows]
    bars = ax.bar(xs, test, color=colors, alpha=0.75)
    for bar, r in zip(bars, rows):
        if r["layer"] == s["best_layer"]:
            bar.set_edgecolor("black")
            bar.set_linewidth(2)
    dev = [(r["layer"], 100 * r["dev_acc"]) for r in s["layers"] if r.get("dev_acc") is not None]
    if dev:
        ax.plot([d[0] for d in dev], [d[1] for d in dev], color="tab:orange", marker="o", markersize=3,
                linestyle=joined([d[0] for d in dev]), label=f"dev {m}", zorder=3)
    zs = s["zero_shot"].get("test_acc")
    if zs is not None:
        ax.axhline(100 * zs, color="grey", linestyle="--", label=f"zero-shot test {100 * zs:.1f}%", zorder=4)
    full = s.get("full")
    if full and full.get("test_acc") is not None:
        ax.axhline(100 * full["test_acc"], color="tab:green", linestyle=":", linewidth=2, zorder=4,
                   label=f"full-model MeZO test {100 * full['test_acc']:.1f}%")
    se = s.get("test_standard_error")
    best_row = next((r for r in rows if r["layer"] == s["best_layer"]), None)
    if se and best_row is not None:  # layers reaching into this band are within test-set noise of the best
        top = 100 * best_row["test_acc"]
        ax.axhspan(top - 200 * se, top, color="tab:gray", alpha=0.15, zorder=0,
                   label=f"best - 2 standard errors ({200 * se:.1f} pts)")
    handles = [Patch(color="tab:blue", alpha=0.75, label=f"test {m} (best-dev checkpoint)"),
               *ax.get_legend_handles_labels()[0]]
    if s["profiled_pick"] is not None:
        handles.append(Patch(color="tab:red", alpha=0.75, label=f"profiled pick: layer {s['profiled_pick']}"))
    if s["best_layer"] is not None:
        handles.append(Patch(facecolor="none", edgecolor="black", linewidth=2, label=f"best: layer {s['best_layer']}"))
    values = test + [v for _, v in dev] + ([100 * zs] if zs is not None else [])
    if full and full.get("test_acc") is not None:
        values.append(100 * full["test_acc"])
    if values:
        lo, hi = min(values), max(values)
        pad = max(2.0, 0.15 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
    if xs:
        ax.set_xticks(xs)
        ax.tick_params(axis="x", labelsize=7)
    ax.set_ylabel("accuracy %" if m == "acc" else f"{m} %")
    c = doc["config"]
    model = Path(str(doc["model"])).name if "/" in str(doc["model"]) and Path(str(doc["model"])).exists() else doc["model"]
    ax.set_title(f"{model} - {s['task']}: each layer ZO-tuned alone, {c['steps']} steps, batch {c['batch_size']}",
                 fontsize=9)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, borderaxespad=0)
