"""The one rich console, progress bars with rate and ETA, and end-of-stage summary tables."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

console = Console(stderr=True, highlight=False)
out = Console(highlight=False)


class RateColumn(ProgressColumn):
    """Items per second, in the unit given by the task's ``unit`` field (default "it")."""

    def render(self, task) -> Text:  # type: ignore[override]
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        if speed is None:
            return Text(f"? {unit}/s", style="progress.data.speed")
        shown = f"{speed:,.1f}" if speed < 100 else f"{speed:,.0f}"
        return Text(f"{shown} {unit}/s", style="progress.data.speed")


def progress(transient: bool = False) -> Progress:
    """A progress bar with count, rate and ETA. Quiet when stderr is not a terminal unless forced."""
    disable = os.environ.get("LLMCTL_PROGRESS", "") == "0" or (
        not sys.stderr.isatty() and os.environ.get("LLMCTL_PROGRESS", "") != "1"
    )
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=disable,
    )


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def or_na(v: object, fmt: str) -> str:
    """``fmt.format(v)``, or "n/a" for a statistic a run did not produce (None)."""
    return "n/a" if v is None else fmt.format(v)


def summary(title: str, rows: Mapping[str, object] | list[tuple[str, object]]) -> None:
    """Print a two-column table at the end of a stage (to stdout, so it can be captured)."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    items = rows.items() if isinstance(rows, Mapping) else rows
    for k, v in items:
        table.add_row(str(k), _fmt(v))
    out.print(table)


def table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[_fmt(v) for v in r])
    out.print(t)
