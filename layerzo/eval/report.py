"""Results of ``layerzo eval``: per-task metrics of the base and the patched model,
as table rows, a JSON document and a model-card section.

Pure data and formatting; the only side effects are :func:`save_json` and
:func:`write_card_section`, both atomic (temp file in the same folder, then
``os.replace``), so a crash never leaves a half-written file.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerzo.core.atomic import atomic_write_text

CARD_SECTION_TITLE = "## lm-eval results"
PER_TOKEN_METRIC = "acc_per_token"  # argmax of the mean per-token log-likelihood: layerzo tune's scoring
METRIC_NOTES = {
    "acc": "argmax of the summed log-likelihood of each candidate (lm-eval)",
    "acc_norm": "argmax of the log-likelihood divided by the candidate's length in characters (lm-eval)",
    PER_TOKEN_METRIC: "argmax of the mean per-token log-likelihood (layerzo tune's test accuracy)",
    # the generative layerzo tasks; a harness task's own f1 / em (e.g. lm-eval's drop) follow its own rules
    "f1": "layerzo tasks: SQuAD token F1 of the greedy answer, max over the gold answers (layerzo tune's f1)",
    "em": "layerzo tasks: SQuAD exact match of the greedy answer, max over the gold answers (layerzo tune's em)",
}


@dataclass(frozen=True)
class Metric:
    value: float
    stderr: float | None = None


@dataclass(frozen=True)
class TaskResult:
    """One task's metrics from one harness run. ``num_samples``: documents scored."""

    task: str  # the name the user gave ("sst2", "hellaswag")
    harness_task: str  # the name the harness ran ("layerzo_sst2", "hellaswag")
    num_samples: int
    metrics: dict[str, Metric]


@dataclass(frozen=True)
class MetricRow:
    task: str
    metric: str
    base: float
    patched: float | None
    base_stderr: float | None
    patched_stderr: float | None

    @property
    def delta(self) -> float | None:
        return None if self.patched is None else self.patched - self.base


@dataclass(frozen=True)
class EvalReport:
    """Everything one ``layerzo eval`` measured, plus what is needed to reproduce it.

    ``base`` / ``patched`` map the task name to its result; ``patched`` is
    None when no patch was given. ``settings`` holds limit, num_fewshot, seed,
    batch_size, num_test, max_length, max_new_tokens (generative tasks) and data_dir; ``patch`` describes the patch
    (source, base model, kind, layers, base fingerprint, recorded metrics).
    """

    tasks: tuple[str, ...]
    base_model: str
    base: dict[str, TaskResult]
    patched: dict[str, TaskResult] | None
    settings: dict[str, Any]
    lm_eval_version: str
    layerzo_version: str
    patch: dict[str, Any] | None = None
    notes: tuple[str, ...] = field(default=())

    def rows(self) -> list[MetricRow]:
        """One row per (task, metric), tasks in the order given, metrics as the harness listed them."""
        out = []
        for task in self.tasks:
            base = self.base[task]
            patched = self.patched[task] if self.patched is not None else None
            for name, metric in base.metrics.items():
                other = patched.metrics.get(name) if patched is not None else None
                out.append(MetricRow(task, name, metric.value, other.value if other else None,
                                     metric.stderr, other.stderr if other else None))
        return out

    def to_dict(self) -> dict[str, Any]:
        results = {}
        for task in self.tasks:
            base = self.base[task]
            entry: dict[str, Any] = {"harness_task": base.harness_task, "num_samples": base.num_samples,
                                     "metrics": {}}
            for row in (r for r in self.rows() if r.task == task):
                entry["metrics"][row.metric] = {
                    "base": row.base, "base_stderr": row.base_stderr,
                    "patched": row.patched, "patched_stderr": row.patched_stderr, "delta": row.delta,
                }
            results[task] = entry
        return {
            "layerzo_version": self.layerzo_version,
            "lm_eval_version": self.lm_eval_version,
            "base_model": self.base_model,
            "patch": self.patch,
            **self.settings,
            "tasks": list(self.tasks),
            "results": results,
            "metric_notes": {k: v for k, v in METRIC_NOTES.items() if any(r.metric == k for r in self.rows())},
            "notes": list(self.notes),
        }


def _num(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def format_stderr(row: MetricRow) -> str:
    """``"0.0340"`` or ``"0.0340 / 0.0335"`` (base / patched)."""
    if row.patched is None:
        return _num(row.base_stderr)
    return f"{_num(row.base_stderr)} / {_num(row.patched_stderr)}"


def table_cells(row: MetricRow) -> list[str]:
    """task, metric, base, patched, delta, stderr - as shown by the CLI table and the card."""
    return [row.task, row.metric, _num(row.base), _num(row.patched), _num(row.delta, signed=True), format_stderr(row)]


TABLE_HEADER = ("task", "metric", "base", "patched", "delta", "stderr (base / patched)")


def card_section(report: EvalReport) -> str:
    """Markdown section for the patch's README.md (title line included, ends with a newline)."""
    s = report.settings
    shots = s.get("num_fewshot") or 0
    limit = s.get("limit")
    lines = [
        CARD_SECTION_TITLE,
        "",
        f"Measured with `layerzo eval` (lm-evaluation-harness {report.lm_eval_version}, layerzo "
        f"{report.layerzo_version}) on base `{report.base_model}` and base + this patch, {shots}-shot, "
        f"{'limit ' + str(limit) if limit else 'all test rows'}, seed {s.get('seed')}.",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---|" * len(TABLE_HEADER),
    ]
    lines += ["| " + " | ".join(table_cells(row)) + " |" for row in report.rows()]
    used = [k for k in METRIC_NOTES if any(r.metric == k for r in report.rows())]
    if used:
        lines.append("")
        lines += [f"- `{k}`: {METRIC_NOTES[k]}" for k in used]
    return "\n".join(lines) + "\n"


def replace_section(markdown: str, section: str) -> str:
    """``markdown`` with its "## lm-eval results" section replaced by ``section`` (appended if absent).

    A section runs from its title to the next heading of level 1 or 2, or the end.
    """
    lines = markdown.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == CARD_SECTION_TITLE), None)
    if start is None:
        sep = "" if not markdown or markdown.endswith("\n\n") else ("\n" if markdown.endswith("\n") else "\n\n")
        return markdown + sep + section
    end = next((j for j in range(start + 1, len(lines)) if re.match(r"^#{1,2} ", lines[j])), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + section + ("\n" + tail if tail else "")


def save_json(report: EvalReport, path: str | os.PathLike) -> Path:
    """Write ``report.to_dict()`` as JSON to ``path`` atomically."""
    out = Path(path).expanduser()
    atomic_write_text(out, json.dumps(report.to_dict(), indent=2, allow_nan=False, default=str) + "\n")
    return out


def write_card_section(card_path: str | os.PathLike, report: EvalReport) -> Path:
    """Add or replace the "lm-eval results" section of a model card (README.md), atomically."""
    path = Path(card_path).expanduser()
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    atomic_write_text(path, replace_section(text, card_section(report)))
    return path
