"""LoRA-ZO baseline: low-rank adapters on the attention q/v projections, tuned by the ZO engine.

A small hand-written wrapper (no peft dependency at train time) so that the
state-dict names are exactly the patch format's:
``model.layers.3.self_attn.q_proj.lora_A.weight`` ([r, in]) and
``...q_proj.lora_B.weight`` ([out, r]); the wrapped projection computes

    y = base(x) + (alpha / r) · B(A(x))

A is initialised like peft (kaiming-uniform, a=√5 → U(±1/√in)) from a
dedicated, seeded generator; B starts at zero so the wrapped model starts
exactly at the base model. Adapters are float32 whatever the model dtype
(ZO updates would vanish in bf16); their output is cast back at the boundary.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from layerzo.errors import ArchitectureError, ConfigError
from layerzo.model.layers import LayerLayout

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "v_proj")


class LoRALinear(nn.Module):
    """``base`` (frozen) plus a float32 rank-``r`` update; children: ``base``, ``lora_A``, ``lora_B``."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=torch.float32)
        bound = 1.0 / math.sqrt(base.in_features)
        with torch.no_grad():
            a = torch.rand(self.lora_A.weight.shape, generator=generator, dtype=torch.float32)
            self.lora_A.weight.copy_(a.mul_(2 * bound).sub_(bound))
            self.lora_B.weight.zero_()
        self.lora_A.requires_grad_(False)
        self.lora_B.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        delta = self.lora_B(self.lora_A(x.to(torch.float32))) * self.scaling
        return out + delta.to(out.dtype)


def _check(r: int, alpha: float) -> None:
    if not (isinstance(r, int) and r >= 1):
        raise ConfigError(f"lora_rank must be an integer ≥ 1, got {r!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"lora_alpha must be a positive number, got {alpha!r}")


def add_lora(
    model: nn.Module,
    layout: LayerLayout,
    layers: Sequence[int],
    *,
    r: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    seed: int = 0,
) -> list[str]:
    """Wrap the ``targets`` linear projections of ``layers`` in :class:`LoRALinear`, in place.

    Returns the adapter parameter names (A then B of each wrapped projection,
    in module order): exactly the keys a LoRA patch stores.
    """
    _check(r, alpha)
    generator = torch.Generator().manual_seed(seed)
    names: list[str] = []
    for i in layers:
        prefix = layout.key_prefix(i)
        found = [
            (name, module)
            for name, module in model.named_modules()
            if name.startswith(prefix) and name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear)
        ]
        if not found:
            raise ArchitectureError(
                f"layer {i} has no linear {'/'.join(targets)} projections to put LoRA on "
                f"({type(model).__name__} may use a fused attention projection)",
                "use --layers without --lora on this architecture",
            )
        for name, module in found:
            parent_name, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), attr, LoRALinear(module, r, alpha, generator))
            names += [f"{name}.lora_A.weight", f"{name}.lora_B.weight"]
    return names


def remove_lora(model: nn.Module) -> None:
    """Undo :func:`add_lora` (put the base projections back; adapters are dropped)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), attr, module.base)


def lora_base_names(adapter_names: Sequence[str]) -> list[str]:
    """``...q_proj.lora_A.weight`` → ``...q_proj.weight`` (base weights the adapters modify), deduplicated."""
    out: list[str] = []
    for n in adapter_names:
        base = n.rsplit(".lora_", 1)[0] + ".weight"
        if base not in out:
            out.append(base)
    return out


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The dense update ``scaling · B @ A`` ([out, in], float32) that merging adds to the base weight."""
    return (b.to(torch.float32) @ a.to(torch.float32)) * scaling
