"""Activation profiling and the dominant-layer rule (Sun et al. 2024, "Massive Activations").

A few forward passes run with a hook on every decoder layer's OUTPUT (the
residual stream). Each hook reduces the layer output at once and keeps no
hidden states: per layer we keep the max |h| over real (non-pad) tokens with
where it sits, the top channels by max |h|, and the median |h|.

The rule itself (outlier layer, persistence, fallback) is pure functions over
those statistics in :mod:`layerzo.profile.rule`; the calibration texts (built-in,
a file, or a task's training inputs) come from :mod:`layerzo.data.calibration`.

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
from typing import Callable, Sequence

import torch

from layerzo.errors import ConfigError, LayerzoError
from layerzo.model.layers import LayerLayout, find_layer_layout, get_layers
from layerzo.profile.rule import (
    RULE_TEXT,
    LayerStats,
    Pick,
    ProfileConfig,
    combine_layer_stats,
    is_outlier,
    layer_stats,
    pick_dominant_layer,
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
    from layerzo.core.hashing import combine_sha256, tensor_sha256

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
    parts, all_ids = _hooked_forward(model, layers, layout, rows, pad_id, config.batch_size, progress)
    stats = _located_stats(parts, all_ids, tokenizer)
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
        layers=stats,
        pick=pick_dominant_layer(stats, config),
        outlier_layers=tuple(i for i, s in enumerate(stats) if is_outlier(s, config)),
    )


def _hooked_forward(
    model: torch.nn.Module,
    layers: torch.nn.ModuleList,
    layout: LayerLayout,
    rows: list[list[int]],
    pad_id: int,
    batch_size: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[list[list[LayerStats]], list[torch.Tensor]]:
    """Run ``rows`` through the model in batches with a stats hook on every decoder layer (``layers``).

    Returns the per-batch stats of each layer (layer 0 first) and every padded
    row of token ids (for naming the token at each max). Raises when a layer
    was not called exactly once per batch.
    """
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
    batches = range(0, len(rows), batch_size)
    all_ids: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for done, start in enumerate(batches, start=1):
                ids, mask = _pad(rows[start : start + batch_size], pad_id, device)
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
    return parts, all_ids


def _located_stats(parts: list[list[LayerStats]], all_ids: list[torch.Tensor], tokenizer) -> tuple[LayerStats, ...]:
    """Each layer's batches merged, with the token id and text at its max filled in."""
    stats = []
    for p in parts:
        s = combine_layer_stats(p)
        token_id = int(all_ids[s.sequence][s.position])  # right padding: real position == column
        stats.append(replace(s, token_id=token_id, token=tokenizer.decode([token_id])))
    return tuple(stats)
