"""TRL-style data files: prompt/completion and messages rows, format detection, row errors naming
file and line, seeded carving of dev/test out of one file, and the stop rule."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from layerzo.data import datafile
from layerzo.data.spec import Example
from layerzo.data.tasks import get_task, load_examples, load_task
from layerzo.errors import DataRowError, TaskError


def write_rows(path: Path, rows: list) -> Path:
    """Rows as JSON Lines; a str row is written as-is (blank lines, broken JSON)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def pc(i: int, completion: str | None = None) -> dict:
    return {"prompt": f"Q{i}: what is {i}+{i}?\nA:", "completion": completion or f" {2 * i}\n"}


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


# ------------------------------------------------------------------ rows


def test_prompt_completion_row_is_one_generative_example():
    (ex,) = datafile.prompt_completion_examples({"prompt": "Q: 2+2?\nA:", "completion": " 4\n"}, "f:1")
    assert ex == Example("Q: 2+2?\nA:", (" 4\n",), 0, "f:1", ("4",))
    assert ex.generative and ex.messages == ()


def test_messages_row_is_one_example_per_assistant_turn():
    row = chat(("system", "Be brief."), ("user", "Capital of France?"), ("assistant", " Paris "),
               ("user", "And Italy?"), ("assistant", "Rome"))
    first, second = datafile.messages_examples(row, "f:4")
    assert first == Example("", ("",), 0, "f:4", ("Paris",),
                            (("system", "Be brief."), ("user", "Capital of France?"), ("assistant", " Paris ")))
    assert second.messages[-1] == ("assistant", "Rome") and len(second.messages) == 5
    assert second.answers == ("Rome",) and second.source == "f:4"


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q"}, "f:7: missing field 'completion'"),
    ({"completion": " 4"}, "f:7: missing field 'prompt'"),
    ({"prompt": "Q", "completion": "  \n"}, "f:7: field 'completion' is empty"),
    ({"prompt": 3, "completion": "x"}, "f:7: field 'prompt' should be a string, got int 3"),
    ({"prompt": [{"role": "user", "content": "Q"}], "completion": "x"}, "f:7: field 'prompt' is a list of messages"),
    ({"prompt": "Q", "completion": "x", "messages": []}, "f:7: the row has both 'messages' and prompt/completion"),
    ({"text": "hello"}, 'f:7: expected a prompt/completion row .* the row has keys "text"'),
])
def test_bad_prompt_completion_rows(row, message):
    with pytest.raises(DataRowError, match=message):
        datafile.prompt_completion_examples(row, "f:7")


@pytest.mark.parametrize("row, message", [
    ({"messages": "hi"}, "f:2: field 'messages' should be a list, got str"),
    ({"messages": ["hi"]}, r"f:2: field 'messages\[0\]' should be an object, got str"),
    ({"messages": [{"content": "hi"}]}, r"f:2: missing field 'messages\[0\]\.role'"),
    ({"messages": [{"role": "user"}]}, r"f:2: missing field 'messages\[0\]\.content'"),
    (chat(("user", "hi"), ("tool", "x")), r'f:2: messages\[1\]\.role is "tool"; expected system, user or assistant'),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
     r"f:2: field 'messages\[1\]\.content' should be a string, got NoneType null"),
    (chat(("user", "hi"), ("assistant", " ")), r"f:2: messages\[1\] is an assistant turn with empty content"),
    (chat(("system", "s"), ("user", "hi")), "f:2: 'messages' has no assistant turn"),
    ({"messages": []}, "f:2: 'messages' has no assistant turn"),
])
def test_bad_messages_rows(row, message):
    with pytest.raises(DataRowError, match=message):
        datafile.messages_examples(row, "f:2")


# ------------------------------------------------------------------ files


def test_a_jsonl_task_detects_prompt_completion(tmp_path):
    path = write_rows(tmp_path / "arith.jsonl", [pc(1), "", pc(2)])
    spec = get_task(path)
    assert spec.name == "arith" and spec.generative and spec.files == (("train", path),)
    examples = load_examples(path, "train")
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:3"]
    assert examples[1] == Example("Q2: what is 2+2?\nA:", (" 4\n",), 0, f"{path}:3", ("4",))
    with pytest.raises(TaskError, match="is the task's only file, so it has no validation split"):
        load_examples(path, "validation")


def test_a_jsonl_task_detects_messages(tmp_path):
    path = write_rows(tmp_path / "chat.jsonl", [chat(("user", "hi"), ("assistant", "hello"))])
    (ex,) = load_examples(path, "train")
    assert ex.messages == (("user", "hi"), ("assistant", "hello")) and ex.context == ""


@pytest.mark.parametrize("first, other, line, found, expected", [
    (pc(1), chat(("user", "a"), ("assistant", "b")), 3, "messages", "prompt/completion"),
    (chat(("user", "a"), ("assistant", "b")), pc(1), 3, "prompt/completion", "messages"),
])
def test_mixed_formats_name_the_first_line_that_differs(tmp_path, first, other, line, found, expected):
    path = write_rows(tmp_path / "mixed.jsonl", [first, first, other, other])
    with pytest.raises(DataRowError) as info:
        load_examples(path, "train")
    assert str(info.value).startswith(f"{path}:{line}: a {found} row in a file of {expected} rows")


def test_bad_rows_in_a_file_name_file_and_line(tmp_path):
    path = write_rows(tmp_path / "bad.jsonl", [pc(1), "", pc(2, completion="  ")])
    with pytest.raises(DataRowError, match=f"^{path}:3: field 'completion' is empty$"):
        load_task(path)
    write_rows(path, [chat(("user", "a"), ("assistant", "b")), chat(("user", "a"), ("critic", "b"))])
    with pytest.raises(DataRowError, match=rf"^{path}:2: messages\[1\]\.role is \"critic\""):
        load_task(path)
    write_rows(path, ['{"prompt": "x", '])
    with pytest.raises(DataRowError, match=f"^{path}:1: invalid JSON"):
        get_task(path)
    write_rows(path, ["[1, 2]"])
    with pytest.raises(DataRowError, match=f"^{path}:1: expected a JSON object, got list"):
        get_task(path)
    path.write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(TaskError, match="not UTF-8"):
        get_task(path)


def test_a_missing_or_empty_data_file(tmp_path):
    with pytest.raises(TaskError, match="data file not found: .*nope.jsonl"):
        load_task(tmp_path / "nope.jsonl")
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(TaskError, match="is a folder, not a .jsonl file"):
        get_task(tmp_path / "dir.jsonl")
    write_rows(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(TaskError, match="empty training set"):
        load_task(tmp_path / "empty.jsonl")


# ------------------------------------------------------------------ carving and stop


def examples_of(n: int, turns_per_row: int = 1) -> list[Example]:
    return [Example("", ("",), 0, f"f:{i}", (f"a{t}",), (("user", "q"), ("assistant", f"a{t}")))
            for i in range(1, n + 1) for t in range(turns_per_row)]


@pytest.mark.parametrize("n, sizes, expected", [
    (100, (1000, 500, 1000), (60, 20, 20)),  # small file: a fifth each for dev and test
    (100, (10, 5, 8), (10, 5, 8)),
    (4, (1000, 500, 1000), (4, 0, 0)),  # under 5 rows: all training
    (5, (1000, 500, 1000), (3, 1, 1)),
    (10, (2, 0, 0), (2, 0, 0)),
])
def test_carve_sizes(n, sizes, expected):
    num_train, num_dev, num_test = sizes
    train, dev, test = datafile.carve(examples_of(n), num_train=num_train, num_dev=num_dev, num_test=num_test, seed=0)
    assert (len(train), len(dev), len(test)) == expected


def test_carve_is_seeded_disjoint_and_keeps_conversations_together():
    examples = examples_of(50, turns_per_row=2)
    state = random.getstate()
    a = datafile.carve(examples, num_train=100, num_dev=100, num_test=100, seed=3)
    assert random.getstate() == state
    assert a == datafile.carve(examples, num_train=100, num_dev=100, num_test=100, seed=3)
    assert a != datafile.carve(examples, num_train=100, num_dev=100, num_test=100, seed=4)
    rows = [{e.source for e in part} for part in a]
    assert [len(r) for r in rows] == [30, 10, 10]
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    assert all(len(part) == 2 * len(r) for part, r in zip(a, rows))  # both turns of a row, side by side
    test_lines = [int(e.source.split(":")[1]) for e in a[2]]
    assert test_lines == sorted(test_lines)  # test keeps file order
    smaller = datafile.carve(examples, num_train=5, num_dev=3, num_test=100, seed=3)
    assert smaller[2] == a[2]  # test does not move with num_train / num_dev


def test_load_task_carves_a_data_file(tmp_path):
    path = write_rows(tmp_path / "arith.jsonl", [pc(i) for i in range(1, 21)])
    splits = load_task(path, num_train=100, num_dev=100, num_test=100, seed=1)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (12, 4, 4)
    assert splits.name == "arith" and splits.generative and splits.stop == ("\n",) and not splits.chat
    every = {e.source for part in (splits.train, splits.dev, splits.test) for e in part}
    assert len(every) == 20
    assert splits == load_task(path, num_train=100, num_dev=100, num_test=100, seed=1)


def test_data_stop_rule():
    def with_targets(*targets):
        return [Example("p", (t,), 0, "f:1", (t.strip(),)) for t in targets]

    assert datafile.data_stop(with_targets(" 4\n", " yes\n")) == ("\n",)
    assert datafile.data_stop(with_targets(" 4\n", " yes")) == ()  # one without the newline: EOS only
    assert datafile.data_stop(with_targets(" two\nlines\n")) == ()  # a multi-line answer
    assert datafile.data_stop(examples_of(3)) == ()  # chat: the template's end of turn, set when rendering
    assert datafile.data_stop([]) == ()


def test_format_spec_refuses_an_unknown_format():
    with pytest.raises(TaskError, match="unknown row format 'text'"):
        datafile.format_spec("t", (), "text")
    assert datafile.no_template() == ("", ())
