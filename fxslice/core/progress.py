"""Progress on stderr: rich bars on a terminal; elsewhere (CI logs, `nohup`, a notebook's captured output) plain
lines, one every `PLAIN_EVERY` seconds and one at the end, with the count, the elapsed time and an estimate of what
is left — a bar that redraws in place shows nothing there until it is done."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["progress_bar", "StepProgress", "PLAIN_EVERY"]

T = TypeVar("T")

#: seconds between two plain progress lines
PLAIN_EVERY = 15.0


class _Lines:
    """Progress as plain lines (see the module docstring)."""

    def __init__(self, description: str, total: int | None):
        self.description, self.total, self.done = description, total, 0
        self.start = self.last = time.monotonic()

    def advance(self, status: str = "") -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last >= PLAIN_EVERY or self.done == self.total:
            self.last = now
            elapsed = now - self.start
            count = f"{self.done}/{self.total}" if self.total else str(self.done)
            left = (f", about {elapsed / self.done * (self.total - self.done):.0f} s left"
                    if self.total and self.done < self.total else "")
            print(f"{self.description}: {count} in {elapsed:.0f} s{left}{'  ' + status if status else ''}",
                  file=sys.stderr, flush=True)


def _plain() -> bool:
    return not sys.stderr.isatty()


def progress_bar(items: Iterable[T], description: str, *, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    """Iterate over `items`, showing a bar on stderr when `enabled`."""
    if not enabled:
        yield from items
        return
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)  # type: ignore[arg-type]
    if _plain():
        lines = _Lines(description, total)
        for item in items:
            yield item
            lines.advance()
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


class StepProgress:
    """A bar over `total` steps whose line also shows a status (a training loss, say) that changes per step:
    `with StepProgress(100, "recovery", enabled=True) as bar: bar.advance("loss 2.31")`."""

    def __init__(self, total: int, description: str, *, enabled: bool = True):
        self.total, self.description, self.enabled = total, description, enabled
        self._bar: Progress | None = None
        self._lines: _Lines | None = None

    def __enter__(self) -> StepProgress:
        if self.enabled and _plain():
            self._lines = _Lines(self.description, self.total)
        elif self.enabled:
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("{task.fields[status]}"))
            self._bar = Progress(*columns, transient=False, console=Console(stderr=True))
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, status="")
        return self

    def advance(self, status: str = "") -> None:
        if self._lines is not None:
            self._lines.advance(status)
        if self._bar is not None:
            self._bar.update(self._task, advance=1, status=status)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
