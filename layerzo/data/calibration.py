"""Calibration texts for activation profiling: which source, and reading it.

``layerzo profile`` calibrates on a task's training inputs (``--task``), on a
file of texts (``--calib``), or, with neither, on a few built-in generic
English sentences. :func:`calibration_for` makes that choice;
:mod:`layerzo.profile.run` only runs the texts it is given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from layerzo.data.spec import parse_json
from layerzo.data.tasks import calibration_texts
from layerzo.errors import ConfigError, DataRowError

DEFAULT_CALIBRATION_TEXTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "In 1969, astronauts landed on the Moon and walked on its dusty surface for the first time.",
    "Please remember to bring your umbrella tomorrow, because the forecast says it will rain all day.",
    "Water boils at one hundred degrees Celsius at sea level, but at lower temperatures on mountains.",
    "She opened the old book, blew the dust off its pages, and began to read the first chapter aloud.",
    "The committee will meet on Tuesday to discuss the budget, the new hires, and the office move.",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
    "After a long day at work, he cooked a simple dinner of rice, beans and grilled vegetables.",
)
DEFAULT_DESCRIPTION = "built-in generic English sentences"


@dataclass(frozen=True)
class Calibration:
    """The texts to profile on, the ``description`` a profile report records, and an optional ``note`` for the user."""

    texts: tuple[str, ...]
    description: str
    note: str | None = None


def calibration_for(
    *,
    task: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    text_file: str | os.PathLike | None = None,
    num_sequences: int = 8,
    seed: int = 0,
) -> Calibration:
    """The calibration source: ``task``'s training inputs, ``text_file``'s texts, else the built-in sentences.

    ``task`` (a built-in name or a task YAML, rows from ``data_dir``) gives
    ``num_sequences`` training contexts sampled with ``seed``; ``text_file`` is
    read by :func:`read_calibration_file`. Giving both is a ConfigError. Cheap
    next to a model load, so call it first: a bad task or file fails fast.
    """
    if task is not None and text_file is not None:
        raise ConfigError("give either --task or --calib, not both")
    if task is not None:
        texts = calibration_texts(task, data_dir, n=num_sequences, seed=seed)
        return Calibration(tuple(texts), f"task {task} (training inputs, seed {seed})")
    if text_file is not None:
        return Calibration(tuple(read_calibration_file(text_file)), f"file {text_file}")
    return Calibration(DEFAULT_CALIBRATION_TEXTS, DEFAULT_DESCRIPTION,
                       note=f"no --task or --calib: calibrating on {DEFAULT_DESCRIPTION}")


def read_calibration_file(path: str | os.PathLike) -> list[str]:
    """Texts for ``--calib``: ``.jsonl`` rows with a ``"text"`` string, otherwise one text per line."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"calibration file {path} is a folder, not a file")
    if not path.is_file():
        raise ConfigError(f"calibration file {path} does not exist")
    texts: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    texts.append(_calibration_text(path, lineno, line))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"calibration file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not texts:
        raise ConfigError(f"calibration file {path} has no texts")
    return texts


def _calibration_text(path: Path, lineno: int, line: str) -> str:
    """One line of a calibration file: the line itself, or a ``.jsonl`` row's ``"text"``."""
    if path.suffix.lower() != ".jsonl":
        return line.rstrip("\n")
    row = parse_json(line, f"{path}:{lineno}")
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise DataRowError(f'{path}:{lineno}: expected an object with a "text" string')
    return row["text"]
