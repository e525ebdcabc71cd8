"""Benchmark tasks: read rows, render MeZO prompts, sample train/dev/test splits.

Built-in multiple-choice tasks (:data:`TASK_NAMES`) read
``<data_dir>/<task>/{train,validation}.jsonl`` in the ORIGINAL GLUE/SuperGLUE
field layouts; the built-in generative tasks (:data:`GENERATIVE_TASK_NAMES`:
SQuAD, DROP) read their original one-document JSON files
(:mod:`layerzo.data.qa`). With ``data_dir`` None and the network allowed, all
read the Hugging Face datasets MeZO uses. A user task is a small YAML file
(see ``recipes/tasks/example_sentiment.yaml``) naming its JSONL files, a
``{field}`` template and the candidates (or a free-text ``target``), or a
``.jsonl`` file of TRL-style prompt/completion or messages rows
(:mod:`layerzo.data.datafile`).

Every row becomes one or more :class:`Example` (MultiRC: one per answer); the
shared types live in :mod:`layerzo.data.spec`. ``Example.context +
Example.candidates[i]`` is exactly MeZO's verbalized text for candidate ``i``;
``candidates[label]`` is the correct one.
"""

from __future__ import annotations

import difflib
import functools
import os
import random
from pathlib import Path

from layerzo.data import datafile, qa, templates
from layerzo.data.spec import Example, Row, TaskSpec, TaskSplits, need_field, parse_json
from layerzo.errors import DataRowError, OfflineError, TaskError

SPLITS = ("train", "validation")


# ------------------------------------------------------------ task-specific reshaping


def _wsc_prepare(row: Row, where: str) -> list[Row]:
    """WSC keeps the spans in a nested ``target`` object; lift them to the top."""
    target = need_field(row, "target", dict, where)
    flat = {k: v for k, v in row.items() if k != "target"}
    for key in ("span1_text", "span2_text"):
        flat[key] = need_field(target, key, str, where, prefix="target.")
    return [flat]


def _wsc_from_hf(row: Row) -> Row:
    """HF ``wsc.fixed`` is flat; nest the spans like the original files."""
    keys = ("span1_index", "span2_index", "span1_text", "span2_text")
    return {**{k: v for k, v in row.items() if k not in keys}, "target": {k: row[k] for k in keys}}


def _multirc_prepare(row: Row, where: str) -> list[Row]:
    """One original MultiRC row is a paragraph; flatten to one row per (question, answer)."""
    passage = need_field(row, "passage", dict, where)
    text = need_field(passage, "text", str, where, prefix="passage.")
    flat = []
    for qi, question in enumerate(need_field(passage, "questions", list, where, prefix="passage.")):
        q_path = f"passage.questions[{qi}]."
        if not isinstance(question, dict):
            raise DataRowError(f"{where}: field {q_path[:-1]!r} should be an object")
        q_text = need_field(question, "question", str, where, prefix=q_path)
        for ai, answer in enumerate(need_field(question, "answers", list, where, prefix=q_path)):
            a_path = f"{q_path}answers[{ai}]."
            if not isinstance(answer, dict):
                raise DataRowError(f"{where}: field {a_path[:-1]!r} should be an object")
            if "label" not in answer:
                raise DataRowError(f"{where}: missing field '{a_path}label'")
            a_text = need_field(answer, "text", str, where, prefix=a_path)
            flat.append({"paragraph": text, "question": q_text, "answer": a_text, "label": answer["label"]})
    return flat


def _multirc_from_hf(row: Row) -> Row:
    """HF ``multirc`` rows are already one per answer; wrap each as a one-answer paragraph."""
    answer = {"text": row["answer"], "idx": row["idx"]["answer"], "label": row["label"]}
    question = {"question": row["question"], "idx": row["idx"]["question"], "answers": [answer]}
    return {"idx": row["idx"]["paragraph"], "passage": {"text": row["paragraph"], "questions": [question]}}


_BOOL = (False, True)
_BUILTIN = (
    TaskSpec("sst2", ("glue", "sst2"), ("negative", "positive"), (0, 1), ("sentence",), templates.sst2),
    TaskSpec("rte", ("super_glue", "rte"), ("entailment", "not_entailment"), ("entailment", "not_entailment"),
             ("premise", "hypothesis"), templates.rte),
    TaskSpec("cb", ("super_glue", "cb"), ("entailment", "contradiction", "neutral"),
             ("entailment", "contradiction", "neutral"), ("premise", "hypothesis"), templates.cb),
    TaskSpec("boolq", ("super_glue", "boolq"), ("false", "true"), _BOOL, ("passage", "question"), templates.boolq),
    TaskSpec("copa", ("super_glue", "copa"), ("choice1", "choice2"), (0, 1),
             ("premise", "choice1", "choice2", "question"), templates.copa),
    TaskSpec("wic", ("super_glue", "wic"), ("false", "true"), _BOOL, ("word", "sentence1", "sentence2"), templates.wic),
    TaskSpec("wsc", ("super_glue", "wsc.fixed"), ("false", "true"), _BOOL, ("text", "span1_text", "span2_text"),
             templates.wsc, prepare=_wsc_prepare, from_hf=_wsc_from_hf),
    TaskSpec("multirc", ("super_glue", "multirc"), ("false", "true"), (0, 1), ("paragraph", "question", "answer"),
             templates.multirc, prepare=_multirc_prepare, from_hf=_multirc_from_hf),
)
_GENERATIVE = (
    TaskSpec("squad", ("rajpurkar/squad", None), (), (), ("title", "context", "question"), templates.squad,
             prepare=qa.gold_answers_prepare, from_hf=qa.squad_from_hf, generative=True, stop=("\n",)),
    TaskSpec("drop", ("ucinlp/drop", None), (), (), ("passage", "question"), templates.drop,
             prepare=qa.gold_answers_prepare, from_hf=qa.drop_from_hf, generative=True, stop=("\n",)),
)
# built-ins whose splits are one JSON document each, not JSON Lines
DOCUMENT_LAYOUTS: dict[str, qa.DocumentLayout] = {"squad": qa.SQUAD_LAYOUT, "drop": qa.DROP_LAYOUT}
TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _BUILTIN + _GENERATIVE}
TASK_NAMES: tuple[str, ...] = tuple(spec.name for spec in _BUILTIN)  # multiple choice (lm-eval runs these)
GENERATIVE_TASK_NAMES: tuple[str, ...] = tuple(spec.name for spec in _GENERATIVE)


# ------------------------------------------------------------------ public API


def get_task(name: str | os.PathLike) -> TaskSpec:
    """The spec of a built-in task, of a user task given as a ``.yaml`` path, or of a ``.jsonl`` data file."""
    if _is_yaml(name):
        from layerzo.data.user_tasks import load_task_yaml  # the YAML side stays out of the import of built-ins

        return load_task_yaml(Path(name))
    if _is_datafile(name):
        return datafile.file_spec(Path(name).expanduser())
    key = str(name).strip().lower().replace("-", "")
    if key in TASKS:
        return TASKS[key]
    known = (*TASK_NAMES, *GENERATIVE_TASK_NAMES)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise TaskError(f"unknown task {str(name)!r}{hint} (known: {', '.join(known)}, "
                    "or a task .yaml file, or a .jsonl data file)")


def load_examples(
    name_or_yaml: str | os.PathLike, split: str, data_dir: str | os.PathLike | None = None
) -> list[Example]:
    """Every example of one split ("train" or "validation"), in file order.

    Reads ``<data_dir>/<task>/<split>.jsonl`` (built-ins; SQuAD and DROP read
    their JSON documents, :data:`DOCUMENT_LAYOUTS`), the YAML's file (user
    tasks), the file itself (a ``.jsonl`` data file, whose only split is
    "train"), or the Hugging Face dataset when ``data_dir`` is None.
    """
    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    spec = get_task(name_or_yaml)
    layout = None if spec.files else DOCUMENT_LAYOUTS.get(spec.name)
    if spec.files:
        files = dict(spec.files)
        if split not in files:
            raise TaskError(f"data file {files['train']} is the task's only file, so it has no {split} split; "
                            "load_task carves dev and test out of it, or name a validation file in a task YAML")
        path = files[split]
    elif data_dir is not None:
        path = Path(data_dir) / spec.name / (layout.file_name(split) if layout else f"{split}.jsonl")
    else:
        return _load_hf(spec, split)
    if not path.is_file():
        raise TaskError(f"no {split} data for task {spec.name!r}: expected the file {path}")
    return list(_read_document(spec, layout, path, split) if layout else _read_jsonl(spec, path))


def load_task(
    name_or_yaml: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    *,
    num_train: int = 1000,
    num_dev: int = 500,
    num_test: int = 1000,
    seed: int = 0,
) -> TaskSplits:
    """MeZO-style splits: train and dev drawn without overlap from the train file, test from validation.

    With ``n`` training rows and ``num_train + num_dev > n``, dev gets
    ``min(num_dev, n // 2)`` and train ``min(num_train, n - dev)``. Test is up
    to ``num_test`` validation examples, kept in file order. Same seed, same
    examples (a private ``random.Random(seed)``; the global RNG is untouched).

    A ``.jsonl`` data file has no validation file: train, dev and test are
    carved out of it by rows (:func:`layerzo.data.datafile.carve`: test and
    dev up to a fifth of the rows each). The splits also say whether the task
    is generative, where its generations stop, and whether its examples are
    chat turns still to render (:func:`layerzo.data.chat.render_chat`).
    """
    for arg, value, low in (("num_train", num_train, 1), ("num_dev", num_dev, 0), ("num_test", num_test, 0)):
        if type(value) is not int or value < low:
            raise TaskError(f"{arg} must be an integer >= {low}, got {value!r}")
    spec = get_task(name_or_yaml)
    pool = load_examples(name_or_yaml, "train", data_dir)
    if not pool:
        raise TaskError(f"task {spec.name!r} has an empty training set; add rows to its train.jsonl")
    if spec.files and "validation" not in dict(spec.files):
        train, dev, test = datafile.carve(pool, num_train=num_train, num_dev=num_dev, num_test=num_test, seed=seed)
        every = pool
    else:
        validation = load_examples(name_or_yaml, "validation", data_dir)
        train, dev, test = _mezo_splits(pool, validation, num_train, num_dev, num_test, seed)
        every = pool + validation
    stop = datafile.data_stop(every) if spec.row_examples is not None else spec.stop
    return TaskSplits(spec.name, train, dev, test, generative=spec.generative, stop=stop,
                      chat=any(e.messages for e in every))


def _mezo_splits(pool: list[Example], validation: list[Example], num_train: int, num_dev: int, num_test: int,
                 seed: int) -> tuple[tuple[Example, ...], tuple[Example, ...], tuple[Example, ...]]:
    rng = random.Random(seed)
    order = rng.sample(range(len(pool)), len(pool))
    if num_train + num_dev <= len(pool):
        n_train, n_dev = num_train, num_dev
    else:  # too few rows: keep a dev set (at most half the rows), give train the rest
        n_dev = min(num_dev, len(pool) // 2)
        n_train = min(num_train, len(pool) - n_dev)
    train = tuple(pool[i] for i in order[:n_train])
    dev = tuple(pool[i] for i in order[n_train:n_train + n_dev])
    test_ids = sorted(rng.sample(range(len(validation)), min(num_test, len(validation))))
    return train, dev, tuple(validation[i] for i in test_ids)


def calibration_texts(name_or_yaml: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                      n: int = 8, seed: int = 0) -> list[str]:
    """``n`` training inputs (seeded sample) for activation profiling.

    An input is the example's context (prompt); a chat example's is the
    contents of the turns before its assistant turn, one per line, since its
    prompt is rendered only once the tokenizer is known.
    """
    if type(n) is not int or n < 1:
        raise TaskError(f"n must be an integer >= 1, got {n!r}")
    pool = load_examples(name_or_yaml, "train", data_dir)
    if not pool:
        raise TaskError(f"task {get_task(name_or_yaml).name!r} has an empty training set")
    picks = random.Random(seed).sample(range(len(pool)), min(n, len(pool)))
    return [input_text(pool[i]) for i in picks]


def input_text(example: Example) -> str:
    """The model-input text of an example before any chat template: its context, or its prior turns."""
    if example.messages:
        return "\n".join(content for _, content in example.messages[:-1])
    return example.context


# ------------------------------------------------------------------ readers


def _is_yaml(name: str | os.PathLike) -> bool:
    return str(name).lower().endswith((".yaml", ".yml"))


def _is_datafile(name: str | os.PathLike) -> bool:
    return str(name).lower().endswith(".jsonl")


def _read_jsonl(spec: TaskSpec, path: Path) -> tuple[Example, ...]:
    stat = path.stat()
    # keyed on mtime/size so an edited file is re-read; Examples are immutable, so sharing is safe
    return _read_jsonl_cached(spec, str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _read_jsonl_cached(spec: TaskSpec, path: str, mtime_ns: int, size: int) -> tuple[Example, ...]:
    out: list[Example] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                out.extend(spec.examples(parse_json(line, where), where))
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return tuple(out)


def _read_document(spec: TaskSpec, layout: qa.DocumentLayout, path: Path, split: str) -> tuple[Example, ...]:
    stat = path.stat()
    return _read_document_cached(spec, layout, str(path), split, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_document_cached(spec: TaskSpec, layout: qa.DocumentLayout, path: str, split: str,
                          mtime_ns: int, size: int) -> tuple[Example, ...]:
    """A one-document split (SQuAD, DROP): parsed whole (a few MB), walked into rows named by JSON path."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    document = parse_json(text, str(path), TaskError)
    return tuple(ex for row, where in layout.rows(document, path, split) for ex in spec.examples(row, where))


def _datasets_offline() -> bool:
    from layerzo.core.env import is_offline

    flag = os.environ.get("HF_DATASETS_OFFLINE", "").strip().upper()
    return is_offline() or flag in ("1", "ON", "YES", "TRUE")


def _local_files(spec: TaskSpec) -> str:
    """The files ``--data-dir`` must hold for a built-in task, for messages."""
    layout = DOCUMENT_LAYOUTS.get(spec.name)
    names = [layout.file_name(s) if layout else f"{s}.jsonl" for s in SPLITS]
    return " and ".join(f"{spec.name}/{n}" for n in names)


def _load_hf(spec: TaskSpec, split: str) -> list[Example]:
    if spec.hf_dataset is None:
        raise TaskError(f"task {spec.name!r} has no Hugging Face dataset; pass --data-dir")
    if _datasets_offline():
        raise OfflineError(
            f"task {spec.name!r} needs a dataset download but offline mode is set; pass --data-dir DIR "
            f"with {_local_files(spec)}"
        )
    try:
        import datasets  # heavy: only when actually downloading
    except ImportError:
        raise TaskError(f"task {spec.name!r} without --data-dir needs the 'datasets' package",
                        hint="pip install datasets, or pass --data-dir") from None

    path, config = spec.hf_dataset
    label = path if config is None else f"{path}/{config}"
    try:
        rows = datasets.load_dataset(path, config, split=split)
    except Exception as e:  # network, missing script, auth: all mean "use --data-dir"
        first_line = (str(e).splitlines() or [type(e).__name__])[0]
        raise TaskError(f"could not load {label} [{split}] from the Hub: {first_line}",
                        hint="pass --data-dir with local data files") from None
    out: list[Example] = []
    for i, row in enumerate(rows):
        where = f"hf:{label}[{split}]:{i}"
        row = dict(row)
        label_value = row.get("label")
        if type(label_value) is int and 0 <= label_value < len(spec.label_values):  # ClassLabel id -> original
            row["label"] = spec.label_values[label_value]
        out.extend(spec.examples(spec.from_hf(row), where))
    return out
