"""The dominant-layer rule as pure functions over per-layer activation statistics.

* a layer is an OUTLIER layer when ``max |h| > max_threshold`` and
  ``max |h| / median |h| >= ratio_threshold`` (Sun et al. 2024, "Massive Activations");
* the DOMINANT layer is the first outlier layer whose outlier PERSISTS in at
  least ``persist_min`` of the next ``persist_window`` layers. A following
  layer counts when it is an outlier layer and, with ``same_channel`` (the
  default), the channel of the first layer's max is one of that layer's
  massive channels (top channels that pass both thresholds). Massive
  activations ride the residual stream in fixed channels, so the same channel
  staying massive is what "persists" means; checking membership among the
  massive channels rather than the argmax keeps the test robust when two
  massive channels trade places as the largest;
* when no layer passes, the pick falls back to the largest jump in max |h|
  between consecutive layers within the first half of the layers, marked
  low-confidence.

:func:`layer_stats` reduces one layer output to a :class:`LayerStats` (no
hidden state is kept); :mod:`layerzo.profile.run` runs the model and the hooks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch

from layerzo.errors import ConfigError, LayerzoError

TOP_CHANNELS = 8  # channels kept per layer for the same-channel persistence test

RULE_TEXT = (
    "outlier layer: max|h| > max_threshold and max|h|/median|h| >= ratio_threshold; dominant layer: the first "
    "outlier layer whose max channel is still massive in >= persist_min of the next persist_window layers; "
    "fallback (low confidence): the largest jump in max|h| between consecutive layers in the first half"
)

@dataclass(frozen=True)
class ProfileConfig:
    """Options of ``layerzo profile``; CLI flags map one to one onto these fields."""

    max_threshold: float = 100.0
    ratio_threshold: float = 1000.0
    persist_window: int = 3
    persist_min: int = 2
    same_channel: bool = True
    num_sequences: int = 8
    max_length: int = 512
    batch_size: int = 8

    def __post_init__(self) -> None:
        for name in ("max_threshold", "ratio_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("persist_window", "persist_min", "num_sequences", "max_length", "batch_size"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.persist_min > self.persist_window:
            raise ConfigError(
                f"persist_min={self.persist_min} exceeds persist_window={self.persist_window}; "
                "it must be between 1 and persist_window"
            )
        if not isinstance(self.same_channel, bool):
            raise ConfigError(f"same_channel must be true or false, got {self.same_channel!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "ProfileConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown profile option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)


@dataclass(frozen=True)
class LayerStats:
    """Activation statistics of one decoder layer's output over real tokens.

    ``sequence``/``position``/``channel`` locate the max |h|: ``position`` counts
    real tokens only (0 = the first real token), whatever the padding side.
    ``top_channels`` holds up to TOP_CHANNELS ``(channel, max |h| in it)`` pairs,
    largest first. ``num_values`` = real tokens x hidden size.
    """

    max_abs: float
    median_abs: float
    sequence: int
    position: int
    channel: int
    num_tokens: int
    num_values: int
    top_channels: tuple[tuple[int, float], ...] = ()
    token_id: int | None = None
    token: str | None = None

    @property
    def ratio(self) -> float:
        """max |h| / median |h| (inf for a zero median with a non-zero max)."""
        if self.median_abs > 0:
            return self.max_abs / self.median_abs
        return math.inf if self.max_abs > 0 else 0.0


@dataclass(frozen=True)
class Pick:
    layer: int
    confidence: str  # "high" (the rule passed) | "low" (fallback)
    reason: str  # one sentence


def layer_stats(hidden: torch.Tensor, mask: torch.Tensor, *, sequence_offset: int = 0) -> LayerStats:
    """Statistics of ``hidden`` [B, T, D] over the positions where ``mask`` [B, T] is true.

    Pad positions (mask 0) never count, however large their values. The max
    location is reported in batch coordinates plus ``sequence_offset``.
    """
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(f"expected hidden [B, T, D] and mask [B, T], got {tuple(hidden.shape)} and {tuple(mask.shape)}")
    keep = mask.to(device=hidden.device, dtype=torch.bool)
    real = hidden[keep].detach().float().abs()  # [N, D]; one layer's output is already in memory
    if real.numel() == 0:
        raise LayerzoError("no real tokens to profile: every calibration text tokenized to nothing")
    n_tokens, dim = real.shape
    flat_index = int(real.argmax())
    row, channel = divmod(flat_index, dim)
    where = keep.nonzero()[row]  # (b, t) of the row-th real token, row-major like hidden[keep]
    b, t = int(where[0]), int(where[1])
    position = int(keep[b, : t + 1].sum()) - 1
    channel_max = real.amax(dim=0)
    k = min(TOP_CHANNELS, dim)
    values, channels = channel_max.topk(k)
    return LayerStats(
        max_abs=float(real.view(-1)[flat_index]),
        median_abs=float(real.view(-1).median()),
        sequence=b + sequence_offset,
        position=position,
        channel=channel,
        num_tokens=n_tokens,
        num_values=real.numel(),
        top_channels=tuple((int(c), float(v)) for c, v in zip(channels.tolist(), values.tolist())),
    )


def combine_layer_stats(parts: Sequence[LayerStats]) -> LayerStats:
    """Merge per-batch stats of one layer: exact max, location and top channels;
    median = value-count-weighted median of the batch medians (exact for one batch)."""
    if not parts:
        raise ValueError("combine_layer_stats needs at least one LayerStats")
    if len(parts) == 1:
        return parts[0]
    best = max(parts, key=lambda s: s.max_abs)
    by_channel: dict[int, float] = {}
    for s in parts:
        for c, v in s.top_channels:
            by_channel[c] = max(v, by_channel.get(c, v))
    # a channel in the overall top-k is in the top-k of the batch where it peaks, so this is exact
    top = sorted(by_channel.items(), key=lambda cv: (-cv[1], cv[0]))[:TOP_CHANNELS]
    total = sum(s.num_values for s in parts)
    acc, median = 0, parts[0].median_abs
    for s in sorted(parts, key=lambda s: s.median_abs):
        acc += s.num_values
        median = s.median_abs
        if 2 * acc >= total:
            break
    return replace(
        best,
        median_abs=median,
        num_tokens=sum(s.num_tokens for s in parts),
        num_values=total,
        top_channels=tuple(top),
    )


def is_outlier(stats: LayerStats, config: ProfileConfig) -> bool:
    return stats.max_abs > config.max_threshold and stats.ratio >= config.ratio_threshold


def massive_channels(stats: LayerStats, config: ProfileConfig) -> tuple[int, ...]:
    """Top channels whose own max passes both thresholds."""
    med = stats.median_abs
    return tuple(
        c for c, v in stats.top_channels
        if v > config.max_threshold and (v / med if med > 0 else math.inf) >= config.ratio_threshold
    )


def _persists(stats: Sequence[LayerStats], i: int, j: int, config: ProfileConfig) -> bool:
    if not is_outlier(stats[j], config):
        return False
    return not config.same_channel or stats[i].channel in massive_channels(stats[j], config)


def pick_dominant_layer(stats: Sequence[LayerStats], config: ProfileConfig = ProfileConfig()) -> Pick:
    """Apply the dominant-layer rule (module docstring) to per-layer stats, layer 0 first."""
    n = len(stats)
    if n == 0:
        raise ValueError("pick_dominant_layer needs the stats of at least one layer")
    outliers = [i for i in range(n) if is_outlier(stats[i], config)]
    for i in outliers:
        following = range(i + 1, min(i + 1 + config.persist_window, n))
        kept = sum(_persists(stats, i, j, config) for j in following)
        if kept >= config.persist_min:
            s = stats[i]
            where = f"token {s.token!r} " if s.token is not None else ""
            return Pick(
                layer=i,
                confidence="high",
                reason=(
                    f"layer {i} is the first outlier layer whose outlier persists: max|h| {s.max_abs:.4g} > "
                    f"{config.max_threshold:g} and max/median {s.ratio:.4g} >= {config.ratio_threshold:g} "
                    f"({where}at position {s.position}, channel {s.channel}), still massive in {kept} of the "
                    f"next {len(following)} layers"
                ),
            )
    half = max(1, math.ceil(n / 2))
    best, best_jump = 0, 0.0
    for i in range(1, half):
        prev = stats[i - 1].max_abs
        jump = stats[i].max_abs / prev if prev > 0 else math.inf
        if jump > best_jump:
            best, best_jump = i, jump
    seen = ", ".join(map(str, outliers)) if outliers else "none"
    if best == 0:
        jump_text = "no jump to compare (fewer than 3 layers), so layer 0"
    else:
        jump_text = (
            f"the largest jump in max|h| within the first half ({stats[best - 1].max_abs:.4g} -> "
            f"{stats[best].max_abs:.4g}, x{best_jump:.3g})"
        )
    return Pick(
        layer=best,
        confidence="low",
        reason=(
            f"no outlier layer persists in {config.persist_min} of the next {config.persist_window} layers "
            f"(outlier layers: {seen}); picked layer {best}: {jump_text}"
        ),
    )
