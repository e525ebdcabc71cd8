"""layerzo's shipped recipes, installed as package data (``layerzo.recipe_files``).

A wheel install has no source tree, so the tune recipes (``*.yaml``), the
example task YAMLs (``tasks/``) and the lm-eval task templates
(``lm_eval/``) travel inside the package: ``layerzo tune --recipe
smollm2-135m`` and ``layerzo eval`` find them wherever layerzo is installed.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped(*parts: str) -> Path:
    """Path of a file or folder shipped in this package (an on-disk install: source tree, editable or wheel)."""
    return Path(str(resources.files(__name__).joinpath(*parts)))
