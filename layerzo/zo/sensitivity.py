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

Cost. One plain forward per batch gives the base loss and hidden states of
every layer at once; the layers are then measured in increasing order on the
same batches with a shared prefix cache (:mod:`layerzo.model.prefix_cache`),
so the layers below l cost one layer per batch instead of l, and each layer
costs its 2K perturbed forwards from l up. In all, per example, about
``1 + 2K·Σ_l (L−l)/L ≈ 1 + K·(L+1)`` forwards against the activation profile's
one: 249 at K = 8 on the demo's 30 layers. The forwards are compute-bound on a
CPU (the demo's per-row time is flat from 8 to 128 rows a batch, measured), so
batching directions together cannot buy it back; ``one_sided`` halves it for
screens (``--layers auto`` uses K = 2 one-sided on a few examples).
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
    # (L(θ+εz) − L(θ)) / ε and ‖h(θ+εz) − h(θ)‖ against the shared base pass: K forwards per layer
    # instead of 2K, at an O(ε) bias (the even terms central differences cancel); for cheap screens.
    one_sided: bool = False

    def __post_init__(self) -> None:
        if type(self.directions) is not int or self.directions < 1:
            raise ConfigError(f"directions must be an integer ≥ 1, got {self.directions!r}")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            raise ConfigError(f"eps must be a positive number, got {self.eps!r}")
        if not isinstance(self.one_sided, bool):
            raise ConfigError(f"one_sided must be true or false, got {self.one_sided!r}")


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
    forwards: int  # forward passes run: one plain per batch, the perturbed ones from their layer up (prefix cache)
    plain_seconds: float = 0.0  # the plain forwards alone (one per batch): the unit the cost is counted in
    forward_equivalents: float = 0.0  # the work in plain forwards: Σ over passes of (layers run) / num_layers

    @property
    def cost_in_forwards(self) -> float:
        """Measured: the whole profile's seconds over one plain forward of the same batches."""
        return self.seconds / self.plain_seconds if self.plain_seconds > 0 else math.nan

    def ranking(self) -> list[int]:
        """Layers by the pick's criterion (stable layers first, then by final_change), best first."""
        by_layer = {s.layer: s for s in self.layers}
        return sorted(by_layer, key=lambda i: (not is_stable(by_layer[i]), -by_layer[i].final_change, i))

    def to_dict(self, timings: bool = True) -> dict[str, Any]:
        """JSON-ready; ``timings=False`` leaves out the wall times (a patch manifest must not vary by run)."""
        d = asdict(self)
        d["layers"] = [{k: _finite_or_none(v) for k, v in asdict(s).items()} for s in self.layers]
        d["ranking"] = self.ranking()
        if timings:
            d["cost_in_forwards"] = _finite_or_none(self.cost_in_forwards)
        else:
            for key in ("seconds", "plain_seconds"):
                del d[key]
        return d


def _finite_or_none(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def layer_sensitivity(model, layout: LayerLayout, batches: Sequence[Any], loss_fn: LossFn,
                      config: SensitivityConfig = SensitivityConfig(), *, layers: Sequence[int] | None = None,
                      model_name: str = "") -> SensitivityReport:
    """Measure every layer in ``layers`` (default all) on ``batches``; θ is bit-identical afterwards.

    ``batches`` are whatever ``loss_fn`` takes; each must have ``input_ids`` and
    ``attention_mask`` (the prefix cache keys on them, propagation masks padding).
    The base model's loss and hidden states are the same for every layer, so one
    plain forward per batch gives them all; each layer then costs only its
    perturbed forwards (2K per batch, K one-sided), from the layer up.
    """
    if not batches:
        raise ConfigError("the sensitivity profile needs at least one batch")
    todo = list(range(layout.num_layers)) if layers is None else sorted(set(layers))
    shared, start = SharedLowerOutputs(), time.perf_counter()
    with torch.no_grad():
        bases = [_base_pass(model, layout, batch, loss_fn, todo, keep_own=config.one_sided) for batch in batches]
        plain = time.perf_counter() - start
        results = [_measure_layer(model, layout, layer, batches, bases, loss_fn, config, shared) for layer in todo]
    pick, reason = pick_by_sensitivity(results)
    passes = config.directions * len(_signs(config))
    forwards = len(batches) * (1 + len(todo) * passes)
    n = layout.num_layers
    work = 1 + passes * sum((n - layer) / n for layer in todo)  # per batch, in plain forwards
    return SensitivityReport(model_name, config, len(batches), tuple(results), pick, reason,
                             round(time.perf_counter() - start, 3), forwards, round(plain, 3), round(work, 2))


@dataclass(frozen=True)
class _Base:
    """One batch under the base weights: its loss, final hidden state and each measured layer's output norm."""

    loss: float
    final: torch.Tensor
    final_norm: float
    own_norm: dict[int, float]
    own: dict[int, torch.Tensor]  # the outputs themselves: only for one-sided differences (h(θ+εz) − h(θ))


def _base_pass(model, layout, batch, loss_fn: LossFn, todo: Sequence[int], *, keep_own: bool) -> _Base:
    layers_list = get_layers(model, layout)
    with _outputs({**{i: layers_list[i] for i in todo}, "final": layers_list[-1]}) as seen:
        loss = float(loss_fn(batch))
    mask = batch.attention_mask.bool()
    return _Base(loss, seen["final"], _masked_norm(seen["final"], mask),
                 {i: _masked_norm(seen[i], mask) for i in todo}, {i: seen[i] for i in todo} if keep_own else {})


def _signs(config: SensitivityConfig) -> tuple[int, ...]:
    return (1,) if config.one_sided else (1, -1)


def _measure_layer(model, layout, layer: int, batches, bases: Sequence[_Base], loss_fn: LossFn,
                   config: SensitivityConfig, shared: SharedLowerOutputs) -> LayerSensitivity:
    params = TunedParams.from_model(model, layer_parameter_names(model, layout, layer))
    seeds = direction_seeds(config.seed * 1_000_003 + layer, config.directions)
    signs = _signs(config)
    width = len(signs) * config.eps  # the difference's step: 2ε central, ε one-sided
    grads = [[0.0] * len(batches) for _ in seeds]
    own, final, loss_rel = [], [], []
    layers_list = get_layers(model, layout)
    for b, (batch, base) in enumerate(zip(batches, bases)):
        mask = batch.attention_mask.bool()
        with cached_lower_layers(model, layout, layer, batch=batch, shared=shared), \
                _outputs({"own": layers_list[layer], "final": layers_list[-1]}) as seen:
            for k, seed in enumerate(seeds):
                z_cache: dict = {}  # one draw of z per direction, for both signs
                out = {}
                for sign in signs:
                    with perturbed(params, seed, sign * config.eps, z_cache):
                        out[sign] = (float(loss_fn(batch)), seen["own"], seen["final"])
                low = out[-1] if -1 in out else (base.loss, base.own[layer], base.final)
                grads[k][b] = (out[1][0] - low[0]) / width
                scale = len(signs)  # ‖h+ − h−‖ spans 2ε
                own.append(_relative_change(out[1][1], low[1], base.own_norm[layer] * scale, mask))
                final.append(_relative_change(out[1][2], low[2], base.final_norm * scale, mask))
                loss_rel.append(abs(out[1][0] - low[0]) / (scale * abs(base.loss)) if base.loss else math.inf)
    flat = [g for row in grads for g in row]
    rms = math.sqrt(sum(g * g for g in flat) / len(flat))
    numel = sum(t.numel() for t in params.tensors)
    own_c, final_c = statistics.median(own), statistics.median(final)
    return LayerSensitivity(
        layer=layer, numel=numel, grad_rms=rms, grad_per_weight=rms / math.sqrt(numel),
        stability=statistics.median(_consistency(row) for row in grads), own_change=own_c, final_change=final_c,
        growth=final_c / own_c if own_c > 0 else math.inf, loss_change=statistics.median(loss_rel),
    )


def _consistency(values: Sequence[float]) -> float:
    """|mean| / std (sample std) of one direction's g over batches; inf when all equal, nan for one batch."""
    if len(values) < 2:
        return math.nan
    sd = statistics.stdev(values)
    return abs(statistics.fmean(values)) / sd if sd > 0 else math.inf


def _masked_norm(h: torch.Tensor, mask: torch.Tensor) -> float:
    return float(h.float()[mask.to(h.device)].norm())


def _relative_change(a: torch.Tensor, b: torch.Tensor, norm: float, mask: torch.Tensor) -> float:
    """‖a − b‖ / norm over the real (unpadded) positions."""
    diff = (a.float() - b.float())[mask.to(a.device)]
    return float(diff.norm()) / norm if norm > 0 else math.inf


class _outputs:
    """Context manager: ``seen[key]`` holds the last output of each module of ``modules`` (key -> module)."""

    def __init__(self, modules: dict) -> None:
        self.modules, self.seen, self.handles = modules, {}, []

    def __enter__(self) -> dict:
        for key, module in self.modules.items():
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
