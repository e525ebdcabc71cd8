"""One rich progress bar on stderr, shared by tune and sweep (results stay on stdout)."""

from __future__ import annotations


class StderrBar:
    """title | bar | done/total | elapsed | ETA | info — a no-op when ``enabled`` is False."""

    def __init__(self, title: str, total: int, enabled: bool = True) -> None:
        self.enabled = enabled and total > 0
        if self.enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._p = Progress(TextColumn("{task.fields[title]}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                               console=Console(stderr=True))
            self._task = self._p.add_task(title, total=total, title=title, info="")

    def __enter__(self) -> "StderrBar":
        if self.enabled:
            self._p.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._p.__exit__(*exc)

    def update(self, *, completed: int | None = None, advance: int | None = None, info: str | None = None,
               title: str | None = None) -> None:
        if not self.enabled:
            return
        fields = {k: v for k, v in (("info", info), ("title", title)) if v is not None}
        self._p.update(self._task, completed=completed, advance=advance, **fields)
