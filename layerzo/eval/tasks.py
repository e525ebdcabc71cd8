"""Which lm-eval tasks ``layerzo eval`` runs, and the offline task files for layerzo's own.

``--tasks sst2,squad,hellaswag``: a layerzo task name (:data:`OFFLINE_TASK_NAMES`:
the multiple-choice :data:`layerzo.data.tasks.TASK_NAMES` and the generative
:data:`layerzo.data.tasks.GENERATIVE_TASK_NAMES`, or its harness name
``layerzo_sst2``) runs from the YAML templates in ``recipes/lm_eval/`` on the
rows and prompts of :mod:`layerzo.data.tasks`; any other name is looked up in
lm-evaluation-harness' own registry (online use).

:func:`write_task_dir` copies the templates into a folder for a
``lm_eval.tasks.TaskManager(include_path=...)``, appending to each task YAML
what differs per run: for a multiple-choice task where its data lives
(absolute ``data_files`` paths, or the Hub dataset); for a generative task its
``generation_kwargs`` (stop strings, ``max_gen_toks`` = max_new_tokens; its
rows are read by layerzo itself, see ``utils.py``). It also writes the
settings read by the hook file ``utils.py``.
"""

from __future__ import annotations

import difflib
import json
import shutil
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from layerzo.errors import EvalError
from layerzo.recipe_files import shipped
from layerzo.data.generation import DEFAULT_MAX_NEW_TOKENS
from layerzo.data.tasks import DOCUMENT_LAYOUTS, GENERATIVE_TASK_NAMES, SPLITS, TASK_NAMES, get_task

HARNESS_PREFIX = "layerzo_"  # keeps layerzo's tasks clear of the harness' own "sst2", "rte", ...
RECIPES_DIR = shipped("lm_eval")  # package data: found in source, editable and wheel installs alike
COMMON_YAML = "_layerzo_common.yaml"  # included by the multiple-choice tasks
GENERATE_YAML = "_layerzo_generate.yaml"  # included by the generative tasks
HOOKS_FILE = "utils.py"
SETTINGS_NAME = "layerzo_eval.json"  # read by utils.py; keep the two names in step
OFFLINE_TASK_NAMES = TASK_NAMES + GENERATIVE_TASK_NAMES


def harness_task_name(task: str) -> str:
    """The harness name of a layerzo task: ``"sst2"`` -> ``"layerzo_sst2"``."""
    return HARNESS_PREFIX + task


@dataclass(frozen=True)
class TaskSelection:
    """The parsed ``--tasks`` list, in the order given, without duplicates.

    ``offline``: layerzo task names (``"sst2"``); ``harness``: names passed
    unchanged to the harness registry.
    """

    offline: tuple[str, ...]
    harness: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.offline and not self.harness:
            raise EvalError("no tasks given", "pass e.g. --tasks sst2,rte")
        unknown = [t for t in self.offline if t not in OFFLINE_TASK_NAMES]
        if unknown:
            raise EvalError(f"{unknown[0]!r} is not a layerzo task (known: {', '.join(OFFLINE_TASK_NAMES)})")

    @property
    def generative(self) -> tuple[str, ...]:
        """The offline tasks scored by greedy generations (F1 / exact match), not by candidates."""
        return tuple(t for t in self.offline if t in GENERATIVE_TASK_NAMES)

    @property
    def harness_names(self) -> tuple[str, ...]:
        """Every task under the name the harness knows it by."""
        return tuple(harness_task_name(t) for t in self.offline) + self.harness

    def display_name(self, harness_name: str) -> str:
        """``"layerzo_sst2"`` -> ``"sst2"``; harness tasks keep their name."""
        bare = harness_name.removeprefix(HARNESS_PREFIX)
        return bare if harness_name.startswith(HARNESS_PREFIX) and bare in self.offline else harness_name


def parse_tasks(spec: str | Sequence[str]) -> TaskSelection:
    """Split ``"sst2, rte,hellaswag"`` (or a list of such strings) into offline and harness names."""
    items = [spec] if isinstance(spec, str) else list(spec)
    names = [n.strip() for item in items for n in str(item).split(",") if n.strip()]
    offline: list[str] = []
    harness: list[str] = []
    for name in dict.fromkeys(names):  # ordered de-duplication
        bare = name.lower().removeprefix(HARNESS_PREFIX)
        if bare in OFFLINE_TASK_NAMES:
            if bare not in offline:
                offline.append(bare)
        else:
            harness.append(name)
    return TaskSelection(tuple(offline), tuple(harness))


def check_harness_tasks(names: Sequence[str], known: Collection[str]) -> None:
    """Refuse a name neither layerzo nor the harness knows, suggesting the closest one."""
    for name in names:
        if name in known:
            continue
        candidates = list(OFFLINE_TASK_NAMES) + [n for n in known if not n.startswith(HARNESS_PREFIX)]
        close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise EvalError(
            f"unknown task {name!r}{hint} (layerzo tasks: {', '.join(OFFLINE_TASK_NAMES)}; "
            "any lm-eval task name also works, see `lm_eval ls tasks`)"
        )


def data_file_name(task: str, split: str) -> str:
    """The file of ``split`` inside ``<data_dir>/<task>/``: ``validation.jsonl``, SQuAD's
    ``validation.json``, DROP's ``drop_dataset_dev.json``."""
    layout = DOCUMENT_LAYOUTS.get(task)
    return layout.file_name(split) if layout else f"{split}.jsonl"


def check_data_dir(tasks: Sequence[str], data_dir: str | Path) -> None:
    """Every offline task needs its two split files in ``<data_dir>/<task>/``; name the first missing one."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        state = "is a file, not a folder" if root.exists() else "does not exist"
        raise EvalError(f"data dir {root} {state}", "pass --data-dir with <task>/{train,validation}.jsonl")
    for task in tasks:
        for split in SPLITS:
            name = data_file_name(task, split)
            path = root / task / name
            if not path.is_file():
                raise EvalError(
                    f"data dir {root} has no {task}/{name} (needed by task {task})",
                    f"add {path} or drop {task} from --tasks",
                )


def _dataset_yaml(task: str, data_dir: Path | None) -> str:
    """The YAML keys telling the harness where a task's raw rows are."""
    if data_dir is None:
        spec = get_task(task)
        if spec.hf_dataset is None:
            raise EvalError(f"task {task} has no Hub dataset", "pass --data-dir")
        path, name = spec.hf_dataset
        return f"dataset_path: {json.dumps(path)}\ndataset_name: {json.dumps(name)}\n"
    # JSON strings are valid YAML double-quoted scalars, so any path is quoted safely.
    files = "".join(
        f"    {split}: {json.dumps(str(data_dir / task / f'{split}.jsonl'))}\n" for split in SPLITS
    )
    return f"dataset_path: json\ndataset_kwargs:\n  data_files:\n{files}"


def _generation_yaml(task: str, max_new_tokens: int) -> str:
    """This run's ``generation_kwargs`` of a generative task (replacing the shared file's block whole)."""
    stop = [s for s in get_task(task).stop if s]
    # Greedy spelled out: a checkpoint's generation_config.json (num_beams, repetition_penalty, ...)
    # would otherwise change what model.generate decodes; layerzo's Generator is plain argmax.
    return ("generation_kwargs:\n"
            f"  until: {json.dumps(stop)}\n"
            "  do_sample: false\n  num_beams: 1\n  repetition_penalty: 1.0\n  no_repeat_ngram_size: 0\n"
            f"  max_gen_toks: {int(max_new_tokens)}\n")


def write_task_dir(
    tasks: Sequence[str],
    out_dir: str | Path,
    *,
    data_dir: str | Path | None,
    seed: int,
    num_test: int,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    recipes_dir: Path = RECIPES_DIR,
) -> Path:
    """Write the harness task files of ``tasks`` into ``out_dir`` (created; must be empty).

    ``out_dir`` then holds ``layerzo_<task>.yaml`` per task, the shared
    ``_layerzo_common.yaml`` and ``_layerzo_generate.yaml``, the hooks
    ``utils.py`` and ``layerzo_eval.json`` (data dir, seed, num_test: which
    validation rows, in which order; max_new_tokens: the generative tasks'
    ``max_gen_toks``, also written into their YAML).
    """
    if not all((recipes_dir / name).is_file() for name in (COMMON_YAML, GENERATE_YAML, HOOKS_FILE)):
        raise EvalError(f"layerzo's lm-eval task templates are missing from {recipes_dir}",
                        "reinstall layerzo from its source tree")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise EvalError(f"task folder {out} is not empty")
    root = Path(data_dir).expanduser().resolve() if data_dir is not None else None  # harness needs absolute paths
    for name in (COMMON_YAML, GENERATE_YAML, HOOKS_FILE):
        shutil.copyfile(recipes_dir / name, out / name)
    settings = {"data_dir": str(root) if root else None, "seed": int(seed), "num_test": int(num_test),
                "max_new_tokens": int(max_new_tokens)}
    (out / SETTINGS_NAME).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    for task in tasks:
        template = recipes_dir / f"{harness_task_name(task)}.yaml"
        if not template.is_file():
            raise EvalError(f"no lm-eval template for task {task} in {recipes_dir}")
        extra = _generation_yaml(task, max_new_tokens) if task in GENERATIVE_TASK_NAMES else _dataset_yaml(task, root)
        (out / template.name).write_text(template.read_text(encoding="utf-8").rstrip("\n") + "\n" + extra,
                                         encoding="utf-8")
    return out
