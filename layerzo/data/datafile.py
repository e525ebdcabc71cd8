"""User data files in TRL / Hugging Face conventions: prompt/completion or messages rows.

``load_task("data.jsonl")`` reads such a file directly; a task YAML with
``format: prompt_completion`` or ``format: messages`` names a train and a
validation file of them. Two row formats, detected from the rows (every row of
a file must use the same one; the first row decides):

* ``{"prompt": str, "completion": str}``: one generative example, target =
  the completion verbatim, gold answer = the completion stripped;
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``:
  one example PER assistant turn, holding the turns up to and including it;
  :func:`layerzo.data.chat.render_chat` turns them into prompt and target
  with the tokenizer's chat template.

A bare data file has no validation file: :func:`carve` cuts dev and test out
of it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from layerzo.data import templates
from layerzo.data.spec import Example, Row, TaskSpec, need_field, parse_json
from layerzo.errors import DataRowError, TaskError

PROMPT_COMPLETION = "prompt_completion"
MESSAGES = "messages"
FORMATS = (PROMPT_COMPLETION, MESSAGES)
ROLES = ("system", "user", "assistant")
_READABLE = {PROMPT_COMPLETION: "prompt/completion", MESSAGES: "messages"}


def row_format(row: Row, where: str) -> str:
    """The format of one row (:data:`PROMPT_COMPLETION` or :data:`MESSAGES`), from its keys."""
    has_pc = "prompt" in row or "completion" in row
    if has_pc and "messages" in row:
        raise DataRowError(f"{where}: the row has both 'messages' and prompt/completion fields; give one format")
    if "messages" in row:
        return MESSAGES
    if has_pc:
        return PROMPT_COMPLETION
    keys = ", ".join(json.dumps(k) for k in list(row)[:5]) or "none"
    raise DataRowError(f'{where}: expected a prompt/completion row {{"prompt", "completion"}} or a messages row '
                       f'{{"messages": [...]}}; the row has keys {keys}')


def _check_format(row: Row, where: str, expected: str) -> None:
    found = row_format(row, where)
    if found != expected:  # rows are checked in file order, so this is the first row that differs
        raise DataRowError(f"{where}: a {_READABLE[found]} row in a file of {_READABLE[expected]} rows "
                           "(set by its first row, or by the task's format); use one format per file")


def prompt_completion_examples(row: Row, where: str) -> list[Example]:
    """A prompt/completion row's one example: the completion is the target, verbatim."""
    _check_format(row, where, PROMPT_COMPLETION)
    for key in ("prompt", "completion"):
        if isinstance(row.get(key), list):  # TRL's conversational prompt/completion
            raise DataRowError(f"{where}: field {key!r} is a list of messages; conversational prompt/completion "
                               'rows are not supported, write them as {"messages": [...]} rows')
    prompt = need_field(row, "prompt", str, where)
    completion = need_field(row, "completion", str, where)
    if not completion.strip():
        raise DataRowError(f"{where}: field 'completion' is empty")
    return [Example(prompt, (completion,), 0, where, (completion.strip(),))]


def messages_examples(row: Row, where: str) -> list[Example]:
    """A messages row's examples, one per assistant turn; context and candidate stay placeholders
    until :func:`layerzo.data.chat.render_chat` renders the turns."""
    _check_format(row, where, MESSAGES)
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(need_field(row, "messages", list, where)):
        name = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DataRowError(f"{where}: field {name!r} should be an object, got {type(message).__name__}")
        role = need_field(message, "role", str, where, prefix=f"{name}.")
        if role not in ROLES:
            raise DataRowError(f"{where}: {name}.role is {json.dumps(role)[:40]}; expected system, user or assistant")
        content = need_field(message, "content", str, where, prefix=f"{name}.")
        if role == "assistant" and not content.strip():
            raise DataRowError(f"{where}: {name} is an assistant turn with empty content")
        turns.append((role, content))
    out = [Example("", ("",), 0, where, (content.strip(),), tuple(turns[: i + 1]))
           for i, (role, content) in enumerate(turns) if role == "assistant"]
    if not out:
        raise DataRowError(f"{where}: 'messages' has no assistant turn, so the row has nothing to learn")
    return out


ROW_EXAMPLES = {PROMPT_COMPLETION: prompt_completion_examples, MESSAGES: messages_examples}


def no_template() -> templates.Prompt:
    """A TaskSpec needs a template; TRL rows never reach it (their ``row_examples`` builds the examples)."""
    return "", ()


def format_spec(name: str, files: tuple[tuple[str, Path], ...], fmt: str) -> TaskSpec:
    """The spec of a task whose files hold ``fmt`` rows (generative; no fields, labels or template)."""
    if fmt not in FORMATS:
        raise TaskError(f"task {name!r}: unknown row format {fmt!r} (expected {' or '.join(FORMATS)})")
    return TaskSpec(name, None, (), (), (), no_template, files=files, generative=True, row_examples=ROW_EXAMPLES[fmt])


def file_spec(path: Path) -> TaskSpec:
    """The spec of a bare ``.jsonl`` data file (task name = the file's stem), its format from its first row."""
    if path.is_dir():
        raise TaskError(f"data file {path} is a folder, not a .jsonl file")
    if not path.is_file():
        raise TaskError(f"data file not found: {path}")
    return format_spec(path.stem, (("train", path),), first_row_format(path))


def first_row_format(path: Path) -> str:
    """The format of the file's first non-blank row; an empty file reads as prompt/completion (no rows)."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    where = f"{path}:{lineno}"
                    row = parse_json(line, where)
                    if not isinstance(row, dict):
                        raise DataRowError(f"{where}: expected a JSON object, got {type(row).__name__}")
                    return row_format(row, where)
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return PROMPT_COMPLETION


def data_stop(examples: Sequence[Example]) -> tuple[str, ...]:
    """Stop strings of TRL-row examples: ``("\\n",)`` when every completion is one line ending in a
    newline (the model learns to end there), else none (the tokenizer's EOS ends a generation).
    Chat examples get theirs from :func:`layerzo.data.chat.render_chat`."""
    if not examples or any(e.messages for e in examples):
        return ()
    targets = [e.candidates[0] for e in examples]
    return ("\n",) if all(t.endswith("\n") and t.count("\n") == 1 for t in targets) else ()


def carve(examples: Sequence[Example], *, num_train: int, num_dev: int, num_test: int,
          seed: int) -> tuple[tuple[Example, ...], tuple[Example, ...], tuple[Example, ...]]:
    """Train, dev and test cut from ONE file's examples, disjoint, by rows (``source``, so every assistant
    turn of a conversation lands in the same split).

    With ``n`` rows: test = ``min(num_test, n // 5)`` rows, dev = ``min(num_dev,
    n // 5)``, train = ``min(num_train, n - test - dev)``: a small file keeps
    four fifths for training, and a file under 5 rows is all training. One
    seeded shuffle (a private ``random.Random(seed)``) orders the rows; test
    takes the first ones (so it does not move with ``num_train``/``num_dev``)
    and keeps file order, then dev, then train, both in shuffled order.
    """
    rows: dict[str, list[Example]] = {}
    for ex in examples:
        rows.setdefault(ex.source, []).append(ex)
    groups = list(rows.values())
    n = len(groups)
    n_test, n_dev = min(num_test, n // 5), min(num_dev, n // 5)
    n_train = min(num_train, n - n_test - n_dev)
    order = random.Random(seed).sample(range(n), n)

    def take(ids) -> tuple[Example, ...]:
        return tuple(ex for i in ids for ex in groups[i])

    return (take(order[n_test + n_dev:n_test + n_dev + n_train]), take(order[n_test:n_test + n_dev]),
            take(sorted(order[:n_test])))
