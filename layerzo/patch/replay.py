"""Rebuilding a patch from its ZO trajectory: the proof that a patch is what its recipe says.

MeZO's seed trick makes a run reproducible from (seed, projected gradient, lr)
per step: every direction z is regenerated from its seed. Replaying the
recorded steps on the base weights with :func:`layerzo.zo.engine.replay_trajectory`
must give the patch's tensors bit for bit (same device type, same dtype).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from layerzo.errors import PatchError
from layerzo.model.layers import layer_parameter_names
from layerzo.model.loading import load_model
from layerzo.patch.apply import apply_to_model
from layerzo.patch.format import LayerPatch
from layerzo.zo.engine import ZOConfig, replay_trajectory


@dataclass(frozen=True)
class ReplayResult:
    patch: LayerPatch  # the replayed patch (same manifest, tensors rebuilt from the trajectory)
    max_abs_diff: float  # max |replayed - saved| over all tensors (0.0 = bit-exact)
    bit_exact: bool
    steps: int


def zo_config_from_recipe(recipe: dict) -> ZOConfig:
    """The ZOConfig the run used: the recipe's ZO keys. Only momentum and weight decay matter
    to a replay (each step's lr is recorded)."""
    if "lr" not in recipe:
        raise PatchError("the patch recipe records no lr, so its trajectory cannot be replayed")
    return ZOConfig.from_mapping(recipe)


def replay_patch(base: str | os.PathLike | None, patch: LayerPatch, *, revision: str | None = None) -> ReplayResult:
    """Re-apply the patch's trajectory to ``base`` and compare with the patch's tensors.

    The base is loaded in the patch's dtype; tensors are replayed in the live
    run's order (each layer's parameters in module order, layers ascending).
    A patch with an empty trajectory (no kept step changed the base) replays to the base itself.
    """
    import torch

    m = patch.manifest
    if m.kind != "layers":
        raise PatchError(f"replay rebuilds full-layer patches; this one is kind {m.kind!r}")
    config = zo_config_from_recipe(m.recipe)
    info = m.metrics.get("replay") if isinstance(m.metrics.get("replay"), dict) else {}
    # the run loaded the model in recipe dtype and tuned an fp32 (master) copy of the layer
    loaded = load_model(base, dtype=m.recipe.get("dtype", m.dtype), revision=revision)
    # identity + fingerprints first: replaying on the wrong base proves nothing
    apply_to_model(loaded.model, LayerPatch(m, {k: loaded.model.get_parameter(k).detach().to(getattr(torch, m.dtype))
                                                for k in m.base_fingerprint}))
    order = info.get("tensor_order") or [n for i in m.layers for n in layer_parameter_names(loaded.model, loaded.layout, i)]
    if sorted(order) != sorted(patch.tensors):
        missing = sorted(set(patch.tensors) ^ set(order))
        raise PatchError(f"the patch's tensors are not exactly the replayed parameters: {missing[0] if missing else order}")
    master = getattr(torch, info.get("master_dtype", m.dtype))
    tensors = {n: loaded.model.get_parameter(n).detach().to(master, copy=True) for n in order}
    replay_trajectory(tensors, patch.trajectory, config)
    tensors = {n: t.to(patch.tensors[n].dtype) for n, t in tensors.items()}
    diff = 0.0
    for name in order:
        delta = (tensors[name].to(torch.float64) - patch.tensors[name].to(torch.float64)).abs().max()
        diff = max(diff, float(delta))
    exact = all(torch.equal(tensors[n], patch.tensors[n]) for n in order)
    replayed = LayerPatch(m, tensors, patch.trajectory)
    return ReplayResult(patch=replayed, max_abs_diff=diff, bit_exact=exact, steps=len(patch.trajectory))
