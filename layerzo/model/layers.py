"""Architecture-agnostic lookup of a causal LM's decoder layers.

A decoder layer is addressed by its index; its parameters live under the
state-dict prefix ``f"{layout.path}.{i}."`` (``model.layers.5.`` for Llama,
``transformer.h.5.`` for GPT-2). Everything in layerzo that touches "a layer"
goes through :class:`LayerLayout` so no module hard-codes an architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

from layerzo.errors import ArchitectureError, LayerIndexError

# Attribute paths of the decoder-layer ModuleList, most common first.
KNOWN_LAYER_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, SmolLM, Granite, ...
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Bloom, Falcon, CodeGen
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.language_model.layers",  # multimodal wrappers (Gemma 3, Llava-style)
    "transformer.layers",  # some custom decoders
    "transformer.blocks",  # MPT
)


@dataclass(frozen=True)
class LayerLayout:
    """Where the decoder layers sit in a model and how their keys are named."""

    path: str
    num_layers: int

    def key_prefix(self, index: int) -> str:
        """State-dict prefix of layer ``index``, e.g. ``model.layers.5.``."""
        self.check_index(index)
        return f"{self.path}.{index}."

    def check_index(self, index: int) -> None:
        if not 0 <= index < self.num_layers:
            raise LayerIndexError(
                f"layer {index} does not exist: the model has {self.num_layers} decoder layers "
                f"(valid indices 0-{self.num_layers - 1})"
            )

    def layer_of_key(self, key: str) -> int | None:
        """Index of the decoder layer a state-dict key belongs to, or None."""
        head = self.path + "."
        if not key.startswith(head):
            return None
        index = key[len(head) :].split(".", 1)[0]
        return int(index) if index.isdigit() else None


def _get_attr_path(obj: object, path: str) -> object | None:
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def _config_num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def find_layer_layout(model: nn.Module) -> LayerLayout:
    """Locate the decoder layers of ``model`` (a ``*ForCausalLM`` or its base model).

    Known attribute paths are tried first; otherwise the unique ``nn.ModuleList``
    whose length equals ``config.num_hidden_layers`` is taken.
    """
    for path in KNOWN_LAYER_PATHS:
        found = _get_attr_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return LayerLayout(path=path, num_layers=len(found))
    expected = _config_num_layers(model)
    if expected:
        matches = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and len(module) == expected and name
        ]
        if len(matches) == 1:
            return LayerLayout(path=matches[0], num_layers=expected)
    arch = type(model).__name__
    raise ArchitectureError(
        f"cannot find the decoder layers of {arch}: looked for an nn.ModuleList at "
        f"{', '.join(KNOWN_LAYER_PATHS)}"
        + (f" or one of length num_hidden_layers={expected}" if expected else "")
    )


def get_layers(model: nn.Module, layout: LayerLayout) -> nn.ModuleList:
    layers = _get_attr_path(model, layout.path)
    if not isinstance(layers, nn.ModuleList):
        raise ArchitectureError(f"{type(model).__name__} has no module list at {layout.path}")
    return layers


def get_layer(model: nn.Module, layout: LayerLayout, index: int) -> nn.Module:
    layout.check_index(index)
    return get_layers(model, layout)[index]


def layer_parameter_names(model: nn.Module, layout: LayerLayout, index: int) -> list[str]:
    """Full state-dict names of the parameters of one layer, in module order."""
    prefix = layout.key_prefix(index)
    return [name for name, _ in model.named_parameters() if name.startswith(prefix)]


def parse_layer_spec(spec: str | int | Sequence[int], num_layers: int) -> tuple[int, ...] | str:
    """Parse ``--layers``: ``dominant``, ``auto``, ``all``, an index, a list ``3,7``, ranges ``0-3,11``.

    Returns ``"dominant"`` / ``"auto"`` / ``"all"`` unchanged (the caller resolves them) or a
    sorted tuple of distinct valid indices. Negative indices count from the end
    (``-1`` is the last layer); a range ``a-b`` takes non-negative bounds, a ≤ b.
    """
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("dominant", "auto", "all"):
            return text
        indices = [i for part in text.split(",") if part.strip() for i in _spec_part(part.strip(), spec, num_layers)]
    elif isinstance(spec, int):
        indices = [spec]
    else:
        indices = [int(i) for i in spec]
    if not indices:
        raise LayerIndexError(f"--layers names no layer: {spec!r}")
    resolved = []
    for i in indices:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise LayerIndexError(
                f"--layers {i} is out of range: the model has {num_layers} decoder layers "
                f"(valid indices 0-{num_layers - 1})"
            )
        resolved.append(j)
    return tuple(sorted(set(resolved)))


def _spec_part(part: str, spec: str, num_layers: int) -> range | list[int]:
    """One comma-separated part of a layer spec: ``5``, ``-1`` or ``0-3``."""
    lo, sep, hi = part.partition("-")
    if sep and lo.strip().isdigit() and hi.strip().isdigit():
        a, b = int(lo), int(hi)
        if a > b:
            raise LayerIndexError(f"--layers range {part!r} runs backwards; write {b}-{a}")
        if b >= num_layers:  # before expanding: a typo like 0-99999999 must not allocate
            raise LayerIndexError(f"--layers {part} is out of range: the model has {num_layers} decoder layers "
                                  f"(valid indices 0-{num_layers - 1})")
        return range(a, b + 1)
    try:
        return [int(part)]
    except ValueError:
        raise LayerIndexError(
            f"--layers must be 'dominant', 'all', an index, a list like 3,7 or a range like 0-3; got {spec!r}"
        ) from None
