"""The shared task types: a row, an example, a task's splits and the spec that turns rows into examples.

Built-in tasks (:mod:`layerzo.data.tasks`) and user YAML tasks
(:mod:`layerzo.data.user_tasks`) both build :class:`TaskSpec` s; neither
imports the other's module for these types.

``Example.context + Example.candidates[i]`` is exactly MeZO's verbalized text
for candidate ``i``; ``candidates[label]`` is the correct one.

A generative example (SQuAD, DROP, prompt/completion data) is the same type with
ONE candidate, the teacher-forced target (MeZO: ``" {first answer}\n"``), and
``answers``, the gold answers generations are scored against (F1 / exact match,
max over the answers). A chat example (``messages`` rows) carries its turns in
``messages`` and an empty context until :func:`layerzo.data.chat.render_chat`
renders it with the tokenizer's chat template.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerzo.data import templates
from layerzo.errors import DataRowError, TaskError

Row = dict[str, Any]


@dataclass(frozen=True)
class Example:
    context: str  # prompt shared by all candidates (MeZO templates' encode())
    candidates: tuple[str, ...]  # continuations appended verbatim: full text = context + candidates[i]
    label: int  # index of the correct candidate
    source: str = ""  # "path:line" for messages
    answers: tuple[str, ...] = ()  # generative examples: the gold answers (non-empty); choice examples: ()
    messages: tuple[tuple[str, str], ...] = ()  # chat examples before rendering: (role, content), last = assistant

    @property
    def generative(self) -> bool:
        return bool(self.answers)


@dataclass(frozen=True)
class TaskSplits:
    name: str
    train: tuple[Example, ...]
    dev: tuple[Example, ...]
    test: tuple[Example, ...]
    generative: bool = False  # examples are (prompt, target, answers): scored by F1 / EM of greedy generations
    stop: tuple[str, ...] = ()  # generation stops at the first of these strings (and at the tokenizer's EOS)
    chat: bool = False  # examples still hold messages: render them with the tokenizer's chat template first


def _one_row(row: Row, where: str) -> list[Row]:
    return [row]


def _same(row: Row) -> Row:
    return row


@dataclass(frozen=True)
class TaskSpec:
    """How one task's rows become :class:`Example` s.

    ``prepare`` reshapes a raw row (original layout) into the flat rows the
    template reads; each flat row must hold the string ``fields`` and a
    ``label`` equal (value AND type) to one of ``label_values``, whose
    position is the candidate index.
    """

    name: str
    hf_dataset: tuple[str, str | None] | None  # (path, config or None) for datasets.load_dataset; None: files only
    label_names: tuple[str, ...]  # readable names, candidate order
    label_values: tuple[Any, ...]  # raw "label" values as stored in the files, candidate order
    fields: tuple[str, ...]  # string fields passed to `template` as keywords
    template: Callable[..., templates.Prompt]
    prepare: Callable[[Row, str], list[Row]] = _one_row  # (raw row, "path:line") -> flat rows
    from_hf: Callable[[Row], Row] = _same  # HF row (label already decoded) -> original layout
    files: tuple[tuple[str, Path], ...] = ()  # (split, file) pairs: user tasks only; built-ins use data_dir
    generative: bool = False  # flat rows hold "target" (str, teacher-forced) and "answers" (non-empty str list)
    stop: tuple[str, ...] = ()  # generations stop at the first of these strings (generative tasks)
    # TRL-style rows (prompt/completion, messages) carry their own target: such a row becomes its
    # examples directly, without fields, template or labels (layerzo.data.datafile)
    row_examples: Callable[[Row, str], list[Example]] | None = None

    def __post_init__(self) -> None:
        if len(self.label_names) != len(self.label_values):
            raise TaskError(f"task {self.name!r}: {len(self.label_names)} label names "
                            f"for {len(self.label_values)} label values")

    def examples(self, row: Any, where: str) -> list[Example]:
        """All examples of one raw row; bad rows raise DataRowError naming ``where``."""
        if not isinstance(row, dict):
            raise DataRowError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if self.row_examples is not None:
            return self.row_examples(row, where)
        out = []
        for flat in self.prepare(row, where):
            values = {name: need_field(flat, name, str, where) for name in self.fields}
            try:
                context, candidates = self.template(**values)
            except ValueError as e:
                raise DataRowError(f"{where}: {e}") from None
            except KeyError as e:  # a template slot the task's fields do not provide
                raise DataRowError(f"{where}: the prompt template uses {{{e.args[0]}}}, which the row does not give") from None
            out.append(generative_example(context, flat, where) if self.generative
                       else Example(context, candidates, self.label_index(flat, where), where))
        return out

    def label_index(self, row: Row, where: str) -> int:
        if "label" not in row:
            raise DataRowError(f"{where}: missing field 'label'")
        value = row["label"]
        for i, known in enumerate(self.label_values):
            if type(value) is type(known) and value == known:  # type check: True must not pass for 1
                return i
        allowed = ", ".join(json.dumps(v) for v in self.label_values)
        raise DataRowError(f"{where}: label {json.dumps(value)} is not one of {allowed}")


def generative_example(prompt: str, flat: Row, where: str) -> Example:
    """A generative example from a flat row's ``target`` and ``answers`` (both checked: no empty target)."""
    target = need_field(flat, "target", str, where)
    if not target.strip():
        raise DataRowError(f"{where}: the target (completion) is empty")
    answers = need_field(flat, "answers", list, where)
    if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise DataRowError(f"{where}: field 'answers' should be a non-empty list of non-empty strings")
    return Example(prompt, (target,), 0, where, tuple(answers))


def parse_json(text: str, where: str, error: type = DataRowError) -> Any:
    """``json.loads(text)``; a malformed, too deeply nested or too-many-digit document is one ``error`` line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:  # thousands of nested brackets
        raise error(f"{where}: JSON nested too deeply to be a data row") from None
    except ValueError as e:  # Python's int-digit limit: a number with over 4300 digits
        raise error(f"{where}: invalid JSON ({str(e).split(':')[0]})") from None


def need_field(obj: Row, key: str, kind: type, where: str, prefix: str = "") -> Any:
    """``obj[key]`` checked to be a ``kind``; errors name the dotted field path."""
    name = prefix + key
    if key not in obj:
        raise DataRowError(f"{where}: missing field {name!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataRowError(f"{where}: field {name!r} should be {_KIND_NAMES.get(kind, kind.__name__)}, "
                           f"got {type(value).__name__} {json.dumps(value)[:40]}")
    return value


_KIND_NAMES = {str: "a string", int: "an integer", dict: "an object", list: "a list"}
