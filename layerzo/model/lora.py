"""LoRA-ZO: peft's LoRA adapters on the attention q/v projections, tuned by the ZO engine.

The adapters are injected with peft (``inject_adapter_in_model``), so the
tuned modules are peft's own ``lora.Linear`` and a LoRA patch is also a
standard PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
that ``PeftModel.from_pretrained(base, PATCH)`` loads. The wrapped projection
computes ``y = base(x) + (alpha / r) · B(A(x))``.

Names: the patch keeps layerzo's key names (``model.layers.3.self_attn.q_proj.lora_A.weight``,
[r, in]; ``...lora_B.weight``, [out, r]); inside the model peft adds its adapter
name (``...q_proj.lora_A.default.weight``): :func:`model_parameter_name` maps one to the other.

Initialisation: A like peft's default (kaiming-uniform, a=√5 → U(±1/√in)), but
drawn from a dedicated generator seeded with the run's seed, projection by
projection in module order, so a replay regenerates it exactly and the global
RNG is never touched; B starts at zero, so the wrapped model starts exactly at
the base. Adapters are float32 whatever the model dtype (ZO updates would
vanish in bf16); peft casts at their boundary.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from layerzo.errors import ArchitectureError, ConfigError
from layerzo.model.layers import LayerLayout

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "v_proj")
ADAPTER_NAME = "default"  # peft's adapter name inside the model
PEFT_PREFIX = "base_model.model."  # the key prefix of a saved PEFT adapter


def _check(r: int, alpha: float) -> None:
    if not (isinstance(r, int) and r >= 1):
        raise ConfigError(f"lora_rank must be an integer ≥ 1, got {r!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"lora_alpha must be a positive number, got {alpha!r}")


def target_modules(model: nn.Module, layout: LayerLayout, layers: Sequence[int],
                   targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Full names of the linear ``targets`` projections of ``layers``, in module order."""
    found: list[str] = []
    for i in layers:
        prefix = layout.key_prefix(i)
        names = [name for name, module in model.named_modules()
                 if name.startswith(prefix) and name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear)]
        if not names:
            raise ArchitectureError(
                f"layer {i} has no linear {'/'.join(targets)} projections to put LoRA on "
                f"({type(model).__name__} may use a fused attention projection)",
                "use --layers without --lora on this architecture",
            )
        found += names
    return found


def lora_config(modules: Sequence[str], r: int, alpha: float, base_model: str | None = None,
                revision: str | None = None) -> Any:
    """The peft ``LoraConfig`` of a layerzo LoRA patch (exact module names: no pattern to misread)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(modules), lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM", base_model_name_or_path=base_model, revision=revision)


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
    """Inject peft LoRA adapters on the ``targets`` projections of ``layers``, in place.

    Returns the adapter names in the patch's key format (A then B of each
    projection, in module order): exactly the keys a LoRA patch stores.
    """
    from peft import inject_adapter_in_model

    _check(r, alpha)
    modules = target_modules(model, layout, layers, targets)
    for name in modules:  # a rank above the projection's size adds nothing and can exhaust memory (--lora-rank 10**9)
        weight = model.get_submodule(name).weight
        if r > min(weight.shape):
            raise ConfigError(f"lora_rank {r} is larger than {name} ({weight.shape[0]}x{weight.shape[1]}) allows",
                              f"use --lora-rank {min(weight.shape)} or less")
    inject_adapter_in_model(lora_config(modules, r, alpha), model, adapter_name=ADAPTER_NAME)
    model.requires_grad_(False)  # ZO needs no autograd; peft marks its adapters trainable
    generator = torch.Generator().manual_seed(seed)
    names: list[str] = []
    with torch.no_grad():
        for name in modules:
            layer = model.get_submodule(name)
            layer.lora_A[ADAPTER_NAME].float()  # fp32 adapters in any model dtype; peft casts at their boundary
            layer.lora_B[ADAPTER_NAME].float()
            a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
            bound = 1.0 / math.sqrt(a.shape[1])
            values = torch.rand(a.shape, generator=generator, dtype=torch.float32)
            a.copy_(values.mul_(2 * bound).sub_(bound))
            b.zero_()
            names += [f"{name}.lora_A.weight", f"{name}.lora_B.weight"]
    return names


def model_parameter_name(patch_name: str) -> str:
    """``...q_proj.lora_A.weight`` (patch) → ``...q_proj.lora_A.default.weight`` (inside the peft-wrapped model)."""
    head, _, tail = patch_name.rpartition(".lora_")
    return f"{head}.lora_{tail.split('.')[0]}.{ADAPTER_NAME}.weight" if head else patch_name


def remove_lora(model: nn.Module) -> None:
    """Undo :func:`add_lora`: put the base projections back (adapters dropped, nothing merged)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), attr, module.get_base_layer())


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


def peft_state_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Patch-format LoRA tensors under the keys a saved PEFT adapter uses (``base_model.model.`` + name)."""
    return {PEFT_PREFIX + name: t for name, t in tensors.items()}


def adapter_modules(tensors: Mapping[str, Any]) -> list[str]:
    """The projection names a LoRA patch's tensors adapt, in key order."""
    return sorted({name.rsplit(".lora_", 1)[0] for name in tensors})
