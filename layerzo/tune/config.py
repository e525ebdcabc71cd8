"""Recipes: a YAML file whose keys are exactly the fields of :class:`layerzo.tune.loop.TuneConfig`.

``load_recipe`` → dict of known fields (unknown keys refused with "did you
mean"), ``build_config(recipe, overrides)`` → TuneConfig (CLI options override
recipe values, which override the defaults), ``dump_recipe`` writes a config
back (atomically). Values are coerced to the field's type where YAML is loose:
``lr: 1e-4`` (a string in YAML 1.1) becomes a float, ``layers: 5`` or
``layers: [3, 7]`` become ``"5"`` / ``"3,7"``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from pathlib import Path
from typing import Any, Mapping

from layerzo.core.atomic import atomic_write_text
from layerzo.errors import ConfigError
from layerzo.tune.loop import TuneConfig


def recipe_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TuneConfig))


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TuneConfig)
    return {name: hints[name] for name in recipe_fields()}


def _coerce(name: str, value: Any, hint: Any, where: str) -> Any:
    args = set(typing.get_args(hint))
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {name} may not be null")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {name} must be true or false, got {value!r}")
    if base is int:
        if type(value) is int:
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: {name} must be an integer, got {value!r}")
    if base is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: {name} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {name} must be a number, got {value!r}") from None
        if math.isnan(number):
            raise ConfigError(f"{where}: {name} must be a number, got {value!r}")
        return number
    if base is str:
        if name == "layers" and isinstance(value, list) and all(type(v) is int for v in value):
            return ",".join(str(v) for v in value)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: {name} must be a string, got {value!r}")
    return value


def validate_recipe(data: Mapping[str, Any], where: str = "recipe") -> dict[str, Any]:
    """Check keys and coerce values; returns a plain dict of TuneConfig fields."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of TuneConfig fields, got {type(data).__name__}")
    types = _field_types()
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in types:
            close = difflib.get_close_matches(str(key), list(types), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(types)}"
            raise ConfigError(f"{where}: unknown key {key!r}", hint)
        out[key] = _coerce(key, value, types[key], where)
    return out


def shipped_recipe_names() -> list[str]:
    """Names of the tune recipes installed with layerzo (``recipes/*.yaml`` in the source tree)."""
    from layerzo.recipe_files import shipped

    return sorted(f.stem for f in shipped().glob("*.yaml"))


def shipped_recipe(name: str) -> Path | None:
    """The shipped recipe called ``name`` (with or without .yaml), or None."""
    from layerzo.recipe_files import shipped

    stem = Path(name).stem if Path(name).suffix in (".yaml", ".yml") else name
    path = shipped(f"{stem}.yaml")
    return path if path.is_file() else None


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a recipe YAML file, or a shipped recipe by name (``smollm2-135m``)."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file() and p.parent == Path("."):  # a bare name: one of the recipes shipped with layerzo
        p = shipped_recipe(p.name) or p
    if not p.is_file():
        raise ConfigError(f"recipe {p} does not exist",
                          f"pass a YAML file, or a shipped recipe: {', '.join(shipped_recipe_names())}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"recipe {p} is not valid YAML{at}") from None
    return validate_recipe(data or {}, where=f"recipe {p}")


def build_config(recipe: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None) -> TuneConfig:
    """defaults ← recipe ← overrides (``None`` override values mean "not given")."""
    merged = dict(validate_recipe(recipe or {}))
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    merged.update(validate_recipe(given, where="option"))
    return TuneConfig(**merged)


def recipe_text(config: TuneConfig | Mapping[str, Any]) -> str:
    """YAML text of a config (all fields, in declaration order)."""
    import yaml

    data = dataclasses.asdict(config) if isinstance(config, TuneConfig) else dict(config)
    return yaml.safe_dump(data, sort_keys=False)


def dump_recipe(config: TuneConfig | Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``config`` as a recipe YAML file (temp file in the same folder + os.replace)."""
    return atomic_write_text(Path(path).expanduser(), recipe_text(config))
