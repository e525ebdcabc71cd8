"""Progress on stderr, shared by tune and sweep (results stay on stdout).

On a terminal it is one rich bar. Anywhere else (nohup, CI, a scheduler's log file) a bar
is invisible, so a plain line is printed every ``LAYERZO_PROGRESS_SECONDS`` seconds
(default 30; 0 = at every update) and once at the end, as tqdm does in logs::

    tune: step 120/1000 (12%)  loss 0.6931  dev 0.712  2.31 steps/s  ETA 6m21s

The ETA is wall-clock time (evaluations included) over the progress made by this
process: a resumed run's earlier steps do not count as fast ones.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Callable, Mapping, TextIO

from layerzo.errors import ConfigError

PROGRESS_SECONDS_ENV = "LAYERZO_PROGRESS_SECONDS"
DEFAULT_PROGRESS_SECONDS = 30.0


def progress_interval(environ: Mapping[str, str] | None = None) -> float:
    """Seconds between two plain progress lines: ``LAYERZO_PROGRESS_SECONDS`` (read now), else 30."""
    raw = (os.environ if environ is None else environ).get(PROGRESS_SECONDS_ENV, "").strip()
    if not raw:
        return DEFAULT_PROGRESS_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{PROGRESS_SECONDS_ENV}={raw[:40]!r} is not a number of seconds >= 0",
                          f"unset it, or set it to e.g. {DEFAULT_PROGRESS_SECONDS:g}")
    return value


def format_duration(seconds: float) -> str:
    """``45s``, ``6m21s``, ``2h05m`` (rounded to the second)."""
    total = max(int(round(seconds)), 0)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def plain_line(title: str, done: int, total: int, info: str = "", *, unit: str = "",
               eta: float | None = None) -> str:
    """``tune: step 120/1000 (12%)  <info>  ETA 6m21s`` (``ETA ?`` while no rate is known)."""
    count = f"{unit} {done}/{total}" if unit else f"{done}/{total}"
    parts = [f"{title}: {count} ({100 * done // total if total else 100}%)"]
    if info:
        parts.append(info)
    parts.append(f"ETA {format_duration(eta) if eta is not None else '?'}")
    return "  ".join(parts)


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class StderrBar:
    """title | bar | done/total | elapsed | ETA | info — a no-op when ``enabled`` is False.

    ``start``: units already done when the bar starts (a resumed run). When ``stream``
    (default: stderr) is not a terminal, plain lines replace the bar: one every
    ``interval`` seconds (default: :func:`progress_interval`) by ``clock``, and one at the end.
    """

    def __init__(self, title: str, total: int, enabled: bool = True, *, unit: str = "", start: int = 0,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 interval: float | None = None) -> None:
        self.enabled = enabled and total > 0
        self.title, self.total, self.unit, self.info = title, total, unit, ""
        self.start = self.completed = start
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.plain = self.enabled and not is_terminal(self.stream)
        self.lines = 0  # plain lines printed
        if self.plain:
            self.interval = progress_interval() if interval is None else interval
            self.t0 = self.last_print = clock()
            self.pending = False  # an update not printed yet
        elif self.enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            console = Console(stderr=True) if stream is None else Console(file=stream)
            self._p = Progress(TextColumn("{task.fields[title]}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                               console=console)
            self._task = self._p.add_task(title, total=total, completed=start, title=title, info="")

    def __enter__(self) -> "StderrBar":
        if self.plain:
            self.t0 = self.last_print = self.clock()
        elif self.enabled:
            self._p.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.plain:
            if self.pending:  # the last state, whatever the interval
                self.emit(self.clock())
        elif self.enabled:
            self._p.__exit__(*exc)

    def update(self, *, completed: int | None = None, advance: int | None = None, info: str | None = None,
               title: str | None = None) -> None:
        if not self.enabled:
            return
        if not self.plain:
            fields = {k: v for k, v in (("info", info), ("title", title)) if v is not None}
            self._p.update(self._task, completed=completed, advance=advance, **fields)
            return
        if completed is not None:
            self.completed = completed
        self.completed += advance or 0
        self.info = self.info if info is None else info
        self.title = self.title if title is None else title
        self.pending = True
        now = self.clock()
        if now - self.last_print >= self.interval:
            self.emit(now)

    def eta(self, now: float) -> float | None:
        """Seconds left at this process's pace so far; None before any progress."""
        remaining, done, elapsed = self.total - self.completed, self.completed - self.start, now - self.t0
        if remaining <= 0:
            return 0.0
        return remaining * elapsed / done if done > 0 and elapsed > 0 else None

    def emit(self, now: float) -> None:
        line = plain_line(self.title, self.completed, self.total, self.info, unit=self.unit, eta=self.eta(now))
        self.stream.write(line + "\n")
        self.stream.flush()
        self.last_print, self.pending = now, False
        self.lines += 1
