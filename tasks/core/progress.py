"""Progress bars for stages that take longer than a moment.

Shown on an interactive terminal (stderr is a TTY) or when
``GUIDEDRL_PROGRESS=1``; silent in CI logs and tests (``GUIDEDRL_PROGRESS=0``).
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def enabled() -> bool:
    flag = os.environ.get("GUIDEDRL_PROGRESS")
    if flag is not None:
        return flag not in ("0", "", "false", "no")
    return sys.stderr.isatty()


def track(items: Iterable[T], description: str, total: int | None = None, size: Callable[[T], int] | None = None) -> Iterator[T]:
    """Yield ``items`` with a bar; ``size``: how many units an item counts for (rows of a batch), default 1."""
    if not enabled():
        yield from items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task, size(item) if size else 1)
