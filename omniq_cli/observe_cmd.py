"""`omniq metrics` (the cluster's numbers, with alert thresholds) and `omniq top` (a live
terminal view). Both read `omniq.observe`; rich is imported only for a terminal."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click

from omniq.cli import common, console
from omniq.cli.exit_codes import ExitCode

if TYPE_CHECKING:
    import asyncio

    from omniq.config import OmniQConfig
    from omniq.observe import Overview

# A threshold given to `omniq metrics` was crossed. Not 1: an unexpected error exits 1,
# and a check must tell "alert" from "the check itself broke".
ALERT = ExitCode.ALERT

METRICS_EPILOG = common.examples(
    "omniq metrics                              # one line per queue, one for the workers",
    "omniq metrics --json | jq '.queues[] | {queue, queued, oldest_wait}'",
    "omniq metrics --max-age 5m --max-failed 10 || mail-oncall   # from cron",
    "omniq metrics -q mail --max-depth 1000 --min-workers 1",
) + (
    "\n\n\b\nRates are tasks per second over the last minute of the event log."
    "\nExit codes: 0 all thresholds kept; 6 a threshold was crossed (one line per alert"
    "\non stderr, and \"alerts\" in --json); 69 a store is unreachable."
)
TOP_EPILOG = common.examples(
    "omniq top", "omniq top -q mail", "omniq top | cat      # one snapshot"
) + (
    "\n\nOn a terminal it refreshes once a second; q or Ctrl-C quits. Piped, it prints"
    "\none snapshot as plain lines and exits."
)


# --- omniq metrics ------------------------------------------------------------------------------


@common.command("metrics", epilog=METRICS_EPILOG)
@common.queue_option("Only this queue (repeat for several).", multiple=True)
@click.option(
    "--max-age", type=common.DURATION, metavar="DURATION",
    help="Alert when a queue's oldest ready task has waited longer (e.g. 5m).",
)
@click.option(
    "--max-failed", type=click.IntRange(min=0), metavar="N",
    help="Alert when more than N failed tasks are kept (dead letters).",
)
@click.option(
    "--max-depth", type=click.IntRange(min=0), metavar="N",
    help="Alert when more than N tasks are ready to run.",
)
@click.option(
    "--min-workers", type=click.IntRange(min=0), metavar="N",
    help="Alert when fewer than N workers are alive.",
)
@common.json_option("Print one JSON object (with the alerts).")
def metrics(
    queue: tuple[str, ...],
    max_age: float | None,
    max_failed: int | None,
    max_depth: int | None,
    min_workers: int | None,
    as_json: bool,
) -> int:
    """Print queue depths, oldest waits, failed counts and live workers; exit 6 on alert."""
    from omniq.observe import Thresholds

    config = common.load_config()
    limits = Thresholds(max_age, max_failed, max_depth, min_workers)
    overview = common.run_async(_overview(config, queue, failures=0))
    alerts = limits.crossed(overview)
    if as_json:
        from omniq.observe import overview_record

        data = overview_record(overview)
        data.pop("failures")
        console.json_line({**data, "alerts": alerts})
    elif console.stdout_is_tty():
        _tables(overview)
    else:
        _metric_lines(overview)
    for alert in alerts:
        console.info(f"omniq: alert: {alert}")
    return ALERT if alerts else ExitCode.OK


async def _overview(config: OmniQConfig, queues: tuple[str, ...], failures: int) -> Overview:
    from omniq.observe import Observer

    async with common.open_client(config) as client:
        return _only(await Observer(client).overview(failures), queues)


def _only(overview: Overview, queues: tuple[str, ...]) -> Overview:
    if not queues:
        return overview
    from dataclasses import replace

    return replace(overview, queues=[q for q in overview.queues if q.queue in queues])


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _metric_lines(overview: Overview) -> None:
    """`key=value` lines: one per queue, one for the workers (grep and cut friendly)."""
    for q in overview.queues:
        console.line(
            f"queue {q.queue} queued={q.queued} scheduled={q.scheduled} running={q.running} "
            f"failed={q.failed} oldest_wait_seconds={_num(q.oldest_wait, 1)} "
            f"rate_in={_num(q.rate_in)} rate_out={_num(q.rate_out)}"
        )
    workers = overview.workers
    console.line(
        f"workers live={len(workers)} running={sum(w.running for w in workers)} "
        f"slots={sum(w.concurrency for w in workers)}"
    )


def _tables(overview: Overview) -> None:
    console.table(
        ["QUEUE", "READY", "SCHEDULED", "RUNNING", "FAILED", "OLDEST WAIT", "IN/s", "OUT/s"],
        _queue_rows(overview), title="Queues",
    )
    workers = overview.workers
    console.line(
        f"{len(workers)} live workers, {sum(w.running for w in workers)} tasks running in "
        f"{sum(w.concurrency for w in workers)} slots"
    )


def _queue_rows(overview: Overview) -> list[list[str]]:
    from omniq.observe import human_seconds

    return [
        [q.queue, str(q.queued), str(q.scheduled), str(q.running), str(q.failed),
         "-" if q.oldest_wait is None else human_seconds(q.oldest_wait),
         _num(q.rate_in), _num(q.rate_out)]
        for q in overview.queues
    ]


def _worker_rows(overview: Overview) -> list[list[str]]:
    from omniq.observe import human_seconds

    return [
        [w.host, str(w.pid), ",".join(w.queues), f"{w.running}/{w.concurrency}",
         str(w.tasks_done), human_seconds(w.heartbeat_age) + " ago"]
        for w in overview.workers
    ]


def _failure_rows(overview: Overview) -> list[list[str]]:
    return [
        [console.iso(f.at)[11:19], f.queue or "-", f.func or "?", f.task_id, f.outcome, f.error]
        for f in overview.failures
    ]


# --- omniq top ----------------------------------------------------------------------------------

QUEUE_COLUMNS = ("QUEUE", "READY", "SCHEDULED", "RUNNING", "FAILED", "OLDEST WAIT", "IN/s",
                 "OUT/s")
WORKER_COLUMNS = ("HOST", "PID", "QUEUES", "RUNNING", "DONE", "HEARTBEAT")
FAILURE_COLUMNS = ("TIME", "QUEUE", "FUNCTION", "TASK", "OUTCOME", "ERROR")
REFRESH = 1.0  # seconds between screens


@common.command("top", epilog=TOP_EPILOG)
@common.queue_option("Only this queue (repeat for several).", multiple=True)
@click.option(
    "--failures", type=click.IntRange(min=0), default=8, show_default=True, metavar="N",
    help="How many of the last failures to show.",
)
def top(queue: tuple[str, ...], failures: int) -> int:
    """A live view of queues, workers and the last failures (q or Ctrl-C quits)."""
    config = common.load_config()
    if not console.stdout_is_tty():
        overview = common.run_async(_overview(config, queue, failures))
        _plain_snapshot(overview)
        return ExitCode.OK
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C quits, as q does
        common.run_async(_live(config, queue, failures))
    return ExitCode.OK


def _plain_snapshot(overview: Overview) -> None:
    sections = (
        ("queues", QUEUE_COLUMNS, _queue_rows(overview)),
        ("workers", WORKER_COLUMNS, _worker_rows(overview)),
        ("last failures", FAILURE_COLUMNS, _failure_rows(overview)),
    )
    for title, columns, rows in sections:
        console.line(f"# {title}: " + "\t".join(columns))
        for row in rows:
            console.line("\t".join(row))


async def _live(config: OmniQConfig, queues: tuple[str, ...], failures: int) -> None:
    import asyncio

    from rich.live import Live

    from omniq.observe import Observer

    quit_now = asyncio.Event()
    async with common.open_client(config) as client:
        observer = Observer(client)
        with _keys(quit_now), Live(auto_refresh=False, screen=True) as live:
            while not quit_now.is_set():
                overview = _only(await observer.overview(failures), queues)
                live.update(_screen(overview), refresh=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(quit_now.wait(), REFRESH)


@contextlib.contextmanager
def _keys(quit_now: asyncio.Event) -> Iterator[None]:
    """Read single keys from the terminal (no Enter needed); `q` sets `quit_now`."""
    if not console.stdin_is_tty():
        yield
        return
    import asyncio
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()

    def read_key() -> None:
        key = os.read(fd, 32)
        if b"q" in key.lower():
            quit_now.set()

    tty.setcbreak(fd)  # Ctrl-C still interrupts
    loop.add_reader(fd, read_key)
    try:
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _screen(overview: Overview) -> Any:
    """The whole screen as one rich renderable."""
    from rich.console import Group
    from rich.text import Text

    now = console.iso(overview.taken_at)[11:19]
    header = Text.assemble(
        ("OmniQ top", "bold"),
        f"  {len(overview.queues)} queues, {len(overview.workers)} workers, "
        f"{overview.depth} ready, {overview.failed} failed  ·  {now} UTC  ·  rates over "
        f"{overview.window:.0f}s  ·  ",
        ("q", "bold"), " quits",
    )
    return Group(
        header,
        _table("Queues", QUEUE_COLUMNS, _queue_rows(overview), "no tasks in any queue"),
        _table("Workers", WORKER_COLUMNS, _worker_rows(overview), "no live workers"),
        _table("Last failures", FAILURE_COLUMNS, _failure_rows(overview), "none"),
    )


def _table(title: str, columns: tuple[str, ...], rows: list[list[str]], empty: str) -> Any:
    from rich import box
    from rich.table import Table

    grid = Table(title=title, title_justify="left", title_style="bold", header_style="bold",
                 box=box.SIMPLE_HEAD, expand=True, caption=None if rows else empty,
                 caption_justify="left")
    last = len(columns) - 1
    for index, name in enumerate(columns):  # the last column (an error) folds, others cut
        grid.add_column(name, no_wrap=index < last, overflow="fold" if index == last else
                        "ellipsis", ratio=3 if index == last else None)
    for row in rows:
        grid.add_row(*row, style="red" if title == "Last failures" else None)
    return grid


COMMANDS = {"metrics": metrics, "top": top}
