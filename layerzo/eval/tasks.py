"""Which lm-eval tasks ``layerzo eval`` runs, and the offline task files for layerzo's own.

``--tasks sst2,rte,hellaswag``: a layerzo task name (:data:`layerzo.data.tasks.TASK_NAMES`,
or its harness name ``layerzo_sst2``) runs from the YAML templates in
``recipes/lm_eval/`` on the rows and prompts of :mod:`layerzo.data.tasks`; any
other name is looked up in lm-evaluation-harness' own registry (online use).

:func:`write_task_dir` copies the templates into a folder for a
``lm_eval.tasks.TaskManager(include_path=...)``, appending to each task YAML
where its data lives (absolute ``data_files`` paths, or the Hub dataset) and
writing the sampling settings read by the hook file ``utils.py``.
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
from layerzo.data.tasks import SPLITS, TASK_NAMES, get_task

HARNESS_PREFIX = "layerzo_"  # keeps layerzo's tasks clear of the harness' own "sst2", "rte", ...
RECIPES_DIR = shipped("lm_eval")  # package data: found in source, editable and wheel installs alike
COMMON_YAML = "_layerzo_common.yaml"
HOOKS_FILE = "utils.py"
SETTINGS_NAME = "layerzo_eval.json"  # read by utils.py; keep the two names in step


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
        unknown = [t for t in self.offline if t not in TASK_NAMES]
        if unknown:
            raise EvalError(f"{unknown[0]!r} is not a layerzo task (known: {', '.join(TASK_NAMES)})")

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
        if bare in TASK_NAMES:
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
        candidates = list(TASK_NAMES) + [n for n in known if not n.startswith(HARNESS_PREFIX)]
        close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise EvalError(
            f"unknown task {name!r}{hint} (layerzo tasks: {', '.join(TASK_NAMES)}; "
            "any lm-eval task name also works, see `lm_eval ls tasks`)"
        )


def check_data_dir(tasks: Sequence[str], data_dir: str | Path) -> None:
    """Every offline task needs ``<data_dir>/<task>/{train,validation}.jsonl``; name the first missing file."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        state = "is a file, not a folder" if root.exists() else "does not exist"
        raise EvalError(f"data dir {root} {state}", "pass --data-dir with <task>/{train,validation}.jsonl")
    for task in tasks:
        for split in SPLITS:
            path = root / task / f"{split}.jsonl"
            if not path.is_file():
                raise EvalError(
                    f"data dir {root} has no {task}/{split}.jsonl (needed by task {task})",
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


def write_task_dir(
    tasks: Sequence[str],
    out_dir: str | Path,
    *,
    data_dir: str | Path | None,
    seed: int,
    num_test: int,
    recipes_dir: Path = RECIPES_DIR,
) -> Path:
    """Write the harness task files of ``tasks`` into ``out_dir`` (created; must be empty).

    ``out_dir`` then holds ``layerzo_<task>.yaml`` per task, the shared
    ``_layerzo_common.yaml``, the hooks ``utils.py`` and ``layerzo_eval.json``
    (data dir, seed, num_test: which validation rows, in which order).
    """
    if not (recipes_dir / COMMON_YAML).is_file():
        raise EvalError(f"layerzo's lm-eval task templates are missing from {recipes_dir}",
                        "reinstall layerzo from its source tree")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise EvalError(f"task folder {out} is not empty")
    root = Path(data_dir).expanduser().resolve() if data_dir is not None else None  # harness needs absolute paths
    for name in (COMMON_YAML, HOOKS_FILE):
        shutil.copyfile(recipes_dir / name, out / name)
    settings = {"data_dir": str(root) if root else None, "seed": int(seed), "num_test": int(num_test)}
    (out / SETTINGS_NAME).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    for task in tasks:
        template = recipes_dir / f"{harness_task_name(task)}.yaml"
        if not template.is_file():
            raise EvalError(f"no lm-eval template for task {task} in {recipes_dir}")
        text = template.read_text(encoding="utf-8").rstrip("\n") + "\n" + _dataset_yaml(task, root)
        (out / template.name).write_text(text, encoding="utf-8")
    return out
