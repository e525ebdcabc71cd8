"""Activation profiling and the dominant-layer rule (Sun et al. 2024, "Massive Activations").

A few forward passes run with a hook on every decoder layer's OUTPUT (the
residual stream). Each hook reduces the layer output at once and keeps no
hidden states: per layer we keep the max |h| over real (non-pad) tokens with
where it sits, the top channels by max |h|, and the median |h|.

The rule, as pure functions over those statistics:

* a layer is an OUTLIER layer when ``max |h| > max_threshold`` and
  ``max |h| / median |h| >= ratio_threshold``;
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

Median: exact within a forward pass (``torch.median`` over |h| of all real
tokens x channels of that layer; for an even count it is the lower middle
value). With several batches the layer median is the value-count-weighted
median of the per-batch medians, an approximation; the default batch size
equals ``num_sequences`` so the default profile is a single exact pass.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import ConfigError, DataRowError, LayerzoError
from .layers import LayerLayout, find_layer_layout, get_layers

TOP_CHANNELS = 8  # channels kept per layer for the same-channel persistence test

RULE_TEXT = (
    "outlier layer: max|h| > max_threshold and max|h|/median|h| >= ratio_threshold; dominant layer: the first "
    "outlier layer whose max channel is still massive in >= persist_min of the next persist_window layers; "
    "fallback (low confidence): the largest jump in max|h| between consecutive layers in the first half"
)

DEFAULT_CALIBRATION_TEXTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "In 1969, astronauts landed on the Moon and walked on its dusty surface for the first time.",
    "Please remember to bring your umbrella tomorrow, because the forecast says it will rain all day.",
    "Water boils at one hundred degrees Celsius at sea level, but at lower temperatures on mountains.",
    "She opened the old book, blew the dust off its pages, and began to read the first chapter aloud.",
    "The committee will meet on Tuesday to discuss the budget, the new hires, and the office move.",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
    "After a long day at work, he cooked a simple dinner of rice, beans and grilled vegetables.",
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


@dataclass(frozen=True)
class ProfileReport:
    """Result of :func:`profile_model`; ``to_dict`` is what tune records in a patch manifest."""

    model: str
    num_layers: int
    layer_path: str
    fingerprint: str
    num_sequences: int
    num_tokens: int
    calibration: str
    config: ProfileConfig
    layers: tuple[LayerStats, ...]
    pick: Pick
    rule: str = RULE_TEXT
    outlier_layers: tuple[int, ...] = field(default=())

    def to_dict(self) -> dict:
        layers = []
        for i, s in enumerate(self.layers):
            d = asdict(s)
            d["top_channels"] = [list(cv) for cv in s.top_channels]
            ratio = s.ratio
            layers.append({"layer": i, **d, "ratio": ratio if math.isfinite(ratio) else None,
                           "outlier": is_outlier(s, self.config)})
        return {
            "model": self.model,
            "num_layers": self.num_layers,
            "layer_path": self.layer_path,
            "fingerprint": self.fingerprint,
            "num_sequences": self.num_sequences,
            "num_tokens": self.num_tokens,
            "calibration": self.calibration,
            "rule": self.rule,
            "config": asdict(self.config),
            "pick": asdict(self.pick),
            "outlier_layers": list(self.outlier_layers),
            "layers": layers,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ProfileReport":
        try:
            config = ProfileConfig.from_dict(dict(data["config"]))
            stat_names = {f.name for f in fields(LayerStats)}
            layers = tuple(
                LayerStats(**{
                    **{k: v for k, v in row.items() if k in stat_names},
                    "top_channels": tuple((int(c), float(v)) for c, v in row.get("top_channels", [])),
                })
                for row in data["layers"]
            )
            return cls(
                model=data["model"], num_layers=int(data["num_layers"]), layer_path=data["layer_path"],
                fingerprint=data["fingerprint"], num_sequences=int(data["num_sequences"]),
                num_tokens=int(data["num_tokens"]), calibration=data.get("calibration", ""),
                config=config, layers=layers, pick=Pick(**data["pick"]), rule=data.get("rule", RULE_TEXT),
                outlier_layers=tuple(data.get("outlier_layers", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"not a layerzo profile report: {type(exc).__name__}: {exc}") from None


def model_fingerprint(model: torch.nn.Module, layout: LayerLayout) -> str:
    """Cheap identity of a model: its config (minus paths/dtype) + embedding + first layer tensors."""
    from .hashing import combine_sha256, tensor_sha256

    config = getattr(model, "config", None)
    cfg = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    # location and load dtype vary for the same weights; tensor_sha256 is dtype-independent too
    volatile = {"_name_or_path", "name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash"}
    cfg = {k: v for k, v in cfg.items() if k not in volatile}
    parts = [json.dumps(cfg, sort_keys=True, default=str)]
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is not None and getattr(embedding, "weight", None) is not None:
        parts.append(tensor_sha256(embedding.weight))
    first = get_layers(model, layout)[0]
    parts.extend(f"{name}:{tensor_sha256(p)}" for name, p in sorted(first.state_dict().items()))
    return combine_sha256(parts)


class _StopForward(Exception):
    """Raised by the last layer's hook: the final norm and LM head are not needed."""


def _encode(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    rows = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if len(ids):
            rows.append(list(ids))
    if not rows:
        raise ConfigError("every calibration text tokenized to no tokens; give non-empty texts")
    return rows


def _pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to [B, T] with an attention mask (1 = real token)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, : len(r)] = 1
    return ids.to(device), mask.to(device)


def profile_model(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    config: ProfileConfig = ProfileConfig(),
    layout: LayerLayout | None = None,
    *,
    model_name: str | None = None,
    calibration: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> ProfileReport:
    """Profile the first ``config.num_sequences`` texts and pick the dominant layer.

    Hooks on each decoder layer reduce its output ([B, T, D], a tensor or a
    tuple whose first item is the hidden states) to :class:`LayerStats` at
    once; the forward stops after the last decoder layer. ``progress(done,
    total)`` is called after each batch.
    """
    texts = [t for t in texts if isinstance(t, str) and t.strip()][: config.num_sequences]
    if not texts:
        raise ConfigError("no calibration texts: give at least one non-empty text")
    layout = layout or find_layer_layout(model)
    layers = get_layers(model, layout)
    rows = _encode(tokenizer, texts, config.max_length)
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    device = next(model.parameters()).device
    parts: list[list[LayerStats]] = [[] for _ in range(layout.num_layers)]
    state: dict = {}

    def make_hook(index: int):
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            parts[index].append(layer_stats(hidden, state["mask"], sequence_offset=state["offset"]))
            if index == layout.num_layers - 1:
                raise _StopForward

        return hook

    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    batches = range(0, len(rows), config.batch_size)
    all_ids: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for done, start in enumerate(batches, start=1):
                ids, mask = _pad(rows[start : start + config.batch_size], pad_id, device)
                state.update(mask=mask, offset=start)
                all_ids.extend(ids.cpu())
                try:
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
                except _StopForward:
                    pass
                if progress is not None:
                    progress(done, len(batches))
    finally:
        for h in handles:
            h.remove()
    if any(len(p) != len(batches) for p in parts):
        raise LayerzoError(
            f"the decoder layers at {layout.path} were not all called once per batch; this architecture's "
            "forward is not supported by layerzo profile"
        )
    stats = []
    for p in parts:
        s = combine_layer_stats(p)
        token_id = int(all_ids[s.sequence][s.position])  # right padding: real position == column
        stats.append(replace(s, token_id=token_id, token=tokenizer.decode([token_id])))
    stats_t = tuple(stats)
    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return ProfileReport(
        model=str(name),
        num_layers=layout.num_layers,
        layer_path=layout.path,
        fingerprint=model_fingerprint(model, layout),
        num_sequences=len(rows),
        num_tokens=sum(len(r) for r in rows),
        calibration=calibration,
        config=config,
        layers=stats_t,
        pick=pick_dominant_layer(stats_t, config),
        outlier_layers=tuple(i for i, s in enumerate(stats_t) if is_outlier(s, config)),
    )


def read_calibration_file(path: str | Path) -> list[str]:
    """Texts for ``--calib``: ``.jsonl`` rows with a ``"text"`` string, otherwise one text per line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"calibration file {path} does not exist")
    texts: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if path.suffix.lower() != ".jsonl":
                texts.append(line.rstrip("\n"))
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataRowError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataRowError(f'{path}:{lineno}: expected an object with a "text" string')
            texts.append(row["text"])
    if not texts:
        raise ConfigError(f"calibration file {path} has no texts")
    return texts
