"""User YAML tasks: the shipped example, candidate lists and maps, labels compared as text,
config errors naming the file and key, and row errors naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layerzo.data.spec import Example
from layerzo.data.tasks import get_task, load_examples, load_task
from layerzo.data.user_tasks import label_key, load_task_yaml
from layerzo.errors import DataRowError, TaskError
from test_data_tasks import FIXTURES, raw_rows

REPO = Path(__file__).resolve().parents[1]
SENTIMENT_YAML = REPO / "recipes" / "tasks" / "example_sentiment.yaml"


def test_example_yaml_task():
    splits = load_task(SENTIMENT_YAML)
    assert splits.name == "example_sentiment"
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (4, 4, 4)
    val = load_examples(str(SENTIMENT_YAML), "validation")
    rows = raw_rows(FIXTURES / "custom" / "validation.jsonl")
    assert [e.context for e in val] == [f"Review: {r['text']}\nSentiment:" for r in rows]
    assert [e.candidates[e.label] for e in val] == [{"neg": " negative", "pos": " positive"}[r["sentiment"]]
                                                    for r in rows]


def write_yaml(tmp_path: Path, text: str, rows: list | None = None) -> Path:
    rows = rows if rows is not None else [{"q": "2+2?", "label": 1}, {"q": "1+0?", "label": 0}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    path = tmp_path / "task.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_task_with_candidate_list(tmp_path):
    path = write_yaml(tmp_path, 'train: d.jsonl\nvalidation: d.jsonl\ntemplate: "Q: {q}\\nA:"\n'
                                'candidates: [" odd", " even"]\n')
    examples = load_examples(path, "train")
    assert examples == [Example("Q: 2+2?\nA:", (" odd", " even"), 1, f"{tmp_path / 'd.jsonl'}:1"),
                        Example("Q: 1+0?\nA:", (" odd", " even"), 0, f"{tmp_path / 'd.jsonl'}:2")]
    assert get_task(path).name == "task"  # no name: the file stem


def test_yaml_labels_match_as_text_and_yes_no_stay_strings(tmp_path):
    text = ("train: d.jsonl\nvalidation: d.jsonl\ntemplate: 'Q {q}'\ncandidates: {1: ' one', 2: ' two'}\n"
            "label_map: {yes: 2, no: 1}\n")
    path = write_yaml(tmp_path, text, [{"q": "a", "label": "yes"}, {"q": "b", "label": "no"}])
    assert [e.label for e in load_examples(path, "train")] == [1, 0]
    text = "train: d.jsonl\nvalidation: d.jsonl\ntemplate: '{q}'\ncandidates: {1: ' one', 2: ' two'}\n"
    path = write_yaml(tmp_path, text, [{"q": 5, "label": 2}, {"q": "b", "label": "1"}])
    assert [(e.context, e.label) for e in load_examples(path, "train")] == [("5", 1), ("b", 0)]


@pytest.mark.parametrize("yaml_text, message", [
    ("train: d.jsonl\nvalidation: d.jsonl\ntemplate: '{q}'\ncandidates: [a]\ncolour: red\n", "unknown key 'colour'"),
    ("train: d.jsonl\ntemplate: '{q}'\ncandidates: [a]\n", "missing key 'validation'"),
    ("train: d.jsonl\nvalidation: d.jsonl\ntemplate: 'no slot'\ncandidates: [a]\n", "no {field} slot"),
    ("train: d.jsonl\nvalidation: d.jsonl\ntemplate: '{q'\ncandidates: [a]\n", "bad template"),
    ("train: d.jsonl\nvalidation: d.jsonl\ntemplate: '{}'\ncandidates: [a]\n", "positional"),
    ("train: d.jsonl\nvalidation: d.jsonl\ntemplate: '{q} {label}'\ncandidates: [a]\n", "shows the label"),
    ("train: d.jsonl\nvalidation: d.jsonl\ntemplate: '{q}'\ncandidates: {a: x}\nlabel_map: {1: b}\n",
     "not one of the candidate labels"),
    ("train: d.jsonl\nvalidation: d.jsonl\ntemplate: '{q}'\ncandidates: 3\n", "list or a mapping"),
    ("train: [d.jsonl\n", "is not valid YAML at line"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_yaml_task_config_errors(tmp_path, yaml_text, message):
    path = write_yaml(tmp_path, yaml_text)
    with pytest.raises(TaskError, match=message) as info:
        get_task(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_yaml_task_row_errors(tmp_path):
    head = "train: d.jsonl\nvalidation: d.jsonl\ntemplate: '{q}'\ncandidates: {a: ' A', b: ' B'}\n"
    path = write_yaml(tmp_path, head, [{"q": "x", "label": "a"}, {"q": "y", "label": "c"}])
    with pytest.raises(DataRowError, match=r'd\.jsonl:2: label "c" is not one of "a", "b"'):
        load_examples(path, "train")
    path = write_yaml(tmp_path, head + "label_map: {yes: a}\n", [{"q": "x", "label": "no"}])
    with pytest.raises(DataRowError, match=r'd\.jsonl:1: label "no" is not in label_map \(keys: "yes"\)'):
        load_examples(path, "train")
    path = write_yaml(tmp_path, head, [{"q": ["x"], "label": "a"}])
    with pytest.raises(DataRowError, match=r"d\.jsonl:1: field 'q' should be a string or number"):
        load_examples(path, "train")
    with pytest.raises(TaskError, match="task file not found"):
        get_task(tmp_path / "missing.yaml")
    (tmp_path / "d.jsonl").unlink()
    with pytest.raises(TaskError, match=r"no train data for task 'task': expected the file .*d\.jsonl"):
        load_examples(path, "train")


def test_label_key_compares_labels_as_text():
    assert label_key("pos") == "pos"
    assert label_key(1) == label_key("1") == "1"
    assert label_key(True) == "true" and label_key(False) == "false"
    assert label_key(1.5) == "1.5"


def test_load_task_yaml_builds_a_file_backed_spec(tmp_path):
    path = write_yaml(tmp_path, "name: arith\ntrain: d.jsonl\nvalidation: ./sub/../d.jsonl\ntemplate: '{q}='\n"
                                "candidates: {0: ' no', 1: ' yes'}\n")
    spec = load_task_yaml(path)
    assert spec.name == "arith" and spec.hf_dataset is None and spec.fields == ("q",)
    assert dict(spec.files) == {"train": tmp_path / "d.jsonl", "validation": tmp_path / "d.jsonl"}
    assert spec.examples({"q": "2+2", "label": 1}, "here") == [Example("2+2=", (" no", " yes"), 1, "here")]


def test_a_task_yaml_that_is_a_folder_or_not_utf8_is_one_line(tmp_path):
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(TaskError, match="is a folder, not a YAML file"):
        get_task(tmp_path / "folder.yaml")
    (tmp_path / "latin1.yaml").write_bytes("name: café\n".encode("latin-1"))
    with pytest.raises(TaskError, match="latin1.yaml is not UTF-8 text"):
        get_task(tmp_path / "latin1.yaml")


# ------------------------------------------------------------------ generative: a free-text target


QA_ROWS = [{"q": "Capital of France?", "a": "Paris", "aliases": ["Paris", "paris, France"]},
           {"q": "2+2?", "a": 4, "aliases": "four"}]


def test_yaml_target_task_is_generative(tmp_path):
    path = write_yaml(tmp_path, 'train: d.jsonl\nvalidation: d.jsonl\ntemplate: "Q: {q}\\nA:"\ntarget: " {a}\\n"\n',
                      QA_ROWS)
    spec = get_task(path)
    assert spec.generative and spec.stop == ("\n",) and spec.label_names == ()
    first, second = load_examples(path, "train")
    assert first == Example("Q: Capital of France?\nA:", (" Paris\n",), 0, f"{tmp_path / 'd.jsonl'}:1", ("Paris",))
    assert second.candidates == (" 4\n",) and second.answers == ("4",)  # numbers as text; default gold = target
    splits = load_task(path)
    assert splits.generative and splits.stop == ("\n",) and not splits.chat
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (1, 1, 2)


def test_yaml_target_task_answers_field_and_stop(tmp_path):
    text = ('train: d.jsonl\nvalidation: d.jsonl\ntemplate: "Q: {q}\\nA:"\ntarget: " {a}"\n'
            'answers_field: aliases\n')
    path = write_yaml(tmp_path, text, QA_ROWS)
    first, second = load_examples(path, "train")
    assert first.answers == ("Paris", "paris, France") and second.answers == ("four",)  # a list, or one string
    assert get_task(path).stop == ()  # the target does not end with a newline: EOS only
    path = write_yaml(tmp_path, text + 'stop: ["\\n\\n", "Q:"]\n', QA_ROWS)
    assert load_task(path).stop == ("\n\n", "Q:")


@pytest.mark.parametrize("rows, message", [
    ([{"q": "x"}], r"d\.jsonl:1: missing field 'a'$"),
    ([{"q": "x", "a": " "}], r"d\.jsonl:1: the target \(completion\) is empty$"),
    ([{"q": "x", "a": ["y"]}], r"d\.jsonl:1: field 'a' should be a string or number, got list$"),
])
def test_yaml_target_task_row_errors(tmp_path, rows, message):
    path = write_yaml(tmp_path, "train: d.jsonl\nvalidation: d.jsonl\ntemplate: '{q}'\ntarget: ' {a}'\n", rows)
    with pytest.raises(DataRowError, match=message):
        load_examples(path, "train")


@pytest.mark.parametrize("rows, message", [
    ([{"q": "x", "a": "y"}], r"d\.jsonl:1: missing field 'g'$"),
    ([{"q": "x", "a": "y", "g": [1]}], r"d\.jsonl:1: field 'g' should be a string or a list of strings, got \[1\]$"),
    ([{"q": "x", "a": "y", "g": []}], r"d\.jsonl:1: field 'answers' should be a non-empty list"),
])
def test_yaml_answers_field_row_errors(tmp_path, rows, message):
    text = "train: d.jsonl\nvalidation: d.jsonl\ntemplate: '{q}'\ntarget: ' {a}'\nanswers_field: g\n"
    with pytest.raises(DataRowError, match=message):
        load_examples(write_yaml(tmp_path, text, rows), "train")


HEAD = "train: d.jsonl\nvalidation: d.jsonl\n"


@pytest.mark.parametrize("yaml_text, message", [
    (HEAD + "template: '{q}'\ncandidates: [a]\ntarget: '{a}'\n", "give either 'candidates' or 'target', not both"),
    (HEAD + "template: '{q}'\n", r"missing key 'candidates' \(or 'target' for a free-text answer\)"),
    (HEAD + "template: '{q}'\ntarget: ' fixed'\n", "the target has no {field} slot"),
    (HEAD + "template: '{q}'\ntarget: '{a.b}'\n", "bad target: slot"),
    (HEAD + "template: '{q}'\ntarget: '{a}'\nlabel_map: {x: y}\n", "'label_map' does not go with 'target'"),
    (HEAD + "template: '{q}'\ntarget: '{a}'\nstop: '\\n'\n", "'stop' should be a list of strings, got str"),
    (HEAD + "template: '{q}'\ntarget: '{a}'\nstop: ['']\n", "'stop' should be a list of non-empty strings"),
    (HEAD + "template: '{q}'\ntarget: 3\n", "'target' should be a string, got int"),
    (HEAD + "template: '{q}'\ncandidates: [a]\nanswers_field: g\n", "'answers_field' belongs to a task with"),
    (HEAD + "target: '{a}'\n", r"missing key 'template' \(or 'format'"),
])
def test_yaml_target_task_config_errors(tmp_path, yaml_text, message):
    path = write_yaml(tmp_path, yaml_text)
    with pytest.raises(TaskError, match=message) as info:
        get_task(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------ TRL-style rows with a validation file


def test_yaml_format_task_reads_prompt_completion_files(tmp_path):
    rows = [{"prompt": f"Q{i}:", "completion": f" {i}\n"} for i in range(6)]
    (tmp_path / "val.jsonl").write_text(json.dumps({"prompt": "V:", "completion": " v\n"}) + "\n")
    path = write_yaml(tmp_path, "name: pc\ntrain: d.jsonl\nvalidation: val.jsonl\nformat: prompt_completion\n", rows)
    splits = load_task(path)
    assert splits.name == "pc" and splits.generative and splits.stop == ("\n",) and not splits.chat
    assert (len(splits.train), len(splits.dev)) == (3, 3)  # dev carved from train, MeZO's rule
    assert splits.test == (Example("V:", (" v\n",), 0, f"{tmp_path / 'val.jsonl'}:1", ("v",)),)


def test_yaml_format_task_reads_messages_files(tmp_path):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_yaml(tmp_path, "train: d.jsonl\nvalidation: d.jsonl\nformat: messages\n", [row, row])
    splits = load_task(path)
    assert splits.chat and splits.generative and splits.stop == ()
    assert splits.test[0].messages == (("user", "hi"), ("assistant", "hello"))
    path = write_yaml(tmp_path, "train: d.jsonl\nvalidation: d.jsonl\nformat: prompt_completion\n", [row])
    with pytest.raises(DataRowError, match=r"d\.jsonl:1: a messages row in a file of prompt/completion rows"):
        load_examples(path, "train")


@pytest.mark.parametrize("yaml_text, message", [
    (HEAD + "format: text\n", "'format' is 'text'; expected prompt_completion or messages"),
    (HEAD + "format: messages\ntemplate: '{q}'\n", "'template' does not apply to 'format: messages'"),
    (HEAD + "format: prompt_completion\nstop: ['x']\n", "'stop' does not apply to 'format: prompt_completion'"),
    ("train: d.jsonl\nformat: messages\n", "missing key 'validation'"),
])
def test_yaml_format_task_config_errors(tmp_path, yaml_text, message):
    with pytest.raises(TaskError, match=message):
        get_task(write_yaml(tmp_path, yaml_text))
