"""SQuAD v1.1 and DROP: their original one-document JSON files flattened to one row per question.

Unlike the GLUE/SuperGLUE ``.jsonl`` files, each split of these tasks is ONE
JSON document (SQuAD: ``{"data": [article, ...]}``; DROP: ``{passage_id:
{"passage", "qa_pairs"}}``). A :class:`DocumentLayout` names a task's files and
walks its document into flat rows ``{..fields.., "answers": [gold, ...]}``,
each with a ``where`` that names the file and the JSON path of the question
(``squad/train.json: data[3].paragraphs[0].qas[2]``), so a bad question is
reported like a bad JSONL line. The Hugging Face rows of the same datasets are
mapped onto these flat rows by ``*_from_hf``; ``*_prepare`` then adds MeZO's
teacher-forced target (:func:`layerzo.data.templates.qa_target`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from layerzo.data import templates
from layerzo.data.spec import Row, need_field
from layerzo.errors import DataRowError, TaskError

Located = tuple[Row, str]  # a flat row and where it came from ("file: json.path")


@dataclass(frozen=True)
class DocumentLayout:
    """A task whose splits are single JSON documents: the file of each split and how to walk one."""

    files: tuple[tuple[str, str], ...]  # (split, file name inside <data_dir>/<task>/)
    rows: Callable[[Any, str, str], list[Located]]  # (document, path, split) -> flat rows, in file order

    def file_name(self, split: str) -> str:
        return dict(self.files)[split]


def _need_object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise DataRowError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def gold_answers_prepare(row: Row, where: str) -> list[Row]:
    """A flat QA row plus its target: the first gold answer, as MeZO's ``verbalize`` appends it."""
    answers = need_field(row, "answers", list, where)
    if not answers:
        raise DataRowError(f"{where}: field 'answers' is empty; every question needs a gold answer")
    if not isinstance(answers[0], str):
        raise DataRowError(f"{where}: field 'answers' should be a list of strings")
    return [{**row, "target": templates.qa_target(answers[0])}]


# ------------------------------------------------------------------ SQuAD v1.1


def squad_rows(document: Any, path: str, split: str) -> list[Located]:
    """One flat row ``{title, context, question, answers}`` per question, in file order.

    ``answers`` keeps every gold text as given (duplicates included, as in the
    Hugging Face ``answers.text``).
    """
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        got = "an object without a 'data' list" if isinstance(document, dict) else f"a JSON {type(document).__name__}"
        raise TaskError(f'{path}: expected a SQuAD document {{"data": [article, ...]}}, got {got}')
    out: list[Located] = []
    for ai, article in enumerate(data):
        at = f"{path}: data[{ai}]"
        title = need_field(_need_object(article, at), "title", str, at)
        for pi, paragraph in enumerate(need_field(article, "paragraphs", list, at)):
            pat = f"{at}.paragraphs[{pi}]"
            context = need_field(_need_object(paragraph, pat), "context", str, pat)
            for qi, qa in enumerate(need_field(paragraph, "qas", list, pat)):
                where = f"{pat}.qas[{qi}]"
                question = need_field(_need_object(qa, where), "question", str, where)
                answers = [need_field(_need_object(a, f"{where}.answers[{i}]"), "text", str, where,
                                      prefix=f"answers[{i}].")
                           for i, a in enumerate(need_field(qa, "answers", list, where))]
                out.append(({"title": title, "context": context, "question": question, "answers": answers}, where))
    return out


def squad_from_hf(row: Row) -> Row:
    """HF ``rajpurkar/squad`` rows are flat already; only the answers are nested (``answers.text``)."""
    return {"title": row["title"], "context": row["context"], "question": row["question"],
            "answers": list(row["answers"]["text"])}


SQUAD_LAYOUT = DocumentLayout((("train", "train.json"), ("validation", "validation.json")), squad_rows)


# ------------------------------------------------------------------ DROP


def drop_answer_texts(answer: Any, where: str, name: str) -> list[str]:
    """The gold texts of one DROP answer object, as the Hugging Face ``drop`` builder reads it.

    A number if there is one, else the date ``"day month year"`` (empty parts
    dropped at the ends, as ``" ".join(...).strip()``), else every span as its
    own gold answer.
    """
    answer = _need_object(answer, f"{where}.{name}")
    number = need_field(answer, "number", str, where, prefix=f"{name}.")
    spans = need_field(answer, "spans", list, where, prefix=f"{name}.")
    date = need_field(answer, "date", dict, where, prefix=f"{name}.") if "date" in answer else {}
    parts = [date.get(k, "") for k in ("day", "month", "year")]
    if not all(isinstance(p, str) for p in parts) or not all(isinstance(s, str) for s in spans):
        raise DataRowError(f"{where}: field {name!r} should hold strings (number, date parts, spans)")
    if number.strip():
        return [number]
    if " ".join(parts).strip():
        return [" ".join(parts).strip()]
    return [s for s in spans if s.strip()]


def _drop_golds(qa: Row, where: str, split: str) -> list[str]:
    """Gold answers of one question: the Hugging Face split's own source first (train: ``answer``;
    validation: ``validated_answers``, as MeZO saw them), then the other as extra golds, without repeats."""
    main = [("answer", need_field(qa, "answer", dict, where))]
    validated = need_field(qa, "validated_answers", list, where) if "validated_answers" in qa else []
    extra = [(f"validated_answers[{i}]", a) for i, a in enumerate(validated)]
    ordered = main + extra if split == "train" else extra + main
    golds = [text for name, answer in ordered for text in drop_answer_texts(answer, where, name)]
    return list(dict.fromkeys(golds))


def drop_rows(document: Any, path: str, split: str) -> list[Located]:
    """One flat row ``{passage, question, answers}`` per question, in file order.

    A question without any gold text is skipped, as the Hugging Face builder
    skips the few such questions of the official files.
    """
    if not isinstance(document, dict):
        raise TaskError(f'{path}: expected a DROP document {{passage_id: {{"passage", "qa_pairs"}}}}, '
                        f"got {type(document).__name__}")
    out: list[Located] = []
    for pid, section in document.items():
        at = f"{path}: {pid}"
        passage = need_field(_need_object(section, at), "passage", str, at)
        for qi, qa in enumerate(need_field(section, "qa_pairs", list, at)):
            where = f"{at}.qa_pairs[{qi}]"
            question = need_field(_need_object(qa, where), "question", str, where)
            golds = _drop_golds(qa, where, split)
            if golds:
                out.append(({"passage": passage, "question": question, "answers": golds}, where))
    return out


def drop_from_hf(row: Row) -> Row:
    """HF ``ucinlp/drop`` rows hold the golds already parsed, in ``answers_spans.spans``."""
    return {"passage": row["passage"], "question": row["question"], "answers": list(row["answers_spans"]["spans"])}


DROP_LAYOUT = DocumentLayout((("train", "drop_dataset_train.json"), ("validation", "drop_dataset_dev.json")),
                             drop_rows)
