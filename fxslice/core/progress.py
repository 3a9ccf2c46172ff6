"""Progress bars (rich) that stay silent when output is not a terminal or when disabled."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["progress_bar"]

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
