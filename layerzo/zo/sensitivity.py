"""Per-layer ZO sensitivity: the paper's mechanism measured with forward passes only.

*Dominant-Layer ZO* explains why one layer dominates ZO fine-tuning: it is
highly *perturbation-sensitive* and sits early in the residual stream, so the
effect of perturbing it propagates through the layers above and gives strong,
stable ZO signals. For each layer l, with K random directions z (drawn exactly
as the engine draws them) on B training batches, perturbing layer l ALONE:

* sensitivity — the projected gradient g = (L(θ+εz) − L(θ−εz)) / 2ε. For
  z ~ N(0, I_d), E[g²] = ‖∇_l L‖² (+O(ε²)), so ``grad_rms`` = RMS of g over
  directions and batches estimates the layer's gradient norm, and
  ``grad_per_weight`` = grad_rms / √d its size per weight;
* stability — for the same z on different batches, |mean_b g| / std_b g
  (median over the K directions): above 1 the sign of the signal survives a
  change of batch;
* propagation — the relative change of the layer's own output and of the
  final hidden state (the last decoder layer's output), ‖h(θ+εz) − h(θ−εz)‖ / 2‖h(θ)‖
  over real tokens; ``growth`` = final / own (above 1: the effect grows on its
  way up), and ``loss_change`` = |L+ − L−| / 2|L|.

The pick (:func:`pick_by_sensitivity`, the rule ``tune --select sensitivity``
uses) follows the paper's mechanism — a perturbation that *propagates*: among
the layers whose signal is stable (stability ≥ 1), the one whose perturbation
changes the final hidden state most (``final_change``); if no layer is stable,
the largest ``final_change`` overall. Chosen after measuring the demo model
(benchmarks/results/sensitivity_sst2_smollm2.md): on SST-2 it picks layer 11,
the layer sweep's best, while the largest gradient per weight picks layer 29,
the sweep's second; one task, so the multi-task sweep must confirm it.

Layers are measured in increasing order on the same batches with a shared
prefix cache (:mod:`layerzo.model.prefix_cache`), so the layers below l cost
one layer per batch instead of l.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from layerzo.core.plotting import pyplot, save_figure_atomic
from layerzo.errors import ConfigError
from layerzo.model.layers import LayerLayout, get_layers, layer_parameter_names
from layerzo.model.prefix_cache import SharedLowerOutputs, cached_lower_layers
from layerzo.zo.engine import TunedParams, direction_seeds, perturbed

LossFn = Callable[[Any], float]  # batch -> loss (forward passes only)


@dataclass(frozen=True)
class SensitivityConfig:
    directions: int = 8  # K
    eps: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if type(self.directions) is not int or self.directions < 1:
            raise ConfigError(f"directions must be an integer ≥ 1, got {self.directions!r}")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            raise ConfigError(f"eps must be a positive number, got {self.eps!r}")


@dataclass(frozen=True)
class LayerSensitivity:
    layer: int
    numel: int
    grad_rms: float  # ≈ ‖∇_l L‖
    grad_per_weight: float  # grad_rms / √numel
    stability: float  # median over directions of |mean_b g| / std_b g (inf: identical on every batch)
    own_change: float  # median relative change of the layer's own output
    final_change: float  # median relative change of the final hidden state
    growth: float  # final_change / own_change
    loss_change: float  # median |L+ − L−| / 2|L|


@dataclass(frozen=True)
class SensitivityReport:
    model: str
    config: SensitivityConfig
    num_batches: int
    layers: tuple[LayerSensitivity, ...]
    pick: int
    reason: str
    seconds: float
    forwards: int  # forward passes run (each from the perturbed layer up, thanks to the prefix cache)

    def ranking(self) -> list[int]:
        """Layers by the pick's criterion (stable layers first, then by final_change), best first."""
        by_layer = {s.layer: s for s in self.layers}
        return sorted(by_layer, key=lambda i: (not is_stable(by_layer[i]), -by_layer[i].final_change, i))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [{k: _finite_or_none(v) for k, v in asdict(s).items()} for s in self.layers]
        d["ranking"] = self.ranking()
        return d


def _finite_or_none(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def layer_sensitivity(model, layout: LayerLayout, batches: Sequence[Any], loss_fn: LossFn,
                      config: SensitivityConfig = SensitivityConfig(), *, layers: Sequence[int] | None = None,
                      model_name: str = "") -> SensitivityReport:
    """Measure every layer in ``layers`` (default all) on ``batches``; θ is bit-identical afterwards.

    ``batches`` are whatever ``loss_fn`` takes; each must have ``input_ids`` and
    ``attention_mask`` (the prefix cache keys on them, propagation masks padding).
    """
    if not batches:
        raise ConfigError("the sensitivity profile needs at least one batch")
    todo = list(range(layout.num_layers)) if layers is None else sorted(set(layers))
    shared, start, forwards = SharedLowerOutputs(), time.perf_counter(), 0
    results = []
    with torch.no_grad():
        for layer in todo:
            stats, n = _measure_layer(model, layout, layer, batches, loss_fn, config, shared)
            results.append(stats)
            forwards += n
    pick, reason = pick_by_sensitivity(results)
    return SensitivityReport(model_name, config, len(batches), tuple(results), pick, reason,
                             round(time.perf_counter() - start, 3), forwards)


def _measure_layer(model, layout, layer: int, batches, loss_fn: LossFn, config: SensitivityConfig,
                   shared: SharedLowerOutputs) -> tuple[LayerSensitivity, int]:
    params = TunedParams.from_model(model, layer_parameter_names(model, layout, layer))
    seeds = direction_seeds(config.seed * 1_000_003 + layer, config.directions)
    grads = [[0.0] * len(batches) for _ in seeds]
    own, final, loss_rel = [], [], []
    layers_list = get_layers(model, layout)
    for b, batch in enumerate(batches):
        with cached_lower_layers(model, layout, layer, batch=batch, shared=shared), \
                _outputs(layers_list[layer], layers_list[-1]) as seen:
            base_loss = float(loss_fn(batch))
            h_own, h_final = seen["own"], seen["final"]
            for k, seed in enumerate(seeds):
                out = {}
                for sign in (1, -1):
                    with perturbed(params, seed, sign * config.eps):
                        out[sign] = (float(loss_fn(batch)), seen["own"], seen["final"])
                grads[k][b] = (out[1][0] - out[-1][0]) / (2 * config.eps)
                mask = batch.attention_mask.bool()
                own.append(_relative_change(out[1][1], out[-1][1], h_own, mask))
                final.append(_relative_change(out[1][2], out[-1][2], h_final, mask))
                loss_rel.append(abs(out[1][0] - out[-1][0]) / (2 * abs(base_loss)) if base_loss else math.inf)
    flat = [g for row in grads for g in row]
    rms = math.sqrt(sum(g * g for g in flat) / len(flat))
    numel = sum(t.numel() for t in params.tensors)
    own_c, final_c = statistics.median(own), statistics.median(final)
    return LayerSensitivity(
        layer=layer, numel=numel, grad_rms=rms, grad_per_weight=rms / math.sqrt(numel),
        stability=statistics.median(_consistency(row) for row in grads), own_change=own_c, final_change=final_c,
        growth=final_c / own_c if own_c > 0 else math.inf, loss_change=statistics.median(loss_rel),
    ), len(batches) * (1 + 2 * len(seeds))


def _consistency(values: Sequence[float]) -> float:
    """|mean| / std (sample std) of one direction's g over batches; inf when all equal, nan for one batch."""
    if len(values) < 2:
        return math.nan
    sd = statistics.stdev(values)
    return abs(statistics.fmean(values)) / sd if sd > 0 else math.inf


def _relative_change(plus: torch.Tensor, minus: torch.Tensor, base: torch.Tensor, mask: torch.Tensor) -> float:
    """‖h+ − h−‖ / 2‖h‖ over the real (unpadded) positions."""
    keep = mask.to(plus.device)
    diff = (plus.float() - minus.float())[keep]
    norm = base.float()[keep].norm()
    return float(diff.norm() / (2 * norm)) if norm > 0 else math.inf


class _outputs:
    """Context manager: ``seen["own"]`` / ``seen["final"]`` hold the last outputs of two decoder layers."""

    def __init__(self, own, final) -> None:
        self.modules, self.seen, self.handles = (own, final), {}, []

    def __enter__(self) -> dict:
        for key, module in zip(("own", "final"), self.modules):
            def hook(_m, _a, output, key=key):
                self.seen[key] = (output[0] if isinstance(output, tuple) else output).detach()
            self.handles.append(module.register_forward_hook(hook))
        return self.seen

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def is_stable(s: LayerSensitivity) -> bool:
    """The sign of the layer's ZO signal survives a change of batch: |mean g| ≥ std g."""
    return s.stability >= 1


def pick_by_sensitivity(layers: Sequence[LayerSensitivity]) -> tuple[int, str]:
    """The rule of the module docstring: the most far-reaching perturbation among the stable layers."""
    if not layers:
        raise ConfigError("no layer was measured")
    stable = [s for s in layers if is_stable(s)]
    best = max(stable or list(layers), key=lambda s: (s.final_change, -s.layer))
    why = (f"its perturbation changes the final hidden state most ({best.final_change:.3g} relative, growth "
           f"{best.growth:.2f}×) among the {len(stable)} layer(s) with a stable signal (|mean g| ≥ std g "
           "across batches)" if stable else
           f"no layer's signal was stable across batches; largest change of the final hidden state "
           f"({best.final_change:.3g})")
    return best.layer, why


def plot_sensitivity(report: SensitivityReport, out: str | os.PathLike) -> Path:
    """Four panels per layer: final-state change (the pick's criterion), gradient per weight, stability, growth."""
    plt = pyplot()
    xs = [s.layer for s in report.layers]

    def log10(v: float) -> float:
        return math.log10(v) if 0 < v < math.inf else math.nan

    panels = (("final-state change (log10)", [log10(s.final_change) for s in report.layers]),
              ("grad per weight (log10)", [log10(s.grad_per_weight) for s in report.layers]),
              ("stability |mean g| / std g", [min(s.stability, 1e3) for s in report.layers]),
              ("growth final / own change", [min(s.growth, 1e3) for s in report.layers]))
    fig, axes = plt.subplots(4, 1, figsize=(max(6.0, 0.3 * len(xs)), 9), sharex=True)
    try:
        for ax, (label, values) in zip(axes, panels):
            ax.plot(xs, values, marker="o", markersize=3)
            ax.axvline(report.pick, color="tab:red", alpha=0.3)
            ax.set_ylabel(label, fontsize=8)
        axes[2].axhline(1.0, linestyle="--", color="grey")
        axes[-1].set_xlabel("decoder layer")
        axes[0].set_title(f"{report.model}: ZO sensitivity, K={report.config.directions}, {report.num_batches} "
                          f"batch(es); pick {report.pick}", fontsize=9)
        fig.tight_layout()
        return save_figure_atomic(fig, out, dpi=120)
    finally:
        plt.close(fig)
