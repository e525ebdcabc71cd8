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

A generative task gives a free-text ``target`` instead of ``candidates``::

    template: "Q: {question}\nA:"
    target: " {answer}\n"          # teacher-forced continuation, a template over the row's fields
    answers_field: aliases         # optional: a row field with the gold answer(s), a string or a list;
                                   # default: the rendered target, stripped
    stop: ["\n"]                   # optional; default ["\n"] when the target ends with a newline, else []

A task of TRL-style rows names their ``format`` (``prompt_completion`` or
``messages``, :mod:`layerzo.data.datafile`) instead of a template: its
``train`` and ``validation`` files hold such rows, so the validation file
becomes the test split, as for the built-in tasks.
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
from layerzo.data import datafile, templates
from layerzo.data.spec import Row, TaskSpec
from layerzo.errors import DataRowError, TaskError

KEYS = ("name", "train", "validation", "template", "candidates", "label_field", "label_map",
        "target", "answers_field", "stop", "format")
CHOICE_KEYS = ("candidates", "label_field", "label_map")  # a multiple-choice task's keys
TARGET_KEYS = ("target", "answers_field", "stop")  # a generative (free-text target) task's keys
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
    candidates: tuple[str, ...]  # () for a generative task
    label_keys: tuple[str, ...]
    label_field: str = "label"
    label_map: tuple[tuple[str, str], ...] = ()  # (raw label key, candidate label key)
    target: str | None = None  # generative task: the target template (then candidates are ())
    answers_field: str | None = None  # generative task: the row field of the gold answers
    stop: tuple[str, ...] = ()  # generative task: generations stop at these strings

    def __post_init__(self) -> None:
        where = str(self.source)
        if not self.name.strip():
            raise TaskError(f"{where}: 'name' must not be empty")
        self._check_template()
        if self.target is not None:
            self._check_target()
            return
        if not self.candidates:
            raise TaskError(f"{where}: 'candidates' must list at least one continuation")
        if len(set(self.label_keys)) != len(self.label_keys):
            raise TaskError(f"{where}: candidate labels {list(self.label_keys)} are not distinct")
        for raw, target in self.label_map:
            if target not in self.label_keys:
                raise TaskError(f"{where}: label_map sends {raw!r} to {target!r}, which is not one of "
                                f"the candidate labels {list(self.label_keys)}")
        if self.label_field in self.fields:
            raise TaskError(f"{where}: the template shows the label field '{{{self.label_field}}}'; remove it")

    def _check_template(self) -> None:
        try:
            fields = templates.template_fields(self.template)
        except ValueError as e:
            raise TaskError(f"{self.source}: bad template: {e}") from None
        if not fields:
            raise TaskError(f"{self.source}: the template has no {{field}} slot, so every prompt would be the same")

    def _check_target(self) -> None:
        where = str(self.source)
        if self.candidates:
            raise TaskError(f"{where}: give either 'candidates' (multiple choice) or 'target' (free text), not both")
        try:
            fields = templates.template_fields(self.target or "")
        except ValueError as e:
            raise TaskError(f"{where}: bad target: {e}") from None
        if not fields:
            raise TaskError(f"{where}: the target has no {{field}} slot, so every target would be the same")
        if self.answers_field is not None and not self.answers_field:
            raise TaskError(f"{where}: 'answers_field' must not be empty")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise TaskError(f"{where}: 'stop' should be a list of non-empty strings, got {list(self.stop)}")

    @property
    def fields(self) -> tuple[str, ...]:
        return templates.template_fields(self.template)

    @property
    def target_fields(self) -> tuple[str, ...]:
        return templates.template_fields(self.target) if self.target is not None else ()

    def to_spec(self) -> TaskSpec:
        if self.target is not None:
            return TaskSpec(
                name=self.name, hf_dataset=None, label_names=(), label_values=(), fields=self.fields,
                template=functools.partial(templates.render_user_template, self.template, ()),
                prepare=functools.partial(_prepare_generative, self),
                files=(("train", self.train), ("validation", self.validation)),
                generative=True, stop=self.stop,
            )
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


def _scalar_fields(row: Row, names: tuple[str, ...], where: str) -> dict[str, str]:
    """The named fields of a row as text (numbers and booleans via ``str``); each must be present and scalar."""
    for name in names:
        if name not in row:
            raise DataRowError(f"{where}: missing field {name!r}")
        if not isinstance(row[name], _SCALARS):
            raise DataRowError(f"{where}: field {name!r} should be a string or number, "
                               f"got {type(row[name]).__name__}")
    return {name: str(row[name]) if not isinstance(row[name], str) else row[name] for name in names}


def _prepare(config: UserTaskConfig, row: Row, where: str) -> list[Row]:
    """Template fields as text plus ``label`` as its candidate key (after label_map)."""
    values = _scalar_fields(row, (*config.fields, config.label_field), where)
    flat = {name: values[name] for name in config.fields}
    key = label_key(row[config.label_field])
    if config.label_map:
        mapping = dict(config.label_map)
        if key not in mapping:
            keys = ", ".join(json.dumps(k) for k in mapping)
            raise DataRowError(f"{where}: label {json.dumps(key)} is not in label_map (keys: {keys})")
        key = mapping[key]
    flat["label"] = key
    return [flat]


def _prepare_generative(config: UserTaskConfig, row: Row, where: str) -> list[Row]:
    """Template fields as text, the rendered ``target`` and the gold ``answers`` (field or stripped target)."""
    names = tuple(dict.fromkeys((*config.fields, *config.target_fields)))
    values = _scalar_fields(row, names, where)
    target = (config.target or "").format_map(values)
    if config.answers_field is None:
        answers = [target.strip()]
    elif config.answers_field not in row:
        raise DataRowError(f"{where}: missing field {config.answers_field!r}")
    else:
        raw = row[config.answers_field]
        answers = [raw] if isinstance(raw, str) else raw
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataRowError(f"{where}: field {config.answers_field!r} should be a string or a list of strings, "
                               f"got {json.dumps(raw)[:40]}")
    return [{**{n: values[n] for n in config.fields}, "target": target, "answers": answers}]


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
    data = _read_task_yaml(path)
    base = path.parent
    name = data.get("name") or path.stem
    train, validation = _data_path(base, data["train"]), _data_path(base, data["validation"])
    if "format" in data:
        return _format_task(path, data, name, train, validation)
    if "template" not in data:
        raise TaskError(f"{path}: missing key 'template' (or 'format' for prompt/completion or messages rows)")
    if "target" in data:
        return _target_task(path, data, name, train, validation)
    if "candidates" not in data:
        raise TaskError(f"{path}: missing key 'candidates' (or 'target' for a free-text answer)")
    for key in TARGET_KEYS:
        if key in data:
            raise TaskError(f"{path}: {key!r} belongs to a task with a free-text 'target', "
                            "not to one with 'candidates'")

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
    return UserTaskConfig(
        source=path, name=name, train=train, validation=validation, template=data["template"],
        candidates=texts, label_keys=label_keys, label_field=data.get("label_field", "label"),
        label_map=tuple((label_key(k), label_key(v)) for k, v in label_map.items()),
    ).to_spec()


def _read_task_yaml(path: Path) -> dict:
    """The YAML's mapping: known keys only, data files named, string values where strings belong."""
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
    for key in ("train", "validation"):
        if key not in data:
            raise TaskError(f"{path}: missing key {key!r}")
    for key in ("name", "train", "validation", "template", "label_field", "target", "answers_field", "format"):
        if key in data and not isinstance(data[key], str):
            raise TaskError(f"{path}: {key!r} should be a string, got {type(data[key]).__name__}")
    return data


def _target_task(path: Path, data: dict, name: str, train: Path, validation: Path) -> TaskSpec:
    """A generative user task: ``template`` for the prompt, ``target`` for the continuation."""
    for key in CHOICE_KEYS:
        if key in data:
            why = ("give either 'candidates' or 'target', not both" if key == "candidates"
                   else "a task with a free-text 'target' has no labels")
            raise TaskError(f"{path}: {key!r} does not go with 'target': {why}")
    stop = data.get("stop", ["\n"] if data["target"].endswith("\n") else [])
    if not isinstance(stop, list):
        raise TaskError(f"{path}: 'stop' should be a list of strings, got {type(stop).__name__}")
    return UserTaskConfig(
        source=path, name=name, train=train, validation=validation, template=data["template"],
        candidates=(), label_keys=(), target=data["target"], answers_field=data.get("answers_field"),
        stop=tuple(stop),
    ).to_spec()


def _format_task(path: Path, data: dict, name: str, train: Path, validation: Path) -> TaskSpec:
    """A task of TRL-style rows: the files say everything, so no template, candidates or target."""
    fmt = data["format"]
    if fmt not in datafile.FORMATS:
        raise TaskError(f"{path}: 'format' is {fmt!r}; expected {' or '.join(datafile.FORMATS)}")
    extra = [k for k in ("template", *CHOICE_KEYS, *TARGET_KEYS) if k in data]
    if extra:
        raise TaskError(f"{path}: {extra[0]!r} does not apply to 'format: {fmt}' (its rows hold prompt and target)")
    if not name.strip():
        raise TaskError(f"{path}: 'name' must not be empty")
    return datafile.format_spec(name, (("train", train), ("validation", validation)), fmt)
