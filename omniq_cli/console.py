"""Every byte the `omniq` command writes goes through here.

Plain, script-friendly text by default; rich tables, colours and progress bars
only when the stream they go to is a terminal. rich is imported only then, so
scripts and `omniq --help` never pay for it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

PROG = "omniq"


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()


def stdin_is_tty() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


# --- plain output -----------------------------------------------------------------------------


def line(text: str = "", *, flush: bool = False) -> None:
    """One line on stdout (ids, values): what scripts read."""
    sys.stdout.write(text + "\n")
    if flush:
        sys.stdout.flush()


def write(text: str, *, err: bool = False) -> None:
    """Text as it came (a shell task's output), to stdout or stderr, flushed."""
    stream = sys.stderr if err else sys.stdout
    stream.write(text)
    stream.flush()


def json_line(value: Any, *, flush: bool = False) -> None:
    """One JSON document on one line of stdout (`--json`; JSON lines for streams)."""
    line(to_json(value), flush=flush)


def to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))


def error(message: str) -> None:
    """A user-facing error: one or two readable lines on stderr."""
    _stderr(f"{PROG}: error: {message}")


def warn(message: str) -> None:
    _stderr(f"{PROG}: warning: {message}")


def info(message: str) -> None:
    """Human-oriented notes on stderr, so stdout stays parseable."""
    _stderr(message)


def _stderr(text: str) -> None:
    if _LIVE:  # a bar is drawn on stderr: print above it, not through it
        _LIVE[-1].console.print(text.rstrip("\n"), markup=False, highlight=False)
        return
    sys.stdout.flush()  # keep stdout and stderr in order on a shared terminal
    sys.stderr.write(text.rstrip("\n") + "\n")
    sys.stderr.flush()


_LIVE: list[Any] = []  # the rich progress bars drawn now (at most one in practice)


def iso(moment: datetime | None) -> str:
    """Aware UTC time as ISO 8601 with milliseconds and a Z."""
    if moment is None:
        return "-"
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def ago(moment: datetime | None, now: datetime | None = None) -> str:
    """'3s ago', '5m ago': how old a heartbeat is, for people."""
    if moment is None:
        return "-"
    seconds = max(0.0, ((now or datetime.now(UTC)) - moment).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


# --- rich, on terminals only ------------------------------------------------------------------


@functools.cache
def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def table(
    columns: Sequence[str], rows: Sequence[Sequence[str]], *, title: str | None = None
) -> None:
    """A rich table on a terminal; tab-separated lines without a header otherwise."""
    if not stdout_is_tty():
        for row in rows:
            line("\t".join(row))
        return
    from rich.table import Table

    grid = Table(title=title, title_justify="left", header_style="bold")
    for index, name in enumerate(columns):
        # The first column (a time, a key) reads badly when folded; later ones may fold.
        grid.add_column(name, overflow="fold", no_wrap=index == 0)
    for row in rows:
        grid.add_row(*row)
    _console().print(grid)


_EVENT_STYLE = {
    "completed": "green",
    "failed": "red",
    "timeout": "red",
    "expired": "yellow",
    "cancelled": "yellow",
    "retried": "yellow",
    "started": "cyan",
    "progress": "blue",
    "output": "dim",
}


def stream_line(fields: Sequence[str], kind_at: int) -> None:
    """One live event: tab-separated when piped; on a terminal aligned, its type coloured."""
    if not stdout_is_tty():
        line("\t".join(fields), flush=True)
        return
    from rich.markup import escape

    shown = [escape(f) for f in fields]
    kind = fields[kind_at]
    style = _EVENT_STYLE.get(kind, "default")
    shown[kind_at] = f"[{style}]{escape(kind):<9}[/{style}]"
    shown[0] = f"[dim]{shown[0]}[/dim]"
    _console().print("  ".join(shown), soft_wrap=True)  # long lines wrap like plain text


def confirm(question: str) -> bool:
    """Ask on the terminal; anything but y/yes is a no."""
    _stderr(f"{question} [y/N] ")
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


class Progress:
    """Counts work done; draws a bar on stderr only when stderr is a terminal."""

    def __init__(self, total: int | None, description: str) -> None:
        self.total = total
        self.description = description
        self._bar: Any = None
        self._task: Any = None

    def advance(self, amount: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, amount)


@contextlib.contextmanager
def progress(total: int | None, description: str) -> Iterator[Progress]:
    meter = Progress(total, description)
    if not stderr_is_tty():
        yield meter
        return
    from rich.progress import Progress as RichProgress

    # The bar is on stderr. When stdout is the same terminal, what is written to it is
    # printed above the bar; when stdout is a file or pipe it must not go through the bar.
    shared = stdout_is_tty()
    bar_console = _console(stderr=True)
    with RichProgress(
        console=bar_console, transient=True, redirect_stdout=shared, redirect_stderr=False
    ) as bar:
        meter._bar = bar
        meter._task = bar.add_task(description, total=total)
        yield meter


class Counter:
    """Counts bulk work (`retry --all-failed`); a bar on a terminal once the total is large."""

    def __init__(self, description: str, show_from: int) -> None:
        self.description = description
        self.show_from = show_from
        self._bar: Any = None
        self._task: Any = None

    def update(self, done: int, total: int) -> None:
        if self._bar is None and total >= self.show_from and stderr_is_tty():
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(console=_console(stderr=True), transient=True,
                                     redirect_stdout=False, redirect_stderr=False)
            self._bar.start()
            _LIVE.append(self._bar)
            self._task = self._bar.add_task(self.description, total=total)
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total)

    def close(self) -> None:
        if self._bar is not None:
            _LIVE.remove(self._bar)
            self._bar.stop()
            self._bar = None


@contextlib.contextmanager
def counter(description: str, show_from: int = 20) -> Iterator[Counter]:
    meter = Counter(description, show_from)
    try:
        yield meter
    finally:
        meter.close()


class TaskBar:
    """A task's own progress (its `progress` events) while a command waits for it: a bar
    on stderr when stderr is a terminal, nothing otherwise."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._state = "waiting"
        self._message: str | None = None
        self._bar: Any = None
        self._task: Any = None

    @property
    def drawn(self) -> bool:
        return self._bar is not None

    def start(self) -> None:
        if not stderr_is_tty():
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
            MofNCompleteColumn(), TimeElapsedColumn(),
            console=_console(stderr=True), transient=True,
            redirect_stdout=False, redirect_stderr=False,
        )
        self._bar.start()
        _LIVE.append(self._bar)
        self._task = self._bar.add_task(self._describe(), total=None)

    def state(self, text: str) -> None:
        """waiting, running, ...: shown until the task reports a message of its own."""
        self._state = text
        if self._bar is not None:
            self._bar.update(self._task, description=self._describe())

    def update(self, done: float, total: float | None, message: str | None) -> None:
        if self._bar is None:
            return
        self._state = "running"
        if message:
            self._message = " ".join(str(message).split())
        self._bar.update(self._task, completed=done, total=total, description=self._describe())

    def _describe(self) -> str:
        from rich.markup import escape

        text = f"{self.label} {self._message or self._state}"
        return escape(text if len(text) <= 80 else text[:79] + "…")

    def stop(self) -> None:
        if self._bar is not None:
            _LIVE.remove(self._bar)
            self._bar.stop()
            self._bar = None


@contextlib.contextmanager
def task_bar(label: str, draw: bool = True) -> Iterator[TaskBar]:
    """A TaskBar, drawn when `draw` and stderr is a terminal."""
    bar = TaskBar(label)
    if draw:
        bar.start()
    try:
        yield bar
    finally:
        bar.stop()
