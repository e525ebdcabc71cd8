"""Data-parallel ZO on ``torch.distributed``: W ranks = W directions, O(W) scalars per step.

Launched with ``torchrun --nproc_per_node=W``. Every rank holds a full replica
of the model and the same tuned weights θ. One step with step seed s and q
directions per rank (Q = q·W directions in all):

    seeds = direction_seeds(s, Q)                 same on every rank
    rank r evaluates L±_j for j in [r·q, (r+1)·q)  on its batch (full, or its shard)
    all ranks all-gather the 2·Q losses           float64, rank order = direction order
    every rank runs the engine's own step on the gathered losses → identical θ

Only losses travel: 2·q float64 per rank per step (16·Q bytes gathered), never a
weight tensor. Seeds are not sent at all: each rank derives all Q of them from
the shared step seed. The last line reuses :func:`layerzo.zo.engine.zo_step`, fed the
gathered losses instead of live forwards, so the projected gradients, the
rejection of a non-finite / runaway step, the ``DivergenceError`` streak and
the update itself are the single-process code, run on identical inputs on every
rank: every rank takes the same decision, and with the full batch on every
rank the result is bit-identical to one process running ``q = Q`` (same seeds,
same update order), which is also what the trajectory records and replays.

Batch. By default every rank scores the FULL batch, as MeZO's q-SPSA does for
its q directions: W ranks buy W× more directions per step at the same
wall-clock. ``shard_batch=True`` gives rank r the examples ``batch[r::W]``
instead: each direction is then estimated on B/W examples (W× less compute per
rank, noisier per-direction estimates); its single-process definition is
:func:`emulate_step`.

The scalar exchange always uses a gloo (CPU) group, also when the model runs
on GPUs with an NCCL default group: the payload is a handful of Python floats
that already live on the host, so there is no device copy to make.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from layerzo.zo import engine as zo
from layerzo.errors import ConfigError, DivergenceError
from layerzo.core.hashing import combine_sha256, tensor_sha256

LossFn = Callable[[], float]


def env_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when not launched by torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def is_main_process() -> bool:
    """True unless torchrun launched this process as a rank other than 0 (for CLI printing)."""
    return _env_int("RANK", 0) == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {value!r}") from None


# ----------------------------------------------------------------------------- the rank's view
@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel run (``world_size == 1``: a plain single process).

    ``distributed`` is True inside an initialised process group (also a
    1-process one, which tests use); ``group`` is the gloo group for the scalar
    exchange (None: the default group). All methods are collective when
    ``active``: every rank must call them in the same order.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    shard_batch: bool = False
    distributed: bool = False
    group: Any = None

    def __post_init__(self) -> None:
        if not (isinstance(self.world_size, int) and self.world_size >= 1):
            raise ConfigError(f"world_size must be an integer ≥ 1, got {self.world_size!r}")
        if not (isinstance(self.rank, int) and 0 <= self.rank < self.world_size):
            raise ConfigError(f"rank must be in [0, {self.world_size}), got {self.rank!r}")

    @property
    def active(self) -> bool:
        return self.distributed

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the patch, the trajectory and the metrics."""
        return self.rank == 0

    # --------------------------------------------------------------- data
    def shard(self, items: Sequence) -> list:
        """This rank's part of a batch: all of it, or ``items[rank::world_size]`` with ``shard_batch``."""
        if not (self.active and self.shard_batch):
            return list(items)
        if len(items) < self.world_size:
            raise ConfigError(
                f"batch of {len(items)} examples cannot be sharded over {self.world_size} ranks",
                f"use --batch-size ≥ {self.world_size} or drop --shard-batch",
            )
        return list(items[self.rank :: self.world_size])

    def device(self, device: str) -> str:
        """``cuda`` → ``cuda:LOCAL_RANK`` under torchrun (one replica per GPU); else unchanged."""
        return f"cuda:{self.local_rank}" if self.active and device == "cuda" else device

    # --------------------------------------------------------------- the step
    def zo_step(self, params: zo.TunedParams, loss_fn: LossFn, step_seed: int, config: zo.ZOConfig,
                state: zo.ZOState, **step_options) -> zo.StepResult:
        """One data-parallel SPSA step; returns the same :class:`StepResult` on every rank.

        ``config.q`` is the number of directions PER RANK; the result (and the
        trajectory entry built from it) holds all ``q·world_size`` seeds and grads.
        Single-process (``world_size == 1``) this is exactly :func:`layerzo.zo.engine.zo_step`.
        """
        if not self.active:  # step_options: zo_step's total_steps, z_cache_max_bytes and pair_loss
            return zo.zo_step(params, loss_fn, step_seed, config, state, **step_options)
        step_options.pop("pair_loss", None)  # ranks evaluate their own directions one sign at a time
        total = config.q * self.world_size
        mine = zo.direction_seeds(step_seed, total)[self.rank * config.q : (self.rank + 1) * config.q]
        local = evaluate_directions(params, loss_fn, mine, config.eps)
        gathered = self.all_gather_floats(local)
        return step_from_losses(params, gathered, step_seed, config_for_total(config, total), state, **step_options)

    def all_gather_floats(self, values: Sequence[float]) -> list[float]:
        """Concatenate every rank's ``values`` (same length on all ranks) in rank order.

        float64 round-trips a Python float exactly, NaN and inf included.
        """
        if not self.active:
            return [float(v) for v in values]
        import torch.distributed as dist

        mine = torch.tensor([float(v) for v in values], dtype=torch.float64)
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine, group=self.group)
        return torch.cat(parts).tolist()

    # --------------------------------------------------------------- evaluation / checks
    def eval_set(self, make: Callable[[Sequence], Any], examples: Sequence) -> Any:
        """An evaluation set over ``examples`` whose ``.evaluate(...)`` is the same on every rank.

        ``make(examples)`` builds a single-process set (``.size``, ``.metric``,
        ``.evaluate(*args) -> {metric: mean} | None``, e.g. :class:`layerzo.tune.batches.EvalSet`).
        Under torchrun each rank builds it on ``examples[rank::W]`` only, and the
        per-example sums are added up: W× faster evaluation.
        """
        return _ShardedEvalSet(self, make, examples) if self.active else make(examples)

    def all_gather_sha256(self, hex_digest: str) -> list[str]:
        """Every rank's sha256 hex digest in rank order (32 bytes per rank as a uint8 tensor, no pickle)."""
        if not self.active:
            return [hex_digest]
        import torch.distributed as dist

        mine = torch.frombuffer(bytearray(bytes.fromhex(hex_digest)), dtype=torch.uint8)
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine, group=self.group)
        return [bytes(p.tolist()).hex() for p in parts]

    def check_same(self, what: str, value: str) -> None:
        """Raise ConfigError on every rank if the ranks disagree on ``value`` (a config, a weight hash)."""
        digests = self.all_gather_sha256(hashlib.sha256(value.encode()).hexdigest())
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        if bad:
            raise ConfigError(f"ranks disagree on the {what}: rank {bad[0]} differs from rank 0",
                              "launch every rank with the same options, model and data")

    def check_final_weights(self, params: zo.TunedParams) -> list[str]:
        """Every rank's :func:`weights_digest` (rank order); DivergenceError if any differs from rank 0's.

        Ranks apply identical updates, so a mismatch means non-deterministic
        forwards across ranks (different GPU models, kernels or library versions).
        """
        digests = self.all_gather_sha256(weights_digest(params))
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        if bad:
            raise DivergenceError(f"rank {bad[0]} ended with different tuned weights than rank 0",
                                  "run every rank on the same GPU model, driver and library versions")
        return digests

    def summary(self, q: int) -> dict[str, Any] | None:
        """What the manifest records about the data-parallel run (None single-process)."""
        if not self.active:
            return None
        return {"world_size": self.world_size, "directions_per_step": q * self.world_size,
                "shard_batch": self.shard_batch, "bytes_per_step": bytes_per_step(self.world_size, q)}

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier(group=self.group)


class _ShardedEvalSet:
    """This rank's 1/W of an evaluation set; ``evaluate`` sums the per-example scores of all ranks (collective)."""

    def __init__(self, dp: DataParallel, make: Callable[[Sequence], Any], examples: Sequence) -> None:
        self.dp, self.size = dp, len(examples)
        self.local = make(list(examples[dp.rank :: dp.world_size]))
        self.metric = self.local.metric
        self.key = ("rank", dp.rank, dp.world_size, getattr(self.local, "key", None))
        self.truncated = getattr(self.local, "truncated", 0)

    def evaluate(self, *args, **kwargs) -> dict | None:
        if not self.size:  # the same on every rank: no collective is skipped by one rank only
            return None
        local = self.local.evaluate(*args, **kwargs) if self.local.size else None
        names = sorted(local) if local is not None else None
        names = names or (["acc"] if self.metric == "acc" else ["em", "f1"])
        # mean·size: accuracy counts come back exactly after rounding (far below 2**52 examples)
        sums = [local[n] * self.local.size if local is not None else 0.0 for n in names]
        totals = [0.0] * len(names)
        for rank_values in chunked(self.dp.all_gather_floats(sums), len(names)):
            totals = [t + v for t, v in zip(totals, rank_values)]
        if self.metric == "acc":
            totals = [float(round(t)) for t in totals]
        return {n: t / self.size for n, t in zip(names, totals)}


def chunked(values: Sequence[float], size: int) -> list[list[float]]:
    """``values`` in consecutive groups of ``size`` (one group per rank)."""
    return [list(values[i:i + size]) for i in range(0, len(values), size)]


# ----------------------------------------------------------------------------- pure pieces
def config_for_total(config: zo.ZOConfig, total: int) -> zo.ZOConfig:
    """The engine config of the combined step: ``q`` = all directions of all ranks."""
    return config if config.q == total else dataclasses.replace(config, q=total)


def evaluate_directions(params: zo.TunedParams, loss_fn: LossFn, seeds: Sequence[int], eps: float) -> list[float]:
    """``[L+_0, L-_0, L+_1, L-_1, ...]`` for ``seeds``, in the engine's evaluation order; θ is untouched."""
    losses: list[float] = []
    for s in seeds:
        with zo.perturbed(params, s, eps):
            losses.append(float(loss_fn()))
        with zo.perturbed(params, s, -eps):
            losses.append(float(loss_fn()))
    return losses


def step_from_losses(params: zo.TunedParams, losses: Sequence[float], step_seed: int, config: zo.ZOConfig,
                     state: zo.ZOState, **step_options) -> zo.StepResult:
    """Run the engine's :func:`zo_step` on already-measured losses (``2·config.q`` of them).

    zo_step asks its loss function for L+ then L- per direction, in seed
    order; answering from ``losses`` in that order makes it compute the same
    g_j, take the same accept/reject decision and apply the same update as if
    it had run the forwards itself. Its perturbation hooks are installed but
    no forward runs, so nothing is computed twice.
    """
    if len(losses) != 2 * config.q:
        raise ValueError(f"expected {2 * config.q} losses (L+, L- per direction), got {len(losses)}")
    replay = iter(losses)
    result = zo.zo_step(params, lambda: next(replay), step_seed, config, state, **step_options)
    if next(replay, None) is not None:  # the engine changed how it evaluates: fail loudly, never silently
        raise RuntimeError("zo_step consumed fewer losses than 2·q; update layerzo.zo.distributed")
    return result


def emulate_step(params: zo.TunedParams, loss_fns: Sequence[LossFn], step_seed: int, config: zo.ZOConfig,
                 state: zo.ZOState, **step_options) -> zo.StepResult:
    """Single-process definition of a data-parallel step over ``len(loss_fns)`` virtual ranks.

    Rank r's directions are scored with ``loss_fns[r]`` (its batch or shard).
    With one shared loss function this is ``zo_step`` with ``q = q·W``.
    """
    world = len(loss_fns)
    total = config.q * world
    seeds = zo.direction_seeds(step_seed, total)
    losses: list[float] = []
    for r, fn in enumerate(loss_fns):
        losses += evaluate_directions(params, fn, seeds[r * config.q : (r + 1) * config.q], config.eps)
    return step_from_losses(params, losses, step_seed, config_for_total(config, total), state, **step_options)


def weights_digest(params: zo.TunedParams) -> str:
    """One sha256 over the tuned tensors (name + :func:`tensor_sha256`), for cross-rank checks."""
    return combine_sha256(f"{n}:{tensor_sha256(t)}" for n, t in zip(params.names, params.tensors))


def config_digest(config: Any) -> str:
    """Stable text of a config dataclass, for :meth:`DataParallel.check_same`."""
    fields = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return json.dumps(fields, sort_keys=True, default=str)


def bytes_per_step(world_size: int, q: int = 1) -> int:
    """Payload every rank receives per step: 2·q float64 losses from each of the W ranks."""
    return 2 * q * 8 * world_size


# ----------------------------------------------------------------------------- big-model placement
DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(spec: str | None) -> str | dict | None:
    """``--device-map``: an accelerate strategy name, a JSON object, or a JSON file of module → device.

    A dict maps module names to ``"cuda:0"``, ``0``, ``"cpu"`` (offloaded to
    RAM) or ``"disk"``, as accepted by ``from_pretrained(device_map=...)``.
    """
    if spec is None or not spec.strip():
        return None
    text = spec.strip()
    if text in DEVICE_MAP_NAMES:
        return text
    if not text.startswith("{"):
        path = os.path.expanduser(text)
        if not os.path.isfile(path):
            raise ConfigError(f"--device-map must be one of {', '.join(DEVICE_MAP_NAMES)}, a JSON object or a "
                              f"JSON file; got {spec!r}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--device-map {spec!r} is not valid JSON: {exc.msg} at character {exc.pos}") from None
    if not isinstance(mapping, dict) or not mapping:
        raise ConfigError(f"--device-map JSON must be a non-empty object of module name → device, got {spec!r}")
    return mapping


def placement(dp: DataParallel, device: str, device_map: str | None) -> tuple[str, str | dict | None]:
    """(device, device_map) for :func:`layerzo.model.loading.load_model` on this rank.

    Under torchrun every rank holds a whole replica, so a device_map may only
    spread it over GPUs no other rank uses: that is the case with one rank per
    node (``--nproc_per_node=1``, the multi-node big-model setup). With several
    ranks per node each rank takes one GPU, ``cuda:LOCAL_RANK``.
    """
    parsed = parse_device_map(device_map)
    if parsed is not None and dp.active and dp.local_world_size > 1:
        raise ConfigError(
            f"--device-map cannot be combined with {dp.local_world_size} ranks per node: every rank would spread "
            "its replica over the same GPUs",
            "use --nproc_per_node=1 per node with --device-map, or --device cuda (rank r uses cuda:LOCAL_RANK)",
        )
    return dp.device(device), parsed


def check_tuned_placement(model: torch.nn.Module, layout, layers: Sequence[int]) -> str:
    """The device type ("cuda", "cpu") of the tuned layers; ConfigError if one is offloaded or types mix.

    Called right after loading, before anything reads the tuned weights. ZO
    perturbs and updates them in place, so they must be real resident tensors:
    accelerate's CPU/disk offload keeps a ``meta`` stand-in and reloads the
    weights at each forward, which would discard every update. Tuned layers
    may sit on different GPUs, but not on CPU and GPU at once: z is drawn per
    device type, and the recorded trajectory replays on one.
    """
    from layerzo.model.layers import get_layer

    named = [(layout.key_prefix(i) + n, p) for i in layers for n, p in get_layer(model, layout, i).named_parameters()]
    offloaded = [n for n, p in named if p.device.type == "meta"]
    if offloaded:
        raise ConfigError(f"tuned tensor {offloaded[0]} is offloaded by the device map (on the meta device)",
                          "map the tuned layer to a GPU (or to 'cpu' on a machine without GPUs) in --device-map")
    types = sorted({p.device.type for _, p in named})
    if len(types) > 1:
        raise ConfigError(f"tuned layers are spread over device types {', '.join(types)}",
                          "map every tuned layer to a GPU, or every one to the CPU, in --device-map")
    return types[0] if types else "cpu"


# ----------------------------------------------------------------------------- setup / teardown
def init_data_parallel(*, shard_batch: bool = False, timeout_s: float = 1800.0) -> DataParallel:
    """Join the torchrun job described by the environment (no-op single-process).

    Initialises the default process group if nobody did (gloo; NCCL is not
    needed: only host scalars are exchanged) and makes a gloo group for the
    exchange when the default group uses another backend.
    """
    world = env_world_size()
    if world <= 1:
        return DataParallel(shard_batch=shard_batch)
    import torch.distributed as dist

    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run without torchrun")
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", timeout=timeout)
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    if dist.get_world_size() != world:
        raise ConfigError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} ranks")
    return DataParallel(rank=dist.get_rank(), world_size=world, local_rank=_env_int("LOCAL_RANK", 0),
                        local_world_size=_env_int("LOCAL_WORLD_SIZE", 1), shard_batch=shard_batch,
                        distributed=True, group=group)


def shutdown(dp: DataParallel) -> None:
    """Wait for every rank, then tear the default group down (only if this module made the run distributed)."""
    if not dp.active:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier(group=dp.group)
        dist.destroy_process_group()
