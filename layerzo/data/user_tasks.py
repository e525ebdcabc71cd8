"""User tasks: a JSONL file per split plus a small YAML describing the prompt.

Example (``recipes/tasks/example_sentiment.yaml``)::

    name: example_sentiment
    train: ../../tests/fixtures/custom/train.jsonl        # relative to this YAML
    validation: ../../tests/fixtures/custom/validation.jsonl
    template: "Review: {text}\\nSentiment:"              # the context; {field} = a row's field
    candidates: {negative: " negative", positive: " positive"}   # label -> continuation
    label_field: sentiment                                # default: label
    label_map: {neg: negative, pos: positive}             # optional: raw label -> candidate key

``candidates`` is either a mapping (label value -> continuation; the row's
label, after ``label_map``, selects the key) or a list (the label is the
0-based index). Labels are compared as text (``1``, ``"1"`` and a YAML key
``1`` all match; ``true`` matches ``true``), because YAML and JSON disagree on
key types. Continuations are appended to the context verbatim, so put the
leading space in the candidate (``" positive"``) when the template does not
end with one.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from layerzo.core.yamlio import NoAliasLoader, read_yaml
from layerzo.data import templates
from layerzo.data.spec import Row, TaskSpec
from layerzo.errors import DataRowError, TaskError

KEYS = ("name", "train", "validation", "template", "candidates", "label_field", "label_map")
_SCALARS = (str, int, float, bool)


def label_key(value: Any) -> str:
    """The text a label is compared by: strings as-is, other scalars as JSON (``1``, ``true``)."""
    return value if isinstance(value, str) else json.dumps(value)


@dataclass(frozen=True)
class UserTaskConfig:
    """A user task's YAML, validated. ``label_keys[i]`` selects ``candidates[i]``."""

    source: Path  # the YAML file (relative data paths resolve against its folder)
    name: str
    train: Path
    validation: Path
    template: str
    candidates: tuple[str, ...]
    label_keys: tuple[str, ...]
    label_field: str = "label"
    label_map: tuple[tuple[str, str], ...] = ()  # (raw label key, candidate label key)

    def __post_init__(self) -> None:
        where = str(self.source)
        if not self.name.strip():
            raise TaskError(f"{where}: 'name' must not be empty")
        if not self.candidates:
            raise TaskError(f"{where}: 'candidates' must list at least one continuation")
        if len(set(self.label_keys)) != len(self.label_keys):
            raise TaskError(f"{where}: candidate labels {list(self.label_keys)} are not distinct")
        for raw, target in self.label_map:
            if target not in self.label_keys:
                raise TaskError(f"{where}: label_map sends {raw!r} to {target!r}, which is not one of "
                                f"the candidate labels {list(self.label_keys)}")
        try:
            fields = templates.template_fields(self.template)
        except ValueError as e:
            raise TaskError(f"{where}: bad template: {e}") from None
        if not fields:
            raise TaskError(f"{where}: the template has no {{field}} slot, so every prompt would be the same")
        if self.label_field in fields:
            raise TaskError(f"{where}: the template shows the label field '{{{self.label_field}}}'; remove it")

    @property
    def fields(self) -> tuple[str, ...]:
        return templates.template_fields(self.template)

    def to_spec(self) -> TaskSpec:
        return TaskSpec(
            name=self.name,
            hf_dataset=None,
            label_names=self.label_keys,
            label_values=self.label_keys,
            fields=self.fields,
            template=functools.partial(templates.render_user_template, self.template, self.candidates),
            prepare=functools.partial(_prepare, self),
            files=(("train", self.train), ("validation", self.validation)),
        )


def _prepare(config: UserTaskConfig, row: Row, where: str) -> list[Row]:
    """Template fields as text plus ``label`` as its candidate key (after label_map)."""
    for name in (*config.fields, config.label_field):
        if name not in row:
            raise DataRowError(f"{where}: missing field {name!r}")
        if not isinstance(row[name], _SCALARS):
            raise DataRowError(f"{where}: field {name!r} should be a string or number, "
                               f"got {type(row[name]).__name__}")
    flat = {name: str(row[name]) if not isinstance(row[name], str) else row[name] for name in config.fields}
    key = label_key(row[config.label_field])
    if config.label_map:
        mapping = dict(config.label_map)
        if key not in mapping:
            keys = ", ".join(json.dumps(k) for k in mapping)
            raise DataRowError(f"{where}: label {json.dumps(key)} is not in label_map (keys: {keys})")
        key = mapping[key]
    flat["label"] = key
    return [flat]


def _data_path(base: Path, value: str) -> Path:
    """A data path from the YAML: ``~`` expanded, relative ones resolved against the YAML's folder."""
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value) or "\x00" in value:  # no file system can hold these names
        raise TaskError(f"{base}: data path {value[:80]!r} is not a valid file name")
    return Path(os.path.normpath(base / Path(value).expanduser()))


class _Yaml12BoolLoader(NoAliasLoader):
    """SafeLoader where only true/false are booleans (YAML 1.2), not yes/no/on/off.

    Label maps like ``{yes: positive, no: negative}`` must keep their keys as
    the strings that the JSONL rows hold.
    """


_Yaml12BoolLoader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in NoAliasLoader.yaml_implicit_resolvers.items()
}
_Yaml12BoolLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_task_yaml(path: Path) -> TaskSpec:
    """Read and validate a user task YAML; errors name the file and the bad key."""
    if path.is_dir():
        raise TaskError(f"task file {path} is a folder, not a YAML file")
    if not path.is_file():
        raise TaskError(f"task file not found: {path}")
    data = read_yaml(path, TaskError, "task file", loader=_Yaml12BoolLoader)
    if not isinstance(data, dict):
        raise TaskError(f"{path}: expected a mapping with keys {', '.join(KEYS)}")
    unknown = sorted(set(map(str, data)) - set(KEYS))
    if unknown:
        raise TaskError(f"{path}: unknown key {unknown[0]!r} (allowed: {', '.join(KEYS)})")
    for key in ("train", "validation", "template", "candidates"):
        if key not in data:
            raise TaskError(f"{path}: missing key {key!r}")
    for key in ("name", "train", "validation", "template", "label_field"):
        if key in data and not isinstance(data[key], str):
            raise TaskError(f"{path}: {key!r} should be a string, got {type(data[key]).__name__}")

    candidates = data["candidates"]
    if isinstance(candidates, dict):
        label_keys = tuple(label_key(k) for k in candidates)
        texts = tuple(candidates.values())
    elif isinstance(candidates, list):
        label_keys = tuple(str(i) for i in range(len(candidates)))
        texts = tuple(candidates)
    else:
        raise TaskError(f"{path}: 'candidates' should be a list or a mapping label -> text")
    if not all(isinstance(t, str) and t for t in texts):
        raise TaskError(f"{path}: every candidate must be a non-empty string, got {list(texts)}")

    label_map = data.get("label_map") or {}
    if not isinstance(label_map, dict):
        raise TaskError(f"{path}: 'label_map' should be a mapping raw label -> candidate label")

    base = path.parent
    return UserTaskConfig(
        source=path,
        name=data.get("name") or path.stem,
        train=_data_path(base, data["train"]),
        validation=_data_path(base, data["validation"]),
        template=data["template"],
        candidates=texts,
        label_keys=label_keys,
        label_field=data.get("label_field", "label"),
        label_map=tuple((label_key(k), label_key(v)) for k, v in label_map.items()),
    ).to_spec()
