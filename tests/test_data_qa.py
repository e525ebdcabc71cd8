"""SQuAD and DROP documents walked into flat question rows: JSON-path errors, DROP's answer parsing
(as the Hugging Face builder reads it), the HF row mappings and MeZO's target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layerzo.data import qa
from layerzo.errors import DataRowError, TaskError

FIXTURES = Path(__file__).parent / "fixtures"


def squad_doc(**qa_overrides) -> dict:
    question = {"id": "q1", "question": "Who?", "answers": [{"text": "Ann", "answer_start": 0}], **qa_overrides}
    return {"data": [{"title": "T", "paragraphs": [{"context": "Ann ran.", "qas": [question]}]}], "version": "1.1"}


def test_squad_rows_flatten_one_row_per_question():
    doc = squad_doc()
    doc["data"][0]["paragraphs"].append({"context": "Bo sat.", "qas": [
        {"id": "q2", "question": "Who sat?", "answers": [{"text": "Bo", "answer_start": 0}] * 2}]})
    rows = qa.squad_rows(doc, "sq.json", "train")
    assert rows == [({"title": "T", "context": "Ann ran.", "question": "Who?", "answers": ["Ann"]},
                     "sq.json: data[0].paragraphs[0].qas[0]"),
                    ({"title": "T", "context": "Bo sat.", "question": "Who sat?", "answers": ["Bo", "Bo"]},
                     "sq.json: data[0].paragraphs[1].qas[0]")]  # duplicates kept, as HF's answers.text


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0].pop("question"),
     r"^sq\.json: data\[0\]\.paragraphs\[0\]\.qas\[0\]: missing field 'question'$"),
    (lambda d: d["data"][0].pop("title"), r"^sq\.json: data\[0\]: missing field 'title'$"),
    (lambda d: d["data"][0]["paragraphs"][0].update(qas={"a": 1}),
     r"^sq\.json: data\[0\]\.paragraphs\[0\]: field 'qas' should be a list, got dict"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].pop("text"),
     r"^sq\.json: data\[0\]\.paragraphs\[0\]\.qas\[0\]: missing field 'answers\[0\]\.text'$"),
    (lambda d: d["data"][0]["paragraphs"].append(7), r"^sq\.json: data\[0\]\.paragraphs\[1\]: expected a JSON object"),
])
def test_squad_structure_errors_name_the_json_path(mutate, message):
    doc = squad_doc()
    mutate(doc)
    with pytest.raises(DataRowError, match=message):
        qa.squad_rows(doc, "sq.json", "train")


@pytest.mark.parametrize("doc, got", [
    ([1, 2], "a JSON list"), ({"version": "1.1"}, "an object without a 'data' list"), ({"data": {}}, "an object"),
])
def test_squad_document_must_hold_a_data_list(doc, got):
    with pytest.raises(TaskError, match=rf'^sq\.json: expected a SQuAD document {{"data": \[article, ...\]}}, got {got}'):
        qa.squad_rows(doc, "sq.json", "validation")


def test_gold_answers_prepare_adds_mezo_target():
    row = {"question": "Who?", "answers": ["Ann", "Ann B."]}
    assert qa.gold_answers_prepare(row, "w") == [{**row, "target": " Ann\n"}]
    with pytest.raises(DataRowError, match="^w: field 'answers' is empty; every question needs a gold answer$"):
        qa.gold_answers_prepare({"answers": []}, "w")
    with pytest.raises(DataRowError, match="^w: field 'answers' should be a list of strings$"):
        qa.gold_answers_prepare({"answers": [3]}, "w")


def answer(number="", spans=(), day="", month="", year="") -> dict:
    return {"number": number, "date": {"day": day, "month": month, "year": year}, "spans": list(spans)}


@pytest.mark.parametrize("obj, texts", [
    (answer(number="175"), ["175"]),
    (answer(day="4", month="May", year="1871"), ["4 May 1871"]),
    (answer(month="May", year="1871"), ["May 1871"]),  # " ".join(day, month, year).strip()
    (answer(spans=["Ada Fenwick", "Tom", " "]), ["Ada Fenwick", "Tom"]),  # each span its own gold
    (answer(), []),
    ({"number": "", "spans": ["x"]}, ["x"]),  # no date object at all
])
def test_drop_answer_texts(obj, texts):
    assert qa.drop_answer_texts(obj, "w", "answer") == texts


@pytest.mark.parametrize("obj, message", [
    ({"spans": []}, "^w: missing field 'answer.number'$"),
    ({"number": 3, "spans": []}, "^w: field 'answer.number' should be a string, got int 3$"),
    ({"number": "", "spans": [1]}, "^w: field 'answer' should hold strings"),
    ("175", r"^w\.answer: expected a JSON object, got str$"),
])
def test_drop_answer_errors(obj, message):
    with pytest.raises(DataRowError, match=message):
        qa.drop_answer_texts(obj, "w", "answer")


def test_drop_rows_of_the_fixture_order_golds_per_split_and_skip_unanswered():
    train_path = FIXTURES / "drop" / "drop_dataset_train.json"
    doc = json.loads(train_path.read_text(encoding="utf-8"))
    rows = qa.drop_rows(doc, "d.json", "train")
    assert [w for _, w in rows] == ["d.json: demo_harbor_1.qa_pairs[0]", "d.json: demo_harbor_1.qa_pairs[1]",
                                    "d.json: demo_harbor_1.qa_pairs[2]", "d.json: demo_orchard_2.qa_pairs[0]"]
    assert [r["answers"] for r, _ in rows] == [["175"], ["4 May 1871", "May 1871"], ["Ada Fenwick", "Tom"], ["9"]]
    assert rows[0][0]["passage"] == doc["demo_harbor_1"]["passage"]
    assert rows[1][0]["question"] == "When did the first lighthouse open? "  # the template strips it
    dev = json.loads((FIXTURES / "drop" / "drop_dataset_dev.json").read_text(encoding="utf-8"))
    # validation: validated_answers first (what HF's answers_spans hold), then the original answer, no repeats
    assert [r["answers"] for r, _ in qa.drop_rows(dev, "d.json", "validation")] == [["132", "132 years"], ["1954"]]
    assert [r["answers"] for r, _ in qa.drop_rows(dev, "d.json", "train")] == [["132", "132 years"], ["1954"]]


@pytest.mark.parametrize("doc, message", [
    ([], r"^d\.json: expected a DROP document"),
    ({"p1": {"qa_pairs": []}}, r"^d\.json: p1: missing field 'passage'$"),
    ({"p1": {"passage": "P", "qa_pairs": [{"question": "Q"}]}}, r"^d\.json: p1\.qa_pairs\[0\]: missing field 'answer'$"),
    ({"p1": {"passage": "P", "qa_pairs": [{"question": "Q", "answer": answer("1"), "validated_answers": [5]}]}},
     r"^d\.json: p1\.qa_pairs\[0\]\.validated_answers\[0\]: expected a JSON object, got int$"),
])
def test_drop_structure_errors_name_the_json_path(doc, message):
    with pytest.raises((DataRowError, TaskError), match=message):
        qa.drop_rows(doc, "d.json", "train")


def test_hf_rows_map_onto_the_flat_rows():
    squad = {"id": "x", "title": "T", "context": "C", "question": "Q?",
             "answers": {"text": ["a", "b"], "answer_start": [0, 3]}}
    assert qa.squad_from_hf(squad) == {"title": "T", "context": "C", "question": "Q?", "answers": ["a", "b"]}
    drop = {"section_id": "s", "query_id": "q", "passage": "P", "question": "Q?",
            "answers_spans": {"spans": ["1", "one"], "types": ["number", "span"]}}
    assert qa.drop_from_hf(drop) == {"passage": "P", "question": "Q?", "answers": ["1", "one"]}


def test_layouts_name_the_original_files():
    assert qa.SQUAD_LAYOUT.file_name("train") == "train.json"
    assert qa.DROP_LAYOUT.file_name("validation") == "drop_dataset_dev.json"
