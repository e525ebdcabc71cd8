"""Benchmark tasks: read rows, render MeZO prompts, sample train/dev/test splits.

Built-in tasks (:data:`TASK_NAMES`) read ``<data_dir>/<task>/{train,validation}.jsonl``
in the ORIGINAL GLUE/SuperGLUE field layouts, or, when ``data_dir`` is None and
the network is allowed, the Hugging Face datasets MeZO uses. A user task is a
small YAML file (see ``recipes/tasks/example_sentiment.yaml``) naming its JSONL
files, a ``{field}`` template and the candidates.

Every row becomes one or more :class:`Example` (MultiRC: one per answer); the
shared types live in :mod:`layerzo.data.spec`. ``Example.context +
Example.candidates[i]`` is exactly MeZO's verbalized text for candidate ``i``;
``candidates[label]`` is the correct one.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import random
from pathlib import Path

from layerzo.data import templates
from layerzo.data.spec import Example, Row, TaskSpec, TaskSplits, need_field
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
TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _BUILTIN}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


# ------------------------------------------------------------------ public API


def get_task(name: str | os.PathLike) -> TaskSpec:
    """The spec of a built-in task, or of a user task given as a ``.yaml`` path."""
    if _is_yaml(name):
        from layerzo.data.user_tasks import load_task_yaml  # the YAML side stays out of the import of built-ins

        return load_task_yaml(Path(name))
    key = str(name).strip().lower().replace("-", "")
    if key in TASKS:
        return TASKS[key]
    close = difflib.get_close_matches(key, TASK_NAMES, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise TaskError(f"unknown task {str(name)!r}{hint} (known: {', '.join(TASK_NAMES)}, or a task .yaml file)")


def load_examples(
    name_or_yaml: str | os.PathLike, split: str, data_dir: str | os.PathLike | None = None
) -> list[Example]:
    """Every example of one split ("train" or "validation"), in file order.

    Reads ``<data_dir>/<task>/<split>.jsonl`` (built-ins), the YAML's file (user
    tasks), or the Hugging Face dataset when ``data_dir`` is None.
    """
    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    spec = get_task(name_or_yaml)
    if spec.files:
        path = dict(spec.files)[split]
    elif data_dir is not None:
        path = Path(data_dir) / spec.name / f"{split}.jsonl"
    else:
        return _load_hf(spec, split)
    if not path.is_file():
        raise TaskError(f"no {split} data for task {spec.name!r}: expected the file {path}")
    return list(_read_jsonl(spec, path))


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
    """
    for arg, value, low in (("num_train", num_train, 1), ("num_dev", num_dev, 0), ("num_test", num_test, 0)):
        if type(value) is not int or value < low:
            raise TaskError(f"{arg} must be an integer >= {low}, got {value!r}")
    spec = get_task(name_or_yaml)
    pool = load_examples(name_or_yaml, "train", data_dir)
    if not pool:
        raise TaskError(f"task {spec.name!r} has an empty training set; add rows to its train.jsonl")
    validation = load_examples(name_or_yaml, "validation", data_dir)
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
    return TaskSplits(spec.name, train, dev, tuple(validation[i] for i in test_ids))


def calibration_texts(name_or_yaml: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                      n: int = 8, seed: int = 0) -> list[str]:
    """``n`` training contexts (seeded sample) for activation profiling."""
    if type(n) is not int or n < 1:
        raise TaskError(f"n must be an integer >= 1, got {n!r}")
    pool = load_examples(name_or_yaml, "train", data_dir)
    if not pool:
        raise TaskError(f"task {get_task(name_or_yaml).name!r} has an empty training set")
    picks = random.Random(seed).sample(range(len(pool)), min(n, len(pool)))
    return [pool[i].context for i in picks]


# ------------------------------------------------------------------ readers


def _is_yaml(name: str | os.PathLike) -> bool:
    return str(name).lower().endswith((".yaml", ".yml"))


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
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataRowError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
                except RecursionError:  # thousands of nested brackets
                    raise DataRowError(f"{where}: JSON nested too deeply to be a data row") from None
                out.extend(spec.examples(row, where))
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return tuple(out)


def _datasets_offline() -> bool:
    from layerzo.core.env import is_offline

    flag = os.environ.get("HF_DATASETS_OFFLINE", "").strip().upper()
    return is_offline() or flag in ("1", "ON", "YES", "TRUE")


def _load_hf(spec: TaskSpec, split: str) -> list[Example]:
    if spec.hf_dataset is None:
        raise TaskError(f"task {spec.name!r} has no Hugging Face dataset; pass --data-dir")
    if _datasets_offline():
        raise OfflineError(
            f"task {spec.name!r} needs a dataset download but offline mode is set; pass --data-dir DIR "
            f"with {spec.name}/train.jsonl and {spec.name}/validation.jsonl"
        )
    try:
        import datasets  # heavy: only when actually downloading
    except ImportError:
        raise TaskError(f"task {spec.name!r} without --data-dir needs the 'datasets' package",
                        hint="pip install datasets, or pass --data-dir") from None

    path, config = spec.hf_dataset
    try:
        rows = datasets.load_dataset(path, config, split=split)
    except Exception as e:  # network, missing script, auth: all mean "use --data-dir"
        first_line = (str(e).splitlines() or [type(e).__name__])[0]
        raise TaskError(f"could not load {path}/{config} [{split}] from the Hub: {first_line}",
                        hint="pass --data-dir with local JSONL files") from None
    out: list[Example] = []
    for i, row in enumerate(rows):
        where = f"hf:{path}/{config}[{split}]:{i}"
        row = dict(row)
        label = row.get("label")
        if type(label) is int and 0 <= label < len(spec.label_values):  # ClassLabel id -> original value
            row["label"] = spec.label_values[label]
        out.extend(spec.examples(spec.from_hf(row), where))
    return out
