"""The one-call Python API: ``model, tokenizer = layerzo.load(base, patch)``."""

from __future__ import annotations

import os
from typing import Any

from layerzo.patch.merge import apply_to_model
from layerzo.model.loading import load_model
from layerzo.patch.format import LayerPatch
from layerzo.patch.replay import with_weights


def load(
    base: str | os.PathLike | None,
    patch: "LayerPatch | str | os.PathLike",
    *,
    dtype: str = "float32",
    device: str = "cpu",
    revision: str | None = None,
    patch_revision: str | None = None,
    token: str | None = None,
    force: bool = False,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load ``base`` (dir, .gguf, Hub id, or None for the demo) with ``patch`` applied in memory.

    ``patch`` is a :class:`LayerPatch`, a patch folder or a Hub repo id. The
    base's architecture, layer count, tensor shapes and fingerprints are checked
    first (:class:`BaseMismatchError`; ``force=True`` skips only the fingerprint
    check). Fingerprints cover the base values in the dtype the patch was made
    from, so load a float32 base for a float32 patch. Returns ``(model, tokenizer)``.
    """
    if not isinstance(patch, LayerPatch):
        patch = LayerPatch.from_pretrained(patch, revision=patch_revision, token=token)
    patch = with_weights(patch, base, revision=revision)  # a trajectory-only patch is rebuilt from the base
    loaded = load_model(base, dtype=dtype, device="cpu", revision=revision, trust_remote_code=trust_remote_code)
    apply_to_model(loaded.model, patch, force=force)
    if device != "cpu":
        loaded.model.to(device)
    return loaded.model, loaded.tokenizer
