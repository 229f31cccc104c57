"""A progress bar for long loops (decoder layers, evaluation windows): item i of n, elapsed, ETA.

::

    with layer_progress(len(layers), "Quantizing") as bar:
        for layer in layers:
            ...
            bar.advance()

renders ``Quantizing ━━━━━━━━━━━━━━━━━━━━━━ layer 12/30 0:01:02 ETA 0:01:33``. On a terminal the bar
updates in place; when the output is not a TTY (CI logs, a file) rich draws it once, when the loop
ends, so logs hold one final line instead of hundreds of redraws. ``enabled=False`` silences it
completely (the methods still work, so callers need no ``if``).
"""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from typing_extensions import Self


class LayerProgress:
    """Context manager around one rich task; see :func:`layer_progress`."""

    def __init__(
        self,
        total: int,
        description: str,
        *,
        enabled: bool = True,
        console: Console | None = None,
        unit: str = "layer",
    ) -> None:
        if not isinstance(total, int) or total < 0:
            raise ValueError(
                f"total={total!r} must be a non-negative integer (the number of items to process)."
            )
        self.total = total
        self.description = description
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[unit]} {task.completed:.0f}/{task.total:.0f}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self._task: TaskID = self._progress.add_task(description, total=total, unit=unit)

    @property
    def completed(self) -> int:
        return int(self._progress.tasks[0].completed)

    def advance(self, n: int = 1) -> None:
        """Mark ``n`` more items done."""
        self._progress.advance(self._task, n)

    def update(self, *, description: str | None = None, completed: int | None = None) -> None:
        """Change the label (e.g. the current layer's name) or set the done count directly."""
        kwargs = {}
        if description is not None:
            kwargs["description"] = description
        if completed is not None:
            kwargs["completed"] = completed
        self._progress.update(self._task, **kwargs)

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()


def layer_progress(
    total: int,
    description: str = "Quantizing",
    *,
    enabled: bool = True,
    console: Console | None = None,
    unit: str = "layer",
) -> LayerProgress:
    """A progress bar over ``total`` items (layers by default), to use as a context manager.

    Args:
        total: number of items.
        description: label on the left.
        enabled: False draws nothing (for ``--quiet`` or library use).
        console: rich console to draw on (default: stderr-aware global console).
        unit: word shown before ``i/n`` (``layer``, ``window``, ...).
    """
    return LayerProgress(total, description, enabled=enabled, console=console, unit=unit)
