"""lm-eval hooks for layerzo's offline tasks (``!function utils.*`` in the YAMLs).

``layerzo.eval.tasks.write_task_dir`` copies this file next to the task YAMLs,
together with ``layerzo_eval.json``: ``{"data_dir": str | null, "seed": int,
"num_test": int, "max_new_tokens": int}``. There is exactly one source of
prompts (``layerzo.data.tasks``) and one rule for which rows are evaluated:

* validation -> ``load_task(...).test``: the rows ``layerzo tune`` reports
  its test scores on, in the same order (same ``seed`` and ``num_test``);
* train -> ``load_task(...).train``: the few-shot pool.

Multiple-choice tasks: the harness loads the raw rows itself (local JSONL
files or the Hub dataset); ``process_docs`` then replaces each split by the
examples layerzo renders from the same data. A document is ``{"context",
"candidates", "label", "source"}`` (``source`` = "path:line" of the raw row,
for tracing a sample back).

Generative tasks (SQuAD, DROP): their original files are one JSON document per
split, which the harness' JSON loader cannot read as rows, so
``custom_dataset`` builds both splits from layerzo's examples directly (local
files or the Hub, as ``load_task`` reads them). A document is ``{"context",
"answers", "target", "source"}``; ``process_results_qa`` scores a generation
with layerzo's SQuAD F1 / exact match, max over ``answers``.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from layerzo.data.metrics import best_exact_match, best_f1
from layerzo.data.spec import Example
from layerzo.data.tasks import GENERATIVE_TASK_NAMES, TASK_NAMES, load_task

SETTINGS_NAME = "layerzo_eval.json"
_SETTINGS = json.loads(Path(__file__).with_name(SETTINGS_NAME).read_text(encoding="utf-8"))


def layerzo_examples(task: str, split: str) -> tuple[Example, ...]:
    """The examples layerzo uses for ``split`` ("validation" = tune's test set, "train")."""
    splits = load_task(task, _SETTINGS["data_dir"], num_test=_SETTINGS["num_test"], seed=_SETTINGS["seed"])
    if split == "validation":
        return splits.test
    if split == "train":
        return splits.train
    raise ValueError(f"layerzo task {task!r} has no split {split!r} (expected train or validation)")


def _process_docs(task: str, dataset: datasets.Dataset) -> datasets.Dataset:
    # The harness passes the split it loaded; its name says which layerzo split to use.
    examples = layerzo_examples(task, str(dataset.split))
    return datasets.Dataset.from_list(
        [{"context": e.context, "candidates": list(e.candidates), "label": e.label, "source": e.source}
         for e in examples]
    )


def _make_process_docs(task: str):
    def process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
        return _process_docs(task, dataset)

    process_docs.__name__ = process_docs.__qualname__ = f"process_docs_{task}"
    return process_docs


def _generative_docs(task: str) -> datasets.DatasetDict:
    return datasets.DatasetDict({
        split: datasets.Dataset.from_list(
            [{"context": e.context, "answers": list(e.answers), "target": e.candidates[0], "source": e.source}
             for e in layerzo_examples(task, split)])
        for split in ("train", "validation")
    })


def _make_dataset(task: str):
    def dataset(**_metadata) -> datasets.DatasetDict:  # the harness passes the task's metadata as keywords
        return _generative_docs(task)

    dataset.__name__ = dataset.__qualname__ = f"dataset_{task}"
    return dataset


# One hook per task (a YAML names a function, not a function plus arguments).
for _task in TASK_NAMES:
    globals()[f"process_docs_{_task}"] = _make_process_docs(_task)
for _task in GENERATIVE_TASK_NAMES:
    globals()[f"dataset_{_task}"] = _make_dataset(_task)


def doc_to_text(doc: dict) -> str:
    return doc["context"]


def doc_to_choice(doc: dict) -> list[str]:
    return list(doc["candidates"])


def doc_to_target(doc: dict) -> int:
    return int(doc["label"])


def doc_to_answer(doc: dict) -> str:
    """A generative document's reference: its first gold answer (shown in few-shot demos)."""
    return doc["answers"][0]


def process_results_qa(doc: dict, results: list[str]) -> dict[str, float]:
    """One generation (the text before the first stop string) scored as ``layerzo tune`` scores it."""
    golds = list(doc["answers"])
    return {"f1": best_f1(results[0], golds), "em": best_exact_match(results[0], golds)}
