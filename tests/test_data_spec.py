"""The shared task types: a TaskSpec turning rows into Examples, strict labels, field checks."""

from __future__ import annotations

import pytest

from layerzo.data.spec import Example, TaskSpec, TaskSplits, generative_example, need_field
from layerzo.errors import DataRowError, TaskError


def _template(text: str) -> tuple[str, tuple[str, ...]]:
    if text == "boom":
        raise ValueError("field 'text' is 'boom'")
    return f"T: {text} ->", (" no", " yes")


def _spec(**kwargs) -> TaskSpec:
    return TaskSpec("toy", None, ("no", "yes"), (0, 1), ("text",), _template, **kwargs)


def test_examples_render_the_template_and_index_the_label():
    assert _spec().examples({"text": "hi", "label": 1}, "f:1") == [Example("T: hi ->", (" no", " yes"), 1, "f:1")]


def test_prepare_may_turn_one_row_into_several():
    spec = _spec(prepare=lambda row, where: [{"text": t, "label": row["label"]} for t in row["texts"]])
    examples = spec.examples({"texts": ["a", "b"], "label": 0}, "f:3")
    assert [(e.context, e.label, e.source) for e in examples] == [("T: a ->", 0, "f:3"), ("T: b ->", 0, "f:3")]


@pytest.mark.parametrize("row, message", [
    (["text"], "f:2: expected a JSON object, got list"),
    ({"label": 0}, "f:2: missing field 'text'"),
    ({"text": 3, "label": 0}, "f:2: field 'text' should be a string, got int 3"),
    ({"text": "x"}, "f:2: missing field 'label'"),
    ({"text": "x", "label": True}, "f:2: label true is not one of 0, 1"),  # True must not pass for 1
    ({"text": "x", "label": "1"}, 'f:2: label "1" is not one of 0, 1'),
    ({"text": "boom", "label": 0}, "f:2: field 'text' is 'boom'"),  # a template's ValueError names the row
])
def test_bad_rows_raise_data_row_errors_naming_where(row, message):
    with pytest.raises(DataRowError, match=message):
        _spec().examples(row, "f:2")


def test_label_names_and_values_must_pair_up():
    with pytest.raises(TaskError, match="task 'bad': 1 label names for 2 label values"):
        TaskSpec("bad", None, ("only",), (0, 1), ("text",), _template)


def test_need_field_checks_the_kind_and_names_the_dotted_path():
    assert need_field({"n": 3}, "n", int, "w") == 3
    with pytest.raises(DataRowError, match=r"w: field 'a\.n' should be an integer, got bool true"):
        need_field({"n": True}, "n", int, "w", prefix="a.")
    with pytest.raises(DataRowError, match=r"w: missing field 'a\.m'"):
        need_field({}, "m", dict, "w", prefix="a.")


def test_task_splits_hold_the_three_splits():
    ex = Example("c", ("a", "b"), 0)
    splits = TaskSplits("toy", (ex,), (), (ex, ex))
    assert (splits.name, len(splits.train), len(splits.dev), len(splits.test)) == ("toy", 1, 0, 2)
    assert ex.source == ""


def test_generative_spec_builds_target_examples():
    def prompt(text: str):
        return f"Q: {text}\nA:", ()

    spec = TaskSpec("gen", None, (), (), ("text",), prompt, generative=True, stop=("\n",))
    (ex,) = spec.examples({"text": "hi", "target": " yo\n", "answers": ["yo", "hey"]}, "f:1")
    assert ex == Example("Q: hi\nA:", (" yo\n",), 0, "f:1", ("yo", "hey"))
    assert ex.generative and not Example("c", ("a",), 0).generative
    with pytest.raises(DataRowError, match=r"^f:1: the target \(completion\) is empty$"):
        spec.examples({"text": "hi", "target": " \n", "answers": ["yo"]}, "f:1")
    with pytest.raises(DataRowError, match="^f:1: field 'answers' should be a non-empty list of non-empty strings$"):
        generative_example("p", {"target": "t", "answers": ["", "x"]}, "f:1")
    with pytest.raises(DataRowError, match="^f:1: missing field 'target'$"):
        generative_example("p", {"answers": ["x"]}, "f:1")


def test_row_examples_bypass_fields_and_template():
    def whole_row(row, where):
        return [Example(row["p"], (row["c"],), 0, where, (row["c"].strip(),))]

    spec = _spec(row_examples=whole_row)  # the template and its 'text' field are never used
    assert spec.examples({"p": "P", "c": " C"}, "f:9") == [Example("P", (" C",), 0, "f:9", ("C",))]
    with pytest.raises(DataRowError, match="^f:9: expected a JSON object, got list$"):
        spec.examples(["p"], "f:9")


def test_task_splits_default_to_choice_without_chat():
    splits = TaskSplits("toy", (), (), ())
    assert (splits.generative, splits.stop, splits.chat) == (False, (), False)
