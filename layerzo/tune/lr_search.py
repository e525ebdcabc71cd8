"""``--lr auto``: a short, budgeted learning-rate search on the run's own training batches.

The grid. ZO-SGD's update is ``lr · g · z`` with ``g ≈ z·∇L``: its variance
grows with the number of tuned weights d, so the largest stable rate falls
like 1/d. Measured anchors agree on ``lr · d ≈ 1000``: the demo's layer 11
(d = 3.54M) at 3e-4 (1062), MeZO's OPT-13B at 1e-7 (1300). :func:`lr_grid`
centres the grid on ``LR_SCALE / d`` snapped to the 1-3 series
(…, 1e-4, 3e-4, 1e-3, …) and takes one half-decade below and two above it
(a short run favours the larger rates; a rate that diverges drops out):
one layer of the demo gets 1e-4 … 3e-3, the whole model 3e-6 … 1e-4,
LoRA on q/v of every layer 1e-3 … 3e-2.

The search is the layer race of :mod:`layerzo.tune.race` with learning rates
as the candidates: every rate takes the same first steps on the same batches
from the same weights, the teacher-forced dev loss on a fixed dev subset
keeps the better half for twice as many steps, until one rate is left. A rate
whose run diverges (a non-finite loss, or the engine's divergence stop) scores
+inf. The weights are back at their starting values afterwards, so the run
proper starts from the base.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

from layerzo.data.objectives import Objective
from layerzo.errors import ConfigError, DivergenceError
from layerzo.model.prefix_cache import SharedLowerOutputs
from layerzo.tune.race import DevScore, RaceConfig, RaceRound, Runner, successive_halving
from layerzo.zo.engine import TunedParams, ZOConfig

LR_SCALE = 1000.0  # lr · (number of tuned weights) at the grid's centre (module docstring)
GRID_HALF_DECADES = (-1, 0, 1, 2)  # the grid around the centre, in half-decades (×√10 ≈ 3 each)
SEARCH_FRACTION = 0.1  # the search's ZO steps, as a share of the run's steps


def snap_half_decade(value: float) -> int:
    """The index k of the nearest 1-3 series value to ``value`` (k even: 10^(k/2); odd: 3·10^((k-1)/2))."""
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"a learning rate must be a positive number, got {value!r}")
    return round(2 * math.log10(value))


def half_decade_value(k: int) -> float:
    """The 1-3 series value of index ``k`` (…, -8: 1e-4, -7: 3e-4, -6: 1e-3, …), rounded to one digit."""
    return float(f"{(1.0 if k % 2 == 0 else 3.0) * 10.0 ** (k // 2):.0e}")


def lr_grid(num_weights: int, half_decades: Sequence[int] = GRID_HALF_DECADES) -> tuple[float, ...]:
    """The search grid for ``num_weights`` tuned weights: ``LR_SCALE / d`` snapped, then the offsets (pure)."""
    if type(num_weights) is not int or num_weights < 1:
        raise ConfigError(f"the learning-rate grid needs a positive number of tuned weights, got {num_weights!r}")
    centre = snap_half_decade(LR_SCALE / num_weights)
    return tuple(half_decade_value(centre + k) for k in half_decades)


@dataclass(frozen=True)
class LRSearchResult:
    """The pick and the whole grid: recorded in the manifest (``lr_search``) and printed."""

    lr: float
    grid: tuple[float, ...]
    zero_shot_dev_loss: float
    rounds: tuple[RaceRound, ...]  # dev_loss and kept by rate
    steps: int
    seconds: float

    @property
    def reason(self) -> str:
        last = self.rounds[-1].dev_loss
        scores = ", ".join(f"{lr:g}: {last[lr]:.4f}" for lr in sorted(last))
        out = sorted(lr for r in self.rounds for lr, loss in r.dev_loss.items() if not math.isfinite(loss))
        diverged = f"; diverged: {', '.join(f'{lr:g}' for lr in out)}" if out else ""
        return (f"lr {self.lr:g} won a search over {', '.join(f'{g:g}' for g in self.grid)} on the same training "
                f"batches ({self.steps} ZO steps): teacher-forced dev loss {self.zero_shot_dev_loss:.4f} zero-shot; "
                f"last round {scores}{diverged}")

    def to_dict(self) -> dict:
        """The manifest's record (no seconds: wall time would make patches of the same run differ)."""
        return {"lr": self.lr, "grid": list(self.grid), "zero_shot_dev_loss": self.zero_shot_dev_loss,
                "rounds": [{"steps": r.steps, "dev_loss": {f"{k:g}": _json_loss(v) for k, v in r.dev_loss.items()},
                            "kept": list(r.kept)} for r in self.rounds],
                "steps": self.steps, "reason": self.reason}


def _json_loss(value: float) -> float | None:
    return value if math.isfinite(value) else None  # a diverged rate: strict JSON has no inf


def search_lr(loaded, objective: Objective, train: Sequence, dev: Sequence, params: TunedParams, first_cached: int,
              zo: ZOConfig, grid: Sequence[float], config: RaceConfig) -> LRSearchResult:
    """Race the rates of ``grid`` on ``params`` (module docstring); ``params`` hold their values afterwards."""
    start = time.perf_counter()
    dev_score = DevScore(loaded, objective, dev, train, config.dev_examples)
    shared = SharedLowerOutputs()  # every rate sees the same batches: their lower layers run once
    runners = {lr: Runner(lambda: nullcontext(params), first_cached, loaded, objective, train,
                          dataclasses.replace(zo, lr=lr), config, shared) for lr in grid}
    rounds, steps = successive_halving(runners, lambda _: dev_score(first_cached), config.first_steps)
    if all(r.diverged for r in runners.values()):
        raise DivergenceError(f"every learning rate of the search diverged ({', '.join(f'{g:g}' for g in grid)})",
                              "pass smaller rates with --lr-search 1e-6,1e-5,... or a fixed --lr")
    return LRSearchResult(rounds[-1].kept[0], tuple(grid), dev_score.zero_shot, tuple(rounds), steps,
                          round(time.perf_counter() - start, 3))
