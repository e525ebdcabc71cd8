"""Rebuilding a patch from its ZO trajectory: the proof that a patch is what its recipe says,
and the way a trajectory-only patch (a few KB) gets its weights back.

MeZO's seed trick makes a run reproducible from (seed, projected gradient, lr)
per step: every direction z is regenerated from its seed. Replaying the
recorded steps on the base weights with :func:`layerzo.zo.engine.replay_trajectory`
gives the patch's tensors bit for bit on the device type the run used (the
CPU here). A LoRA patch starts from its adapters' initialisation, which
:func:`layerzo.model.lora.add_lora` regenerates from the recipe's seed (B = 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from layerzo.errors import BaseMismatchError, PatchError
from layerzo.model.layers import layer_parameter_names
from layerzo.model.loading import LoadedModel, load_model
from layerzo.model.lora import add_lora, model_parameter_name, remove_lora
from layerzo.patch.format import LayerPatch, replay_order
from layerzo.patch.manifest import PatchManifest
from layerzo.patch.merge import check_model_identity, fingerprint_mismatches, mismatch_error
from layerzo.zo.engine import ZOConfig, replay_trajectory

REPLAY_DEVICE_TYPES = ("cpu",)  # where this build replays; z drawn on another device type has other bits


@dataclass(frozen=True)
class ReplayResult:
    patch: LayerPatch  # the replayed patch (same manifest, tensors rebuilt from the trajectory)
    max_abs_diff: float | None  # max |replayed - saved| over all tensors (0.0 = bit-exact; None: nothing saved)
    bit_exact: bool | None  # None for a trajectory-only patch: there is nothing to compare with
    steps: int


def zo_config_from_recipe(recipe: dict) -> ZOConfig:
    """The ZOConfig the run used: the recipe's ZO keys. Only momentum and weight decay matter
    to a replay (each step's lr is recorded)."""
    if "lr" not in recipe:
        raise PatchError("the patch recipe records no lr, so its trajectory cannot be replayed")
    return ZOConfig.from_mapping(recipe)


def check_replayable(manifest: PatchManifest) -> None:
    """Refuse a trajectory recorded on a device type whose random numbers this machine cannot reproduce."""
    info = manifest.metrics.get("replay") if isinstance(manifest.metrics.get("replay"), dict) else {}
    device = info.get("device_type", "cpu")
    if device not in REPLAY_DEVICE_TYPES:
        raise PatchError(f"the patch's trajectory was recorded on {device}; its directions replay bit-exactly only "
                         f"there, and layerzo replays on {', '.join(REPLAY_DEVICE_TYPES)}",
                         "use a patch saved with its weights")


def rebuild_tensors(base: str | os.PathLike | None, patch: LayerPatch, *, revision: str | None = None) -> dict:
    """The patch's tensors recomputed from ``base`` and the trajectory (base identity and fingerprints checked first)."""
    import torch

    m = patch.manifest
    check_replayable(m)
    # the run loaded the model in the recipe dtype and tuned fp32 (master) copies
    loaded = load_model(base, dtype=m.recipe.get("dtype", m.dtype), revision=revision)
    check_base(loaded, patch)
    order = replay_order(m)
    if m.kind == "layers":
        expected = [n for i in m.layers for n in layer_parameter_names(loaded.model, loaded.layout, i)]
        start = {n: loaded.model.get_parameter(n) for n in order} if sorted(order) == sorted(expected) else None
    else:
        lora = m.lora or {}
        names = add_lora(loaded.model, loaded.layout, m.layers, r=int(lora["r"]), alpha=float(lora["alpha"]),
                         seed=int(m.recipe.get("seed", 0)))
        start = {n: loaded.model.get_parameter(model_parameter_name(n)) for n in order} if sorted(order) == sorted(names) else None
    if start is None or (patch.tensors and sorted(order) != sorted(patch.tensors)):
        raise PatchError("the patch's tensors are not exactly the replayed parameters of its layers")
    master = getattr(torch, m.metrics.get("replay", {}).get("master_dtype", m.dtype))
    tensors = {n: t.detach().to(master, copy=True) for n, t in start.items()}
    remove_lora(loaded.model)
    replay_trajectory(tensors, patch.trajectory, zo_config_from_recipe(m.recipe))
    return {n: t.to(getattr(torch, m.dtype)) for n, t in tensors.items()}


def check_base(loaded: LoadedModel, patch: LayerPatch) -> None:
    """Replaying on the wrong base proves nothing: architecture, layer count and every fingerprint must match."""
    m = patch.manifest
    archs = list(getattr(getattr(loaded.model, "config", None), "architectures", None) or [])
    check_model_identity(patch, archs, loaded.layout.num_layers)
    params = dict(loaded.model.named_parameters())
    missing = [k for k in m.base_fingerprint if k not in params]
    if missing:
        raise BaseMismatchError(f"the base has no tensor {missing[0]}; the patch was made for {m.base_model}")
    bad = fingerprint_mismatches(m, params)
    if bad:
        raise mismatch_error(m, bad[0], params[bad[0]])


def replay_patch(base: str | os.PathLike | None, patch: LayerPatch, *, revision: str | None = None) -> ReplayResult:
    """Re-apply the patch's trajectory to ``base`` and compare with the patch's tensors (if it has them).

    Tensors are replayed in the live run's order (recorded in the manifest). A
    patch with an empty trajectory (no kept step changed the base) replays to the base itself.
    """
    import torch

    tensors = rebuild_tensors(base, patch, revision=revision)
    replayed = LayerPatch(patch.manifest, tensors, patch.trajectory)
    if not patch.weights_included:
        return ReplayResult(patch=replayed, max_abs_diff=None, bit_exact=None, steps=len(patch.trajectory))
    diff = max(float((tensors[n].to(torch.float64) - patch.tensors[n].to(torch.float64)).abs().max()) for n in tensors)
    exact = all(torch.equal(tensors[n], patch.tensors[n]) for n in tensors)
    return ReplayResult(patch=replayed, max_abs_diff=diff, bit_exact=exact, steps=len(patch.trajectory))


def with_weights(patch: LayerPatch, base: str | os.PathLike | None, *, revision: str | None = None) -> LayerPatch:
    """``patch`` itself, or for a trajectory-only patch the same patch with its weights rebuilt from ``base``."""
    if patch.weights_included:
        return patch
    rebuilt = replay_patch(base, patch, revision=revision).patch
    rebuilt.source, rebuilt.source_revision = patch.source, patch.source_revision
    return rebuilt
