"""rich progress bars and logs on stderr (stdout is for results)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

stderr_console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second over the whole run (steadier than rich's windowed speed)."""

    def __init__(self, unit: str = "img/s") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        if elapsed <= 0 or not task.completed:
            return Text(f"  --- {self.unit}")
        return Text(f"{task.completed / elapsed:6.1f} {self.unit}")


def make_progress(label: str, unit: str = "img/s", *fields: str) -> Progress:
    """A progress bar: label, bar, n/total, rate, elapsed, plus ``task.fields`` named in ``fields``."""
    cols: list = [TextColumn(label), BarColumn(), MofNCompleteColumn(), RateColumn(unit), TimeElapsedColumn()]
    cols += [TextColumn(f"{{task.fields[{f}]}}") for f in fields]
    return Progress(*cols, console=stderr_console, transient=False)


def log(message: str) -> None:
    stderr_console.print(message, highlight=False)
