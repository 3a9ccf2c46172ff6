"""Progress bars (rich) that stay silent when output is not a terminal or when disabled."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["progress_bar", "StepProgress"]

T = TypeVar("T")


def progress_bar(items: Iterable[T], description: str, *, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    """Iterate over `items`, showing a bar on stderr when `enabled`."""
    if not enabled:
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False, console=Console(stderr=True)) as bar:
        total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)  # type: ignore[arg-type]
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

    def __enter__(self) -> StepProgress:
        if self.enabled:
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("{task.fields[status]}"))
            self._bar = Progress(*columns, transient=False, console=Console(stderr=True))
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, status="")
        return self

    def advance(self, status: str = "") -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, status=status)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
