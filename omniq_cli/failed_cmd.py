"""`omniq failed`: the dead letters; and the bulk forms `retry --all-failed` and
`purge --failed` (their options live with `retry` and `purge` in ops_cmd)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from omniq.cli import common, console
from omniq.cli.exit_codes import ExitCode

if TYPE_CHECKING:
    from omniq.config import OmniQConfig
    from omniq.operate import FailedInfo

ERROR_WIDTH = 200  # characters of an error shown in the list (--json has all of it)

EPILOG = common.examples(
    "omniq failed                              # the newest 50 failed tasks",
    "omniq failed -q mail --since 1h           # of queue mail, failed in the last hour",
    "omniq failed --func 'myapp.billing:*'     # a glob over the import path",
    "omniq failed --func 'send_*' -n 500 --json | jq -r .task_id",
    "omniq retry --all-failed -q mail --dry-run",
    "omniq purge --failed --since 7d --yes",
) + (
    "\n\nNewest failure first. --func matches the import path (myapp.tasks:send_mail)"
    "\nor the function's name (send_mail), with * and ? as wildcards. Plain output: one"
    "\ntab-separated line per task (failed at, id, queue, function, attempts, error)."
)


@dataclass(frozen=True)
class Filters:
    """Which dead letters: by queue, failed since, function glob."""

    queue: str | None = None
    since: float | None = None  # seconds back from now
    func: str | None = None

    def since_time(self) -> datetime | None:
        if self.since is None:
            return None
        from datetime import timedelta

        from omniq.models import utcnow

        return utcnow() - timedelta(seconds=self.since)

    def words(self) -> str:
        """' of queue mail, failed in the last 1h, function send_*': for questions."""
        parts = []
        if self.queue is not None:
            parts.append(f"of queue {self.queue!r}")
        if self.since is not None:
            parts.append(f"failed in the last {_human(self.since)}")
        if self.func is not None:
            parts.append(f"matching function {self.func!r}")
        return (" " + ", ".join(parts)) if parts else ""


def _human(seconds: float) -> str:
    from omniq.observe import duration_text

    return duration_text(seconds)


def filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--since and --func (-q/--queue is declared by each command: purge already had it)."""
    func = click.option(
        "--func", metavar="PATTERN",
        help="Only tasks whose function matches this glob (import path or name).",
    )(func)
    return click.option(
        "--since", type=common.DURATION, metavar="DURATION",
        help="Only tasks that failed within this long ago: 30m, 1h, 7d.",
    )(func)


# --- omniq failed -----------------------------------------------------------------------------


@common.command("failed", epilog=EPILOG)
@common.queue_option("Only this queue's failed tasks.")
@filter_options
@click.option(
    "-n", "--limit", type=click.IntRange(min=1), default=50, show_default=True, metavar="N",
    help="Show at most N tasks.",
)
@common.json_option("One JSON object per task (JSON lines), error type and message apart.")
def failed(queue: str | None, since: float | None, func: str | None, limit: int,
           as_json: bool) -> None:
    """List failed tasks (dead letters), newest first: function, attempts, error, when."""
    from omniq.observe import failed_record

    filters = Filters(queue, since, func)
    found = common.run_async(_failed(common.load_config(), filters, limit))
    records = [failed_record(info) for info in found]
    if as_json:
        for item in records:
            console.json_line(item)
        return
    tty = console.stdout_is_tty()
    rows = [_row(item, info, tty) for item, info in zip(records, found, strict=True)]
    if tty and not rows:
        console.line("no failed tasks" + filters.words())
        return
    console.table(["FAILED AT", "TASK", "QUEUE", "FUNCTION", "ATTEMPTS", "ERROR"], rows,
                  title="Failed tasks, newest first")
    if tty and len(rows) == limit:
        console.info(f"showing the newest {limit}; -n N shows more")


def _row(item: dict[str, Any], info: FailedInfo, tty: bool) -> list[str]:
    when = console.iso(info.failed_at)
    if tty:
        when += f" ({console.ago(info.failed_at)})"
    error = " ".join(str(item["error"]).split())
    if len(error) > ERROR_WIDTH:
        error = error[: ERROR_WIDTH - 1] + "…"
    attempts = "-" if item["attempts"] is None else str(item["attempts"])
    return [when, item["task_id"], item["queue"], item["func"], attempts, error]


async def _failed(config: OmniQConfig, filters: Filters, limit: int) -> list[FailedInfo]:
    async with common.open_client(config) as client:
        return await client.failed(filters.queue, filters.since_time(), filters.func, limit)


# --- retry --all-failed -----------------------------------------------------------------------


def retry_all(filters: Filters, dry_run: bool, as_json: bool) -> None:
    """Queue every matching dead letter again; say how many (a bar on a terminal when many)."""
    config = common.load_config()
    with console.counter("queueing failed tasks again") as meter:
        ids = common.run_async(_retry_all(config, filters, dry_run, meter.update))
    if as_json:
        console.json_line({"count": len(ids), "task_ids": ids, "dry_run": dry_run})
    elif dry_run:
        console.line(f"would queue {_tasks(len(ids))}{filters.words()} again (dry run)")
    else:
        console.line(f"queued {_tasks(len(ids))}{filters.words()} again")


async def _retry_all(config: OmniQConfig, filters: Filters, dry_run: bool,
                     progress: Callable[[int, int], None]) -> list[str]:
    async with common.open_client(config) as client:
        return await client.retry_failed(filters.queue, filters.since_time(), filters.func,
                                         dry_run=dry_run, progress=progress)


def _tasks(count: int) -> str:
    return f"{count} failed task" + ("" if count == 1 else "s")


# --- purge --failed ---------------------------------------------------------------------------


def purge_failed(filters: Filters, dry_run: bool, yes: bool, as_json: bool) -> int:
    """Delete the matching dead letters; asks first unless --yes (or --dry-run)."""
    config = common.load_config()
    if not (yes or dry_run):
        if not console.stdin_is_tty():
            raise ValueError("refusing to purge without confirmation (no terminal): add --yes")
        count = len(common.run_async(_purge(config, filters, dry_run=True)))
        if count == 0:
            console.line(f"no failed tasks{filters.words()}: nothing purged")
            return ExitCode.OK
        if not console.confirm(f"Delete {_tasks(count)}{filters.words()}?"):
            console.info("nothing purged")
            return ExitCode.REFUSED
    ids = common.run_async(_purge(config, filters, dry_run=dry_run))
    if as_json:
        console.json_line({"count": len(ids), "task_ids": ids, "dry_run": dry_run})
    elif dry_run:
        console.line(f"would delete {_tasks(len(ids))}{filters.words()} (dry run)")
    else:
        console.line(f"purged {_tasks(len(ids))}{filters.words()}")
    return ExitCode.OK


async def _purge(config: OmniQConfig, filters: Filters, *, dry_run: bool) -> list[str]:
    async with common.open_client(config) as client:
        return await client.purge_failed(filters.queue, filters.since_time(), filters.func,
                                         dry_run=dry_run)


COMMANDS = {"failed": failed}
