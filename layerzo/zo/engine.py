"""The zeroth-order engine: MeZO-style two-sided SPSA, forward passes only.

One step with seed s (q directions, j = 1..q):

    z_j ~ N(0, I)                     regenerated from (s_j, parameter index), never stored
    L+_j = L(θ + eps·z_j),  L-_j = L(θ − eps·z_j)      on the same batch
    g_j  = (L+_j − L-_j) / (2·eps)                      projected gradient
    d    = (1/q)·Σ_j g_j·z_j + wd·θ                     (wd only on ≥2-D tensors: no norms, no biases)
    d    ← m = β·m + d                                  (only with momentum β > 0: ZO-SGD-MMT)
    θ    ← θ − lr_t·d

Exact restore. The perturbation is *functional*: a forward pre-hook on each
module that owns a tuned parameter swaps the parameter's storage for a fresh
tensor ``θ + eps·z`` and the post-hook swaps the original storage back. θ is
never written during the ± evaluations, so it is bit-identical afterwards
(no ``+eps, −2eps, +eps`` drift), and at most one module's perturbed copy
exists at a time: the same path serves one layer and the full model
(``--layers all``) without a second copy of the weights. z is regenerated from
its seed when needed (MeZO's seed trick); only a small selection (one layer,
LoRA: within ``z_cache_max_bytes``) keeps its z for one step, to draw it once instead of three times.

Determinism and replay. z for tuned tensor i in direction s is drawn, in
float32 on the tensor's device, from a dedicated ``torch.Generator`` seeded
with ``param_seed(s, i)`` — the global RNG is never touched. The update is one
function, :func:`apply_update`, used by both the live run and
:func:`replay_trajectory`, so replaying the recorded (seeds, grads, lr) on the
base weights rebuilds bit-identical weights (same device type, same tensor order).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Callable, ContextManager, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from layerzo.errors import ConfigError, DivergenceError

LR_SCHEDULES = ("constant", "linear")
Z_DTYPE = torch.float32  # z is always drawn in float32 (recorded in the patch as ``z_dtype``)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # lr, eps and weight decay scale float32 tensors
RNG_ALGORITHM = "torch.randn(float32) per tensor; seed = splitmix64(direction_seed, tensor_index)"
_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------- seeds
def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def direction_seeds(step_seed: int, q: int) -> tuple[int, ...]:
    """The q direction seeds of one step (63-bit, decorrelated by splitmix64)."""
    return tuple(_splitmix64(_splitmix64(step_seed) + j) >> 1 for j in range(q))


def param_seed(direction_seed: int, index: int) -> int:
    """Seed of the z-block of tuned tensor ``index`` in direction ``direction_seed``."""
    return _splitmix64(direction_seed ^ _splitmix64(index + 1)) >> 1


# A step needs each z three times (+eps, -eps, update). Keeping it for the step
# instead of drawing it three times costs 4 bytes per tuned weight: cheap for one
# layer or LoRA, but for the whole model (MeZO) it adds about the model's own size
# in fp32 - exactly the memory MeZO's seed trick exists to avoid. So z is kept
# only up to a budget: zo_step's ``z_cache_max_bytes``, which tune() sets to
# z_cache_budget(model) (1/Z_CACHE_MODEL_FRACTION of the model's weight bytes);
# callers that pass no budget get the absolute Z_CACHE_MAX_BYTES.
Z_CACHE_MAX_BYTES = 512 * 1024 * 1024
Z_CACHE_MODEL_FRACTION = 8


def z_cache_budget(model: nn.Module) -> int:
    """Bytes of z a step may keep for ``model``: 1/8 of its weights (tune memory stays within 1.125x + activations)."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) // Z_CACHE_MODEL_FRACTION


def direction(tensor: torch.Tensor, seed: int, cache: dict | None = None) -> torch.Tensor:
    """z ~ N(0, I) shaped like ``tensor``: float32, on its device, from a dedicated generator.

    With ``cache`` (a dict), z is remembered by seed; callers must not modify it in place.
    """
    if cache is not None:
        z = cache.get(seed)
        if z is None:
            z = cache[seed] = direction(tensor, seed)
        return z
    # A fresh generator per draw: manual_seed resets it completely, so the bits are those of a
    # reused one, and creating it costs microseconds next to drawing a tensor's z.
    gen = torch.Generator(device=tensor.device).manual_seed(seed)
    return torch.randn(tensor.shape, generator=gen, dtype=Z_DTYPE, device=tensor.device)


# ----------------------------------------------------------------------------- config / state
@dataclass(frozen=True)
class ZOConfig:
    """Hyper-parameters of the ZO optimizer (validated on construction)."""

    lr: float
    eps: float = 1e-3
    weight_decay: float = 0.0
    q: int = 1
    momentum: float = 0.0
    lr_schedule: str = "constant"
    max_abs_grad: float | None = 1e4  # |g| above this rejects the step (None: only non-finite)
    max_bad_steps: int = 5  # this many rejected steps in a row raise DivergenceError

    @classmethod
    def from_mapping(cls, values: Mapping, defaults: "ZOConfig | None" = None) -> "ZOConfig":
        """The ZO fields of a flat recipe (keys named as the fields; others ignored), over ``defaults``."""
        names = [f.name for f in fields(cls)]
        base = {n: getattr(defaults, n) for n in names} if defaults is not None else {}
        return cls(**{**base, **{n: values[n] for n in names if n in values}})

    def __post_init__(self) -> None:
        _finite_at_least("lr", self.lr, 0.0)
        _finite_at_least("weight_decay", self.weight_decay, 0.0)
        if not (isinstance(self.eps, (int, float)) and 0 < self.eps <= FLOAT32_MAX):
            raise ConfigError(f"eps must be a positive number at most {FLOAT32_MAX:.4g} (float32), got {self.eps}")
        if not (isinstance(self.q, int) and self.q >= 1):
            raise ConfigError(f"q (directions per step) must be an integer ≥ 1, got {self.q}")
        if not (0.0 <= self.momentum < 1.0):
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.max_abs_grad is not None and not self.max_abs_grad > 0:
            raise ConfigError(f"max_abs_grad must be positive (or None), got {self.max_abs_grad}")
        if not (isinstance(self.max_bad_steps, int) and self.max_bad_steps >= 1):
            raise ConfigError(f"max_bad_steps must be an integer ≥ 1, got {self.max_bad_steps}")


def _finite_at_least(name: str, value: float, low: float) -> None:
    """``value`` in [low, FLOAT32_MAX]: the update multiplies float32 tensors by it, so a larger one overflows."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low):
        raise ConfigError(f"{name} must be a finite number ≥ {low}, got {value}")
    if value > FLOAT32_MAX:
        raise ConfigError(f"{name} must be at most {FLOAT32_MAX:.4g} (the float32 range the update runs in), got {value}")


def lr_at(config: ZOConfig, step: int, total_steps: int = 1) -> float:
    """Learning rate of 0-based ``step``: constant, or linear decay to 0 at ``total_steps``."""
    if config.lr_schedule == "linear":
        return config.lr * max(0.0, 1.0 - step / total_steps)
    return config.lr


@dataclass
class ZOState:
    """Mutable optimizer state: step counter, rejection streak, momentum buffers (fp32)."""

    step: int = 0
    bad_in_row: int = 0
    momentum: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class StepResult:
    """What one :func:`zo_step` did. ``applied`` is False for a rejected step."""

    step: int
    seeds: tuple[int, ...]
    losses_plus: tuple[float, ...]
    losses_minus: tuple[float, ...]
    grads: tuple[float, ...]
    lr: float
    applied: bool
    reason: str = ""


# ----------------------------------------------------------------------------- tuned parameters
@dataclass(frozen=True)
class TunedParams:
    """The tensors the engine tunes, in a fixed order, and the modules that use them.

    ``owners`` lists every module holding a tuned parameter directly (tied
    weights have several owners) with ``(attribute, tensor index)`` pairs.
    """

    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]
    owners: tuple[tuple[nn.Module, tuple[tuple[str, int], ...]], ...]

    @classmethod
    def from_model(cls, model: nn.Module, names: Sequence[str]) -> "TunedParams":
        """Select parameters of ``model`` by name (order of ``names`` is kept)."""
        by_name = dict(model.named_parameters())
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ConfigError(f"parameter {missing[0]} is not in the model")
        if not names:
            raise ConfigError("no parameters selected for tuning")
        tensors = tuple(by_name[n] for n in names)
        index = {id(t): i for i, t in enumerate(tensors)}
        owners = []
        for module in model.modules():
            slots = tuple((attr, index[id(p)]) for attr, p in module._parameters.items() if id(p) in index)
            if slots:
                owners.append((module, slots))
        return cls(tuple(names), tensors, tuple(owners))

    def state(self) -> dict[str, torch.Tensor]:
        """Detached copies of the tuned tensors, by name."""
        return {n: t.detach().clone() for n, t in zip(self.names, self.tensors)}

    def load(self, values: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, t in zip(self.names, self.tensors):
                t.copy_(values[n])


@contextmanager
def perturbed(params: TunedParams, seed: int, scale: float, z_cache: dict | None = None) -> Iterator[None]:
    """Inside the block every forward pass sees ``θ + scale·z(seed)``; θ is never written.

    Each owning module gets a pre-hook that swaps in a freshly computed
    perturbed tensor and a post-hook that swaps the original storage back.
    """
    saved: dict[tuple[int, str], tuple[nn.Module, torch.Tensor]] = {}

    def make_hooks(slots):
        def pre(module, args):
            for attr, i in slots:
                p = getattr(module, attr)
                base = p.data
                z = direction(base, param_seed(seed, i), z_cache)
                if base.dtype == Z_DTYPE:
                    new = base + scale * z
                else:  # low-precision / float64 tensors: perturb in the wider dtype, round once
                    wide = torch.promote_types(base.dtype, Z_DTYPE)
                    new = (base.to(wide) + scale * z.to(wide)).to(base.dtype)
                saved[(id(module), attr)] = (module, base)
                p.data = new

        def post(module, args, output):
            for attr, _ in slots:
                _, base = saved.pop((id(module), attr))
                getattr(module, attr).data = base

        return pre, post

    handles = []
    try:
        for module, slots in params.owners:
            pre, post = make_hooks(slots)
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()
        for (_, attr), (module, base) in saved.items():  # a forward that raised midway
            getattr(module, attr).data = base


# ----------------------------------------------------------------------------- update / step / replay
@torch.no_grad()
def apply_update(
    tensors: Sequence[torch.Tensor],
    seeds: Sequence[int],
    grads: Sequence[float],
    lr: float,
    config: ZOConfig,
    state: ZOState,
    z_cache: dict | None = None,
) -> None:
    """θ ← θ − lr·d with d = mean_j(g_j·z_j) + wd·θ (momentum-filtered); in place, one tensor at a time."""
    q = len(seeds)
    for i, p in enumerate(tensors):
        d: torch.Tensor | None = None
        for s, g in zip(seeds, grads):
            z = direction(p, param_seed(s, i), z_cache)
            if d is not None:
                d.add_(z, alpha=g / q)
            elif z_cache is not None:  # a kept z is reused: leave it intact (z * c rounds like z.mul_(c))
                d = z * (g / q)
            else:
                d = z.mul_(g / q)
        assert d is not None  # seeds is never empty (internal invariant, not user input)
        if config.weight_decay and p.dim() >= 2:  # no decay on norms and biases (1-D)
            d.add_(p.to(Z_DTYPE), alpha=config.weight_decay)
        if config.momentum:
            buf = state.momentum.get(i)
            if buf is None:
                buf = state.momentum[i] = torch.zeros_like(d)
            d = buf.mul_(config.momentum).add_(d)
        # In-place add computes in the wider dtype and rounds once into p (bf16 / fp32 / fp64).
        p.add_(d, alpha=-lr)


@torch.no_grad()
def zo_step(
    params: TunedParams,
    loss_fn: Callable[[], float],
    seed: int,
    config: ZOConfig,
    state: ZOState,
    *,
    total_steps: int = 1,
    z_cache_max_bytes: int | None = None,
    pair_loss: Callable[[Callable[[], ContextManager], Callable[[], ContextManager]], tuple[float, float]] | None = None,
) -> StepResult:
    """One SPSA step on the batch ``loss_fn`` evaluates (called 2·q times, each on the same batch).

    ``pair_loss(plus, minus)``, when given, replaces the two calls of a direction
    by one: it gets the ``θ + eps·z`` and ``θ − eps·z`` contexts and returns
    (L+, L−), e.g. from one forward of the batch twice (``Objective.step_loss(paired=True)``).

    ``total_steps`` is the run's length (the linear schedule decays to 0 there);
    z is kept for the step while it fits in ``z_cache_max_bytes`` (None:
    :data:`Z_CACHE_MAX_BYTES`), else regenerated from its seed (same bits).

    A step with a non-finite loss or ``|g| > max_abs_grad`` is rejected: θ is
    left exactly as it was. ``max_bad_steps`` rejections in a row raise
    :class:`DivergenceError`.
    """
    if not (isinstance(total_steps, int) and total_steps >= 1):
        raise ConfigError(f"total_steps must be an integer ≥ 1, got {total_steps!r}")
    if z_cache_max_bytes is not None and not (isinstance(z_cache_max_bytes, int) and z_cache_max_bytes >= 0):
        raise ConfigError(f"z_cache_max_bytes must be an integer ≥ 0 (or None), got {z_cache_max_bytes!r}")
    lr = lr_at(config, state.step, total_steps)
    seeds = direction_seeds(seed, config.q)
    numel = sum(t.numel() for t in params.tensors)
    budget = Z_CACHE_MAX_BYTES if z_cache_max_bytes is None else z_cache_max_bytes
    z_cache: dict | None = {} if numel * 4 * config.q <= budget else None  # same bits either way (apply_update)
    plus, minus, grads = [], [], []
    for s in seeds:
        if pair_loss is not None:
            both = pair_loss(lambda s=s: perturbed(params, s, config.eps, z_cache),
                             lambda s=s: perturbed(params, s, -config.eps, z_cache))
            plus.append(float(both[0]))
            minus.append(float(both[1]))
        else:
            with perturbed(params, s, config.eps, z_cache):
                plus.append(float(loss_fn()))
            with perturbed(params, s, -config.eps, z_cache):
                minus.append(float(loss_fn()))
        grads.append((plus[-1] - minus[-1]) / (2 * config.eps))
    reason = ""
    if not all(math.isfinite(v) for v in plus + minus):
        reason = f"non-finite loss (L+={plus}, L-={minus})"
    elif config.max_abs_grad is not None and any(abs(g) > config.max_abs_grad for g in grads):
        reason = f"|g|={max(abs(g) for g in grads):.4g} exceeds max_abs_grad={config.max_abs_grad:g}"
    result = StepResult(state.step, seeds, tuple(plus), tuple(minus), tuple(grads), lr, not reason, reason)
    state.step += 1
    if reason:
        state.bad_in_row += 1
        if state.bad_in_row >= config.max_bad_steps:
            raise DivergenceError(
                f"training diverged at step {result.step}: {state.bad_in_row} steps in a row were rejected "
                f"(last: {reason})",
                "lower --lr or --eps, or raise the bound with --max-abs-grad",
            )
        return result
    state.bad_in_row = 0
    apply_update(params.tensors, seeds, grads, lr, config, state, z_cache)
    return result


def _step_fields(step) -> tuple[Sequence[int], Sequence[float], float]:
    if isinstance(step, Mapping):
        return step["seeds"], step["grads"], step["lr"]
    return step.seeds, step.grads, step.lr


def replay_trajectory(
    params: TunedParams | Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    trajectory: Iterable,
    config: ZOConfig,
) -> None:
    """Re-apply recorded steps (``TrajectoryStep`` or dicts with seeds/grads/lr) in place.

    ``params`` must hold the BASE values of the tuned tensors in the live run's
    order, dtype and device type; the result is then bit-identical to the
    live run's weights after the same steps.
    """
    if isinstance(params, TunedParams):
        tensors: Sequence[torch.Tensor] = params.tensors
    elif isinstance(params, Mapping):
        tensors = list(params.values())
    else:
        tensors = list(params)
    state = ZOState()
    for step in trajectory:
        seeds, grads, lr = _step_fields(step)
        if len(seeds) != len(grads) or not seeds:
            raise ConfigError(f"trajectory step has {len(seeds)} seeds but {len(grads)} grads")
        apply_update(tensors, [int(s) for s in seeds], [float(g) for g in grads], float(lr), config, state)
        state.step += 1
