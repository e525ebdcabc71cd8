"""Built-in tasks: loaders over the real GLUE/SuperGLUE files, MeZO prompts, sampling, bad input, the HF path."""

from __future__ import annotations

import json
import random
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from layerzo.data import templates
from layerzo.errors import DataRowError, OfflineError, TaskError
from layerzo.data.spec import Example
from layerzo.data.tasks import (GENERATIVE_TASK_NAMES, TASK_NAMES, calibration_texts, get_task, input_text,
                                load_examples, load_task)

FIXTURES = Path(__file__).parent / "fixtures"

# rows per split of the files in ../shared/data (see SOURCES.md)
ROW_COUNTS = {
    "sst2": (67349, 872), "rte": (2490, 277), "cb": (250, 56),
    "copa": (400, 100), "wic": (5428, 638), "wsc": (554, 104),
}
# raw "label" value -> candidate index, written out independently of layerzo.data.tasks
LABEL_INDEX = {
    "sst2": {0: 0, 1: 1},
    "rte": {"entailment": 0, "not_entailment": 1},
    "cb": {"entailment": 0, "contradiction": 1, "neutral": 2},
    "copa": {0: 0, 1: 1},
    "wic": {False: 0, True: 1},
    "wsc": {False: 0, True: 1},
}


def raw_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_task(root: Path, task: str, train: list, validation: list | None = None) -> Path:
    """A data dir with ``task``'s files; rows may be dicts (dumped) or raw strings (written as-is)."""
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("validation", validation if validation is not None else train)):
        lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
        (folder / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return root


# ------------------------------------------------------------------ the real files


def test_task_names_are_the_eight_benchmarks():
    assert TASK_NAMES == ("sst2", "rte", "cb", "boolq", "copa", "wic", "wsc", "multirc")
    assert all(get_task(name).name == name for name in TASK_NAMES)


@pytest.mark.parametrize("task", sorted(ROW_COUNTS))
@pytest.mark.parametrize("split", ["train", "validation"])
def test_real_files_row_counts_and_labels(data_dir, task, split):
    examples = load_examples(task, split, data_dir)
    assert len(examples) == ROW_COUNTS[task][split == "validation"]
    expected = Counter(LABEL_INDEX[task][row["label"]] for row in raw_rows(data_dir / task / f"{split}.jsonl"))
    assert Counter(e.label for e in examples) == expected
    n_candidates = len(LABEL_INDEX[task])
    assert all(len(e.candidates) == n_candidates and 0 <= e.label < n_candidates for e in examples)
    assert examples[0].source == f"{data_dir / task / f'{split}.jsonl'}:1"


def full_texts(example: Example) -> list[str]:
    return [example.context + c for c in example.candidates]


def test_sst2_prompt(data_dir):
    first = load_examples("sst2", "train", data_dir)[0]  # "hide new secretions from the parental units "
    assert first.context == "hide new secretions from the parental units It was"
    assert full_texts(first) == ["hide new secretions from the parental units It was terrible",
                                 "hide new secretions from the parental units It was great"]
    assert first.label == 0


def test_rte_prompt(data_dir):
    first = load_examples("rte", "train", data_dir)[0]
    assert first.context == ('No Weapons of Mass Destruction Found in Iraq Yet.\nDoes this mean that '
                             '"Weapons of Mass Destruction Found in Iraq." is true? Yes or No?\n')
    assert first.candidates == ("Yes", "No") and first.label == 1  # not_entailment


def test_cb_prompt(data_dir):
    first = load_examples("cb", "train", data_dir)[0]
    assert first.context == ("Suppose It was a complex language. Not written down but handed down. One might say "
                             'it was peeled down. Can we infer that "the language was peeled down"? '
                             "Yes, No, or Maybe?\n")
    assert first.candidates == ("Yes", "No", "Maybe") and first.label == 0


def test_copa_prompts_cause_effect_and_pronoun_i(data_dir):
    rows = load_examples("copa", "train", data_dir)
    assert full_texts(rows[0]) == ["My body cast a shadow over the grass because the sun was rising.",
                                   "My body cast a shadow over the grass because the grass was cut."]
    assert rows[0].context == "My body cast a shadow over the grass because "
    # line 7: "I ..." keeps its capital
    assert rows[6].candidates == ("I patched the shirt.", "I bleached the shirt.") and rows[6].label == 1
    # line 9: an effect question
    assert rows[8].context == "The physician misdiagnosed the patient so "
    assert rows[8].candidates[0] == "the patient filed a malpractice lawsuit against the physician."


def test_wic_prompt(data_dir):
    first = load_examples("wic", "train", data_dir)[0]
    assert first.context == ('Does the word "place" have the same meaning in these two sentences? Yes, No?\n'
                             "Do you want to come over to my place later?\n"
                             "A political system with no place for the less prominent groups.\n")
    assert first.candidates == ("No", "Yes") and first.label == 0


def test_wsc_prompt(data_dir):
    first = load_examples("wsc", "train", data_dir)[0]
    assert first.context == ("Mark told Pete many lies about himself, which Pete included in his book. "
                             "He should have been more skeptical.\n"
                             'In the previous sentence, does the pronoun "he" refer to Mark? Yes or No?\n')
    assert first.candidates == ("No", "Yes") and first.label == 0


# ------------------------------------------------------------------ BoolQ and MultiRC fixtures


def test_boolq_from_fixture():
    train = load_examples("boolq", "train", FIXTURES)
    rows = raw_rows(FIXTURES / "boolq" / "train.jsonl")
    assert len(train) == len(rows) == 6
    assert [e.label for e in train] == [int(r["label"]) for r in rows]
    # MeZO BoolQTemplateV3: "?" appended, first letter upper-cased, newline before the answer
    assert train[0].context == (
        "Moon -- The Moon is Earth's only natural satellite. With a mean radius of about 1,737 km it is roughly "
        "a quarter of the size of the Earth. Is the moon bigger than the earth?\n")
    assert train[0].candidates == ("No", "Yes")
    assert train[3].context.endswith(" Is the nile the longest river in africa?\n")  # already had "?"
    assert len(load_examples("boolq", "validation", FIXTURES)) == 3


def test_multirc_flattens_one_example_per_answer():
    train = load_examples("multirc", "train", FIXTURES)
    rows = raw_rows(FIXTURES / "multirc" / "train.jsonl")
    answers = [a for r in rows for q in r["passage"]["questions"] for a in q["answers"]]
    assert len(train) == len(answers) == 8
    assert [e.label for e in train] == [a["label"] for a in answers]
    assert all(e.source == f"{FIXTURES / 'multirc' / 'train.jsonl'}:1" for e in train[:5])
    assert train[5].source.endswith("train.jsonl:2")
    paragraph = rows[0]["passage"]["text"]
    assert train[4].context == (f'{paragraph}\nQuestion: When were the tomatoes ripe?\n'
                                'I found this answer "In April". Is that correct? Yes or No?\n')
    assert train[4].candidates == ("No", "Yes") and train[4].label == 0
    assert len(load_examples("multirc", "validation", FIXTURES)) == 4


# ------------------------------------------------------------------ generative: SQuAD and DROP


def squad_questions(path: Path) -> list[tuple[dict, dict, dict]]:
    """(article, paragraph, qa) per question of a SQuAD file, read independently of layerzo."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    return [(a, p, q) for a in doc["data"] for p in a["paragraphs"] for q in p["qas"]]


def test_generative_task_names():
    assert GENERATIVE_TASK_NAMES == ("squad", "drop")
    assert all(get_task(name).generative and get_task(name).stop == ("\n",) for name in GENERATIVE_TASK_NAMES)
    assert not any(get_task(name).generative for name in TASK_NAMES)


@pytest.mark.parametrize("split, count", [("train", 5696), ("validation", 4874)])
def test_squad_real_files_one_example_per_question(data_dir, split, count):
    path = data_dir / "squad" / f"{split}.json"
    questions = squad_questions(path)
    examples = load_examples("squad", split, data_dir)
    assert len(examples) == len(questions) == count
    assert [e.answers for e in examples] == [tuple(a["text"] for a in q["answers"]) for _, _, q in questions]
    assert all(e.generative and e.candidates == (f" {e.answers[0]}\n",) for e in examples)
    assert examples[0].source == f"{path}: data[0].paragraphs[0].qas[0]"


def test_squad_prompt_and_target(data_dir):
    first = load_examples("squad", "train", data_dir)[0]
    article, paragraph, _ = squad_questions(data_dir / "squad" / "train.json")[0]
    assert article["title"] == "Super_Bowl_50"
    assert first.context == (f"Title: Super_Bowl_50\nContext: {paragraph['context']}\n"
                             "Question: Which NFL team represented the AFC at Super Bowl 50?\nAnswer:")
    assert first.candidates == (" Denver Broncos\n",)
    assert first.answers == ("Denver Broncos", "Denver Broncos", "Denver Broncos")


def test_load_task_squad_splits_say_generative(data_dir):
    splits = load_task("squad", data_dir, num_train=16, num_dev=8, num_test=10, seed=2)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (16, 8, 10)
    assert splits.generative and splits.stop == ("\n",) and not splits.chat
    assert not {e.source for e in splits.train} & {e.source for e in splits.dev}
    choice = load_task("rte", data_dir, num_train=4, num_dev=2, num_test=2)
    assert not choice.generative and choice.stop == () and not choice.chat


def test_drop_from_fixture():
    train = load_examples("drop", "train", FIXTURES)
    assert len(train) == 4  # 5 questions, one without any gold answer (skipped, as HF does)
    doc = json.loads((FIXTURES / "drop" / "drop_dataset_train.json").read_text(encoding="utf-8"))
    passage = doc["demo_harbor_1"]["passage"]
    assert train[1].context == f"Passage: {passage}\nQuestion: When did the first lighthouse open?\nAnswer:"
    assert train[1].candidates == (" 4 May 1871\n",) and train[1].answers == ("4 May 1871", "May 1871")
    assert [e.answers for e in train] == [("175",), ("4 May 1871", "May 1871"), ("Ada Fenwick", "Tom"), ("9",)]
    assert train[0].source == f"{FIXTURES / 'drop' / 'drop_dataset_train.json'}: demo_harbor_1.qa_pairs[0]"
    validation = load_examples("drop", "validation", FIXTURES)
    assert [e.candidates for e in validation] == [(" 132\n",), (" 1954\n",)]
    splits = load_task("drop", FIXTURES)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (2, 2, 2)
    assert splits.generative and splits.stop == ("\n",)


@pytest.mark.parametrize("content, error, message", [
    (b'{"data": [', TaskError, r"train\.json: invalid JSON \(Expecting value at line 1 column 11\)$"),
    (b'{"data": "\xff"}', TaskError, r"train\.json: not UTF-8 text"),
    (b'[]', TaskError, r'train\.json: expected a SQuAD document {"data": \[article, ...\]}, got a JSON list$'),
    (json.dumps({"data": [{"title": "T", "paragraphs": [{"context": "C", "qas": [{"id": "1", "answers": []}]}]}]})
     .encode(), DataRowError, r"train\.json: data\[0\]\.paragraphs\[0\]\.qas\[0\]: missing field 'question'$"),
    (json.dumps({"data": [{"title": "T", "paragraphs": [{"context": "C", "qas": [
        {"id": "1", "question": "Q", "answers": []}]}]}]}).encode(),
     DataRowError, r"qas\[0\]: field 'answers' is empty; every question needs a gold answer$"),
    (json.dumps({"data": [{"title": "T", "paragraphs": {"context": "C"}}]}).encode(),
     DataRowError, r"train\.json: data\[0\]: field 'paragraphs' should be a list, got dict"),
])
def test_bad_squad_files_are_one_line_naming_file_and_json_path(tmp_path, content, error, message):
    (tmp_path / "squad").mkdir()
    (tmp_path / "squad" / "train.json").write_bytes(content)
    with pytest.raises(error, match=message) as info:
        load_examples("squad", "train", tmp_path)
    assert str(info.value).startswith(str(tmp_path / "squad" / "train.json")) and "\n" not in str(info.value)


def test_missing_squad_file_names_the_json_file(tmp_path):
    with pytest.raises(TaskError, match=f"no validation data for task 'squad': expected the file "
                                        f"{tmp_path / 'squad' / 'validation.json'}$"):
        load_examples("squad", "validation", tmp_path)
    with pytest.raises(TaskError, match="expected the file .*drop_dataset_train.json$"):
        load_task("drop", tmp_path)


def test_an_edited_document_is_read_again(tmp_path):
    (tmp_path / "squad").mkdir()
    path = tmp_path / "squad" / "train.json"

    def write(question: str) -> None:
        path.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{"context": "C", "qas": [
            {"id": "1", "question": question, "answers": [{"text": "a", "answer_start": 0}]}]}]}]}))

    write("Q1")
    assert load_examples("squad", "train", tmp_path)[0].context.endswith("Question: Q1\nAnswer:")
    write("Q22")  # another size: the cache key changes
    assert load_examples("squad", "train", tmp_path)[0].context.endswith("Question: Q22\nAnswer:")


# ------------------------------------------------------------------ sampling


def sources(examples) -> list[str]:
    return [e.source for e in examples]


def test_load_task_sizes_without_overlap(data_dir):
    splits = load_task("rte", data_dir)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (1000, 500, 277)
    assert splits.name == "rte"
    train, dev = set(sources(splits.train)), set(sources(splits.dev))
    assert len(train) == 1000 and len(dev) == 500 and not train & dev
    assert sources(splits.test) == sources(load_examples("rte", "validation", data_dir))


def test_load_task_small_train_file_keeps_half_for_dev(data_dir):
    splits = load_task("cb", data_dir)  # 250 rows < 1000 + 500
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (125, 125, 56)
    assert not set(sources(splits.train)) & set(sources(splits.dev))
    splits = load_task("cb", data_dir, num_train=16, num_dev=300)
    assert (len(splits.train), len(splits.dev)) == (16, 125)


def test_load_task_is_deterministic_and_leaves_global_rng_alone(data_dir):
    state = random.getstate()
    a = load_task("sst2", data_dir, num_train=32, num_dev=16, num_test=50, seed=3)
    assert random.getstate() == state
    b = load_task("sst2", data_dir, num_train=32, num_dev=16, num_test=50, seed=3)
    c = load_task("sst2", data_dir, num_train=32, num_dev=16, num_test=50, seed=4)
    assert a == b
    assert sources(a.train) != sources(c.train)
    test_lines = [int(s.rsplit(":", 1)[1]) for s in sources(a.test)]
    assert len(test_lines) == 50 and test_lines == sorted(test_lines)  # a subset, in file order


@pytest.mark.parametrize("kwargs", [{"num_train": 0}, {"num_dev": -1}, {"num_test": -2}, {"num_train": 1.5}])
def test_load_task_rejects_bad_sizes(data_dir, kwargs):
    with pytest.raises(TaskError, match=next(iter(kwargs))):
        load_task("rte", data_dir, **kwargs)


def test_calibration_texts_are_seeded_training_contexts(data_dir):
    texts = calibration_texts("rte", data_dir, n=8, seed=0)
    contexts = {e.context for e in load_examples("rte", "train", data_dir)}
    assert len(texts) == 8 and set(texts) <= contexts
    assert texts == calibration_texts("rte", data_dir, n=8, seed=0)
    assert texts != calibration_texts("rte", data_dir, n=8, seed=1)
    assert len(calibration_texts("boolq", FIXTURES, n=50)) == 6  # capped at the pool size


def test_calibration_texts_of_data_files(tmp_path):
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"P{i}", "completion": " c\n"}) + "\n" for i in range(3)))
    assert sorted(calibration_texts(path, n=5)) == ["P0", "P1", "P2"]  # the prompts
    path = tmp_path / "chat.jsonl"
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                        {"role": "assistant", "content": "Hello."}]}
    path.write_text(json.dumps(row) + "\n")
    assert calibration_texts(path) == ["Be brief.\nHi?"]  # the turns before the reply, one per line
    assert input_text(Example("ctx", ("a",), 0)) == "ctx"


# ------------------------------------------------------------------ bad input


GOOD_RTE = {"premise": "P.", "hypothesis": "H.", "label": "entailment", "idx": 0}


@pytest.mark.parametrize("task, bad_row, message", [
    ("rte", {"hypothesis": "H.", "label": "entailment", "idx": 1}, "missing field 'premise'"),
    ("rte", {**GOOD_RTE, "label": "maybe"}, 'label "maybe" is not one of "entailment", "not_entailment"'),
    ("rte", '{"premise": "P.", ', "invalid JSON"),
    ("rte", '["premise"]', "expected a JSON object, got list"),
    ("rte", {**GOOD_RTE, "premise": 7}, "field 'premise' should be a string, got int 7"),
    ("rte", {"premise": "P.", "hypothesis": "H.", "idx": 1}, "missing field 'label'"),
    ("sst2", {"sentence": "fine ", "label": "1", "idx": 1}, 'label "1" is not one of 0, 1'),
    ("sst2", {"sentence": "fine ", "label": True, "idx": 1}, "label true is not one of 0, 1"),
    ("wic", {"word": "w", "sentence1": "a", "sentence2": "b", "label": 1}, "label 1 is not one of false, true"),
    ("copa", {"premise": "A.", "choice1": "b", "choice2": "c", "question": "why", "label": 0}, "'cause' or 'effect'"),
    ("wsc", {"text": "t", "target": {"span1_text": "a"}, "label": True}, "missing field 'target.span2_text'"),
    ("wsc", {"text": "t", "target": "a", "label": True}, "field 'target' should be an object, got str"),
    ("multirc", {"passage": {"text": "p", "questions": [{"question": "q", "answers": [{"text": "a"}]}]}},
     r"missing field 'passage.questions\[0\].answers\[0\].label'"),
    ("multirc", {"passage": {"text": "p", "questions": [{"question": "q", "answers": [{"text": "a", "label": 2}]}]}},
     "label 2 is not one of 0, 1"),
])
def test_bad_rows_name_file_and_line(tmp_path, task, bad_row, message):
    good = json.loads(json.dumps(GOOD_RTE)) if task == "rte" else None
    rows = ([good] if good else []) + ["", bad_row]  # a blank line still counts for line numbers
    root = write_task(tmp_path, task, rows)
    line = 3 if good else 2
    with pytest.raises(DataRowError, match=message) as info:
        load_examples(task, "train", root)
    assert str(info.value).startswith(f"{root / task / 'train.jsonl'}:{line}: ")
    assert "\n" not in str(info.value)


def test_unknown_task_suggests_the_closest_name():
    with pytest.raises(TaskError, match="unknown task 'sst'; did you mean 'sst2'"):
        get_task("sst")
    with pytest.raises(TaskError, match="did you mean 'boolq'"):
        load_task("boolqq", FIXTURES)
    with pytest.raises(TaskError, match="unknown task 'zzzzzz' \\(known: sst2"):
        get_task("zzzzzz")
    with pytest.raises(TaskError, match=r"did you mean 'squad'\?.*multirc, squad, drop, or a task \.yaml file, "
                                        r"or a \.jsonl data file\)$"):
        get_task("squadd")


def test_missing_task_dir_or_split_names_the_expected_path(tmp_path):
    expected = tmp_path / "rte" / "train.jsonl"
    with pytest.raises(TaskError, match=f"no train data for task 'rte': expected the file {expected}$"):
        load_task("rte", tmp_path)
    (tmp_path / "rte").mkdir()
    (tmp_path / "rte" / "train.jsonl").write_text(json.dumps(GOOD_RTE) + "\n")
    with pytest.raises(TaskError, match="no validation data for task 'rte': expected the file .*validation.jsonl"):
        load_task("rte", tmp_path)
    with pytest.raises(TaskError, match="unknown split 'test'"):
        load_examples("rte", "test", tmp_path)


def test_empty_training_set_is_a_task_error(tmp_path):
    root = write_task(tmp_path, "rte", ["", "   "], [GOOD_RTE])
    assert load_examples("rte", "train", root) == []
    with pytest.raises(TaskError, match="empty training set"):
        load_task("rte", root)
    with pytest.raises(TaskError, match="empty training set"):
        calibration_texts("rte", root)


def test_not_utf8_is_a_task_error(tmp_path):
    root = write_task(tmp_path, "rte", [GOOD_RTE])
    (root / "rte" / "train.jsonl").write_bytes(b'{"premise": "\xff"}\n')
    with pytest.raises(TaskError, match="not UTF-8"):
        load_examples("rte", "train", root)


# ------------------------------------------------------------------ Hugging Face datasets path


@pytest.mark.parametrize("env", ["HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_without_data_dir_asks_for_data_dir(monkeypatch, env):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(env, "1")
    with pytest.raises(OfflineError, match="pass --data-dir DIR with boolq/train.jsonl") as info:
        load_task("boolq")
    assert "\n" not in str(info.value)


HF_ROWS = {  # a row of each HF layout that differs from the original files
    ("super_glue", "rte"): {"premise": "P.", "hypothesis": "H.", "idx": 0, "label": 1},
    ("super_glue", "wsc.fixed"): {"text": "Ann met Bo. She smiled.", "span1_index": 0, "span2_index": 3,
                                  "span1_text": "Ann", "span2_text": "She", "idx": 0, "label": 1},
    ("super_glue", "multirc"): {"paragraph": "Para.", "question": "Q?", "answer": "A.",
                                "idx": {"paragraph": 0, "question": 0, "answer": 0}, "label": 0},
    ("super_glue", "boolq"): {"question": "is it", "passage": "It is.", "idx": 0, "label": 1},
}


def test_hf_rows_are_mapped_to_the_original_layout(monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return [HF_ROWS[(path, name)]]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    (rte,) = load_examples("rte", "validation")
    assert rte.label == 1 and rte.source == "hf:super_glue/rte[validation]:0"
    (wsc,) = load_examples("wsc", "train")
    assert wsc.context == templates.wsc("Ann met Bo. She smiled.", "Ann", "She")[0] and wsc.label == 1
    (multirc,) = load_examples("multirc", "train")
    assert multirc.context == templates.multirc("Para.", "Q?", "A.")[0] and multirc.label == 0
    (boolq,) = load_examples("boolq", "train")
    assert boolq.context == "It is. Is it?\n" and boolq.label == 1
    assert calls[0] == ("super_glue", "rte", "validation") and calls[1][1] == "wsc.fixed"


def test_hf_squad_and_drop_rows_become_the_same_examples(monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    rows = {
        "rajpurkar/squad": {"id": "5", "title": "T", "context": "Ann ran.", "question": " Who ran? ",
                            "answers": {"text": ["Ann", "Ann"], "answer_start": [0, 0]}},
        "ucinlp/drop": {"section_id": "s", "query_id": "q", "passage": "P.", "question": "How many?",
                        "answers_spans": {"spans": ["3", "three"], "types": ["number", "span"]}},
    }
    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return [rows[path]]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    (squad,) = load_examples("squad", "validation")
    assert squad == Example("Title: T\nContext: Ann ran.\nQuestion: Who ran?\nAnswer:", (" Ann\n",), 0,
                            "hf:rajpurkar/squad[validation]:0", ("Ann", "Ann"))
    (drop,) = load_examples("drop", "train")
    assert drop == Example("Passage: P.\nQuestion: How many?\nAnswer:", (" 3\n",), 0, "hf:ucinlp/drop[train]:0",
                           ("3", "three"))
    assert calls == [("rajpurkar/squad", None, "validation"), ("ucinlp/drop", None, "train")]


def test_offline_squad_names_its_json_files(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(OfflineError, match="pass --data-dir DIR with squad/train.json and squad/validation.json$"):
        load_task("squad")
    with pytest.raises(OfflineError, match="with drop/drop_dataset_train.json and drop/drop_dataset_dev.json$"):
        load_task("drop")


def test_missing_datasets_package_is_a_task_error(monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(TaskError, match="needs the 'datasets' package") as info:
        load_examples("cb", "train")
    assert "--data-dir" in info.value.hint


def test_hf_failure_is_a_task_error(monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    def broken(path, name, split):
        raise ConnectionError("no route to host\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=broken))
    with pytest.raises(TaskError, match=r"could not load glue/sst2 \[train\] from the Hub: no route to host$"):
        load_examples("sst2", "train")
