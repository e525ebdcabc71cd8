"""What a tune run depends on: :class:`TuneConfig`, and recipes (YAML files of its fields).

A config composes the engine's :class:`layerzo.zo.engine.ZOConfig` (lr, eps,
weight decay, q, momentum, schedule, bounds: each field defined once, there)
with the run's own fields. Recipes, CLI options and the patch manifest see it
flat: one key per field, nested configs expanded in place, in declaration order
(:meth:`TuneConfig.to_dict` / :meth:`TuneConfig.from_dict`).

``load_recipe`` → dict of known keys (unknown keys refused with "did you
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from layerzo.core.atomic import atomic_write_text
from layerzo.core.yamlio import read_yaml
from layerzo.data.generation import DEFAULT_MAX_NEW_TOKENS
from layerzo.data.objectives import OBJECTIVES
from layerzo.errors import ConfigError
from layerzo.model.loading import DTYPES
from layerzo.zo.distributed import parse_device_map
from layerzo.zo.engine import ZOConfig

# Fields that change when state is saved, not what is computed: kept out of the
# patch's recipe and of a checkpoint's identity, so a resumed run gives the same bytes.
RESUME_FREE_FIELDS = ("checkpoint_every",)
KEEP_CHOICES = ("best", "last")
SELECT_CHOICES = ("outlier", "sensitivity")
LR_SEARCH_WORDS = ("off", "auto")
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class TuneConfig:
    """Everything a tune run depends on. Recipe keys and CLI options map one to one onto the flat fields."""

    task: str = "sst2"
    model: str | None = None  # checkpoint dir, .gguf, Hub id; None = the SmolLM2-135M demo
    revision: str | None = None
    data_dir: str | None = None
    layers: str = "dominant"  # "dominant" | "auto" (race the candidates) | "all" | "5" | "3,7" | "0-3,11" | "-1"
    select: str = "outlier"  # how "dominant" picks: the first outlier layer, or the ZO sensitivity profile
    lora: bool = False  # LoRA-ZO on the q/v projections of the selected layers
    lora_rank: int = 8
    lora_alpha: float = 16.0
    steps: int = 1000
    batch_size: int = 16
    objective: str = "auto"  # auto (choice for classification, ce for generative) | choice | ce | accuracy | f1 | em
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # generative tasks: the longest greedy answer (dev/test, f1/em)
    zo: ZOConfig = field(default_factory=lambda: ZOConfig(lr=1e-4))  # flat keys lr, eps, ..., max_bad_steps
    lr_search: str = "off"  # "auto" (``lr: auto``, ``--lr auto``): race a grid of rates first; or "1e-4,3e-4,..."
    seed: int = 0
    eval_every: int = 100
    keep: str = "best"  # the patch's weights: "best" (best dev accuracy, step 0 = the base included) or "last"
    num_train: int = 1000
    num_dev: int = 500
    num_test: int = 1000
    eval_batch_size: int = 16
    max_length: int = 512
    dtype: str = "float32"
    device: str = "cpu"
    device_map: str | None = None  # accelerate placement of the frozen model: auto, or a JSON module→device map
    shard_batch: bool = False  # under torchrun: rank r scores batch[r::W] instead of the full batch
    trust_remote_code: bool = False
    cache_lower_layers: bool = True
    prefix_cache_gb: float | None = None  # per-example cache of the lower layers' output; None: 1/4 of RAM (≤ 8 GiB)
    paired_forward: bool | None = None  # one forward of 2B rows for + and − (one tuned layer); None: the device's default
    checkpoint_every: int = 50  # save a resumable checkpoint in OUT.ckpt/ every N steps (0: only on Ctrl-C)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "num_train", "eval_batch_size", "lora_rank", "max_new_tokens"):
            _int_at_least(name, getattr(self, name), 1)
        for name in ("num_dev", "num_test", "seed", "checkpoint_every"):
            _int_at_least(name, getattr(self, name), 0)
        _int_at_least("max_length", self.max_length, 2)
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.select not in SELECT_CHOICES:
            raise ConfigError(f"select must be one of {', '.join(SELECT_CHOICES)}, got {self.select!r}")
        if self.prefix_cache_gb is not None and not (isinstance(self.prefix_cache_gb, (int, float))
                                                     and math.isfinite(self.prefix_cache_gb)
                                                     and 0 <= self.prefix_cache_gb <= 2**40):
            raise ConfigError(f"prefix_cache_gb must be a number of GiB ≥ 0 (0: off), got {self.prefix_cache_gb!r}")
        if not isinstance(self.lr_search, str):
            raise ConfigError(f"lr_search must be off, auto or a comma list of learning rates, got {self.lr_search!r}")
        parse_lr_search(self.lr_search)
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.keep not in KEEP_CHOICES:
            raise ConfigError(f"keep must be one of {', '.join(KEEP_CHOICES)}, got {self.keep!r}")
        if not isinstance(self.layers, str) or not self.layers.strip():
            raise ConfigError(f"layers must be 'dominant', 'all', an index or a list like 3,7; got {self.layers!r}")
        if not isinstance(self.task, str) or not self.task:
            raise ConfigError(f"task must be a task name or a task YAML path, got {self.task!r}")
        if not isinstance(self.zo, ZOConfig):
            raise ConfigError(f"zo must be a ZOConfig, got {type(self.zo).__name__}")
        parse_device_map(self.device_map)

    def to_dict(self) -> dict[str, Any]:
        """The flat recipe: one key per field, the ZO fields in place of ``zo`` (declaration order)."""
        return {name: getattr(owner, name) for name, owner in _flat_owners(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TuneConfig":
        """Build from flat keys (a recipe, CLI options); missing keys take the defaults, unknown ones are refused."""
        unknown = [k for k in values if k not in flat_field_types()]
        if unknown:
            raise ConfigError(f"unknown config key {unknown[0]!r}", _did_you_mean(unknown[0]))
        own = {f.name for f in dataclasses.fields(ZOConfig)}
        zo = ZOConfig.from_mapping(values, defaults=cls().zo)
        return cls(**{k: v for k, v in values.items() if k not in own}, zo=zo)

    def replace(self, **changes: Any) -> "TuneConfig":
        """A copy with some flat fields changed (``config.replace(lr=1e-3, layers="5")``)."""
        return self.from_dict({**self.to_dict(), **changes})

    def recipe(self) -> dict[str, Any]:
        """What the patch manifest records: the flat fields minus :data:`RESUME_FREE_FIELDS`."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUME_FREE_FIELDS}


def parse_lr_search(value: str) -> tuple[float, ...] | str:
    """``"off"``, ``"auto"`` (the :func:`lr_grid` rule), or a comma list of ≥ 2 distinct positive rates."""
    text = str(value).strip().lower()
    if text in LR_SEARCH_WORDS:
        return text
    try:
        rates = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"lr_search must be off, auto or a comma list of learning rates, got {value!r}") from None
    if len(rates) < 2 or len(set(rates)) != len(rates) or not all(math.isfinite(r) and r > 0 for r in rates):
        raise ConfigError(f"lr_search needs at least 2 distinct positive learning rates, got {value!r}")
    return rates


def _flat_owners(config: TuneConfig) -> Iterator[tuple[str, Any]]:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from ((g.name, value) for g in dataclasses.fields(value))
        else:
            yield f.name, config


def flat_field_types() -> dict[str, Any]:
    """Flat key → type hint, in declaration order (nested configs expanded in place)."""
    hints = typing.get_type_hints(TuneConfig)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(TuneConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(typing.get_type_hints(hints[f.name]))
        else:
            out[f.name] = hints[f.name]
    return out


def recipe_fields() -> tuple[str, ...]:
    """The flat keys of a recipe (= the tune CLI's recipe options)."""
    return tuple(flat_field_types())


def _did_you_mean(key: str) -> str:
    names = list(flat_field_types())
    close = difflib.get_close_matches(str(key), names, n=1)
    return f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(names)}"


def _int_at_least(name: str, value: Any, low: int) -> None:
    """An int in [low, INT64_MAX]: counts and seeds reach torch, whose integers are 64-bit."""
    if type(value) is not int or value < low:
        raise ConfigError(f"{name} must be an integer ≥ {low}, got {value!r}")
    if value > INT64_MAX:
        raise ConfigError(f"{name} must be at most {INT64_MAX} (a 64-bit integer), got {value}")


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
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int past float range (10**400)
            raise ConfigError(f"{where}: {name} must be a number, got {str(value)[:40]!r}") from None
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
    """Check keys and coerce values; returns a plain dict of flat TuneConfig keys."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of TuneConfig fields, got {type(data).__name__}")
    types = flat_field_types()
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in types:
            raise ConfigError(f"{where}: unknown key {key!r}", _did_you_mean(key))
        if key == "lr" and isinstance(value, str) and value.strip().lower() == "auto":
            if str(data.get("lr_search", "auto")).strip().lower() == "off":
                raise ConfigError(f"{where}: lr auto contradicts lr_search off", "give one of them")
            out.setdefault("lr_search", "auto")  # ``lr: auto`` is short for ``lr_search: auto``
            continue
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
    p = Path(path).expanduser()
    if not p.is_file() and p.parent == Path("."):  # a bare name: one of the recipes shipped with layerzo
        p = shipped_recipe(p.name) or p
    if p.is_dir():
        raise ConfigError(f"recipe {p} is a folder, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"recipe {p} does not exist",
                          f"pass a YAML file, or a shipped recipe: {', '.join(shipped_recipe_names())}")
    data = read_yaml(p, ConfigError, "recipe")
    return validate_recipe(data or {}, where=f"recipe {p}")


def build_config(recipe: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None) -> TuneConfig:
    """defaults ← recipe ← overrides (``None`` override values mean "not given")."""
    merged = dict(validate_recipe(recipe or {}))
    given = validate_recipe({k: v for k, v in (overrides or {}).items() if v is not None}, where="option")
    if "lr" in given and "lr_search" not in given:
        merged.pop("lr_search", None)  # a fixed --lr wins over the recipe's ``lr: auto``
    merged.update(given)
    return TuneConfig.from_dict(merged)


def config_from_options(recipe: str | os.PathLike | None, options: Mapping[str, Any]) -> TuneConfig:
    """The tune CLI's config: defaults ← ``recipe`` (a file or shipped name) ← the recipe keys of ``options``.

    ``options`` may hold other entries (``out``, ``--quiet``, ...): only recipe
    keys are taken, and a ``None`` value means "not given".
    """
    overrides = {k: options[k] for k in recipe_fields() if k in options}
    return build_config(load_recipe(recipe) if recipe else None, overrides)


def recipe_text(config: TuneConfig | Mapping[str, Any]) -> str:
    """YAML text of a config (all fields, in declaration order)."""
    import yaml

    data = config.to_dict() if isinstance(config, TuneConfig) else dict(config)
    return yaml.safe_dump(data, sort_keys=False)


def dump_recipe(config: TuneConfig | Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``config`` as a recipe YAML file (temp file in the same folder + os.replace)."""
    return atomic_write_text(Path(path).expanduser(), recipe_text(config))
