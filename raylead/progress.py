"""A rich progress bar for long driver-side loops (Ray Data adds its own per-stage bars)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@contextmanager
def progress_bar(label: str, total: int) -> Iterator[Callable[[int, int], None]]:
    """Yields ``update(done, total)``; draws to stderr, and only on a terminal."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
        disable=not sys.stderr.isatty(),
    )
    task = progress.add_task(label, total=total)

    def update(done: int, new_total: int) -> None:
        progress.update(task, completed=done, total=new_total)

    with progress:
        yield update
