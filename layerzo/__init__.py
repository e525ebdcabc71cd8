"""layerzo: dominant-layer zeroth-order fine-tuning.

The public API is importable from the package root; the heavy modules (torch,
transformers) load lazily on first attribute access so ``import layerzo`` and
``layerzo --help`` stay instant.
"""

from __future__ import annotations

import importlib
from typing import Any

from layerzo.version import __version__

# public name -> "module:attribute" (imported on first use)
_LAZY = {
    "load": "layerzo.api:load",
    "LayerPatch": "layerzo.patch.format:LayerPatch",
    "load_model": "layerzo.model.loading:load_model",
    "profile_model": "layerzo.profile.run:profile_model",
    "load_task": "layerzo.data.tasks:load_task",
    "LayerzoError": "layerzo.errors:LayerzoError",
    "compare_generations": "layerzo.eval.compare:compare_generations",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'layerzo' has no attribute {name!r}")
    module, attr = target.split(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
