"""`omniq result`, `omniq events` and `omniq tail`: read what tasks did."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from omniq.cli import common, console
from omniq.cli.exit_codes import ExitCode

if TYPE_CHECKING:
    from datetime import datetime

    from omniq.client import AsyncOmniQ
    from omniq.config import OmniQConfig
    from omniq.models import EventFilter, TaskEvent, TaskResult
    from omniq.storage import EventStorage

TaskIdArg = Annotated[
    str,
    typer.Argument(metavar="TASK_ID", callback=common.validate_task_id, show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (JSON lines for events).")]

RESULT_EPILOG = common.examples(
    "omniq result TASK_ID                    # the value as JSON, exit 0",
    "omniq result TASK_ID --wait --timeout 1m",
    "omniq result TASK_ID --json | jq .status",
) + (
    "\n\nExit codes: 0 completed, 1 failed (error and remote traceback on stderr),"
    "\n3 no result yet / timed out waiting, 4 no such task."
)
EVENTS_EPILOG = common.examples(
    "omniq events TASK_ID",
    "omniq events TASK_ID --json | jq -r .event_type",
)
TAIL_EPILOG = (
    common.examples(
        "omniq tail                              # from now on, every task",
        "omniq tail -n 20                        # the last 20 events first",
        "omniq tail --since 10m --type failed --type timeout",
        "omniq tail --queue mail --json",
        "omniq tail --task TASK_ID",
    )
    + "\n\nCtrl-C stops it (exit 0)."
)


# --- records for --json and plain output ----------------------------------------------------


def result_record(result: TaskResult) -> dict[str, Any]:
    from omniq.serialization import result_to_dict

    record = result_to_dict(result)  # the stored shape, with readable times
    record.pop("v", None)  # the storage format version is not the user's business
    for key in ("enqueued_at", "started_at", "finished_at", "expires_at"):
        record[key] = _iso_or_none(getattr(result, key))
    return record


def event_record(event: TaskEvent, cursor: str | None = None) -> dict[str, Any]:
    from omniq.serialization import event_to_dict

    record = event_to_dict(event)
    record.pop("v", None)
    record["timestamp"] = console.iso(event.timestamp)
    if cursor is not None:
        record["cursor"] = cursor
    return record


def _iso_or_none(moment: Any) -> str | None:
    return None if moment is None else console.iso(moment)


def format_details(details: dict[str, Any]) -> str:
    """`key=value` pairs on one line; non-string values as compact JSON."""
    parts = []
    for key, value in details.items():
        shown = value if isinstance(value, str) else console.to_json(value)
        parts.append(f"{key}={' '.join(shown.split())}")  # one line, whatever the message
    return " ".join(parts)


def show_result(result: TaskResult, as_json: bool) -> ExitCode:
    """Print a final result; its exit code: 0 completed, 1 any other outcome."""
    code = ExitCode.OK if result.ok else ExitCode.TASK_FAILED
    if as_json:
        console.json_line(result_record(result))
    elif result.ok:
        indent = 2 if console.stdout_is_tty() else None
        console.line(json.dumps(result.value, ensure_ascii=False, indent=indent))
    if not result.ok:
        kind = result.error_type or "Error"
        console.error(
            f"task {result.task_id} {result.status.value}: {kind}: {result.error_message or ''}"
        )
        if result.traceback and not as_json:
            console.info("Remote traceback:\n" + result.traceback.rstrip())
    return code


# --- result -----------------------------------------------------------------------------------


def result(
    task_id: TaskIdArg,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the task has finished.")] = False,
    timeout: Annotated[
        float | None,
        typer.Option(
            parser=common.duration,
            metavar="DURATION",
            help="Wait at most this long (implies --wait).",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the task's return value as JSON, or its error on stderr."""
    limit = timeout if timeout is not None else (None if wait else 0.0)
    config = common.load_config()
    raise typer.Exit(common.run_async(_result(config, task_id, limit, as_json)))


async def _result(
    config: OmniQConfig, task_id: str, timeout: float | None, as_json: bool
) -> ExitCode:
    from omniq.errors import ResultTimeout

    async with common.open_client(config) as client:
        try:
            outcome = await client.wait_result(task_id, timeout)
        except ResultTimeout:
            if as_json:
                console.json_line({"task_id": task_id, "status": "pending"})
            waited = "" if not timeout else f" after waiting {timeout:g}s"
            hint = " (use --wait to wait for it)" if timeout == 0 else ""
            console.error(f"task {task_id} has no result yet{waited}{hint}")
            return ExitCode.PENDING
    return show_result(outcome, as_json)


# --- events -----------------------------------------------------------------------------------


def events(task_id: TaskIdArg, as_json: JsonOpt = False) -> None:
    """List the lifecycle events of one task, oldest first."""
    config = common.load_config()
    found = common.run_async(_events(config, task_id))
    if as_json:
        for event in found:
            console.json_line(event_record(event))
        return
    rows = [
        [
            console.iso(e.timestamp),
            e.event_type.value,
            str(e.attempt),
            e.worker_id or "-",
            format_details(e.details),
        ]
        for e in found
    ]
    console.table(["TIME", "TYPE", "ATTEMPT", "WORKER", "DETAILS"], rows, title=f"task {task_id}")


async def _events(config: OmniQConfig, task_id: str) -> list[TaskEvent]:
    from omniq.errors import TaskNotFound

    async with common.open_client(config) as client:
        found = await client.get_events(task_id)
        if not found and not await client.task_exists(task_id):
            raise TaskNotFound(f"no task with id {task_id}")
        return found


# --- tail -------------------------------------------------------------------------------------

BACKLOG_BATCH = 500


def validate_types(values: list[str] | None) -> list[str] | None:
    """typer callback: event type names, case-insensitive."""
    if not values:
        return None
    from omniq.models import EventType

    known = [t.value for t in EventType]
    wrong = [v for v in values if v.lower() not in known]
    if wrong:
        raise typer.BadParameter(f"unknown event type {wrong[0]!r}; choose from {', '.join(known)}")
    return [v.lower() for v in values]


def tail(
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            metavar="TASK_ID",
            callback=common.validate_task_id,
            help="Only this task's events.",
            show_default=False,
        ),
    ] = None,
    types: Annotated[
        list[str] | None,
        typer.Option(
            "--type",
            metavar="TYPE",
            callback=validate_types,
            help="Only events of this type (repeatable): enqueued, started, completed, "
            "failed, retried, cancelled, timeout, expired.",
            show_default=False,
        ),
    ] = None,
    queue: Annotated[str | None, common.queue_option("Only events of this queue.")] = None,
    since: Annotated[
        float | None,
        typer.Option(
            parser=common.duration,
            metavar="DURATION",
            help="First show the events of the last DURATION (e.g. 10m).",
            show_default=False,
        ),
    ] = None,
    last: Annotated[
        int | None,
        typer.Option(
            "-n", "--last", min=0, help="First show the last N events.", show_default=False
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Follow the events of all tasks live, as they happen."""
    config = common.load_config()
    try:
        common.run_async(_tail(config, _filters(task, types, queue), since, last, as_json))
    except KeyboardInterrupt:
        raise typer.Exit(ExitCode.OK) from None


def _filters(task: str | None, types: list[str] | None, queue: str | None) -> EventFilter:
    from omniq.models import EventFilter, EventType

    kinds = frozenset(EventType(t) for t in types) if types else None
    return EventFilter(task_id=task, event_types=kinds, queue=queue)


def _print_event(cursor: str, event: TaskEvent, as_json: bool) -> None:
    if as_json:
        console.json_line(event_record(event, cursor), flush=True)
        return
    fields = [
        console.iso(event.timestamp),
        event.task_id,
        event.event_type.value,
        str(event.attempt),
        event.queue or "-",
        event.worker_id or "-",
        format_details(event.details),
    ]
    console.stream_line(fields, kind_at=2)


async def _tail(
    config: OmniQConfig,
    filters: EventFilter,
    since: float | None,
    last: int | None,
    as_json: bool,
) -> None:
    async with common.open_client(config) as client:
        start: str | None = "now"
        if since is not None or last is not None:
            start = await _backlog(client, filters, since, last, as_json)
        async for cursor, event in client.follow_events(start, filters):
            _print_event(cursor, event, as_json)


async def _backlog(
    client: AsyncOmniQ,
    filters: EventFilter,
    since: float | None,
    last: int | None,
    as_json: bool,
) -> str | None:
    """Print the wanted past events; return the cursor to follow from.

    The log is read backwards from its newest event, so the cost is the backlog
    shown, not the size of the log.
    """
    from datetime import timedelta

    from omniq.models import EventFilter, utcnow

    if last == 0:
        return await client.events.last_cursor()
    cutoff = utcnow() - timedelta(seconds=since) if since is not None else None
    size = BACKLOG_BATCH
    if last is not None and since is None and filters == EventFilter():
        size = min(last, BACKLOG_BATCH)  # unfiltered `-n N`: exactly the newest N
    kept, newest = await _recent(client.events, filters, cutoff, last, size)
    for item in reversed(kept):
        _print_event(*item, as_json)
    return newest


async def _recent(
    events: EventStorage,
    filters: EventFilter,
    cutoff: datetime | None,
    last: int | None,
    size: int,
) -> tuple[list[tuple[str, TaskEvent]], str | None]:
    """Matching events newer than `cutoff` (at most `last`, >= 1), newest first,
    and the newest cursor of the log (None when it is empty)."""
    kept: list[tuple[str, TaskEvent]] = []
    newest: str | None = None
    before: str | None = None
    while True:
        rows = await events.latest(size, before)
        newest = newest or (rows[-1][0] if rows else None)
        for cursor, event in reversed(rows):
            if cutoff is not None and event.timestamp < cutoff:
                return kept, newest
            if filters.matches(event):
                kept.append((cursor, event))
                if len(kept) == last:
                    return kept, newest
        if len(rows) < size:  # reached the oldest event
            return kept, newest
        before = rows[0][0]


COMMANDS = {
    "result": (result, RESULT_EPILOG),
    "events": (events, EVENTS_EPILOG),
    "tail": (tail, TAIL_EPILOG),
}


def register(app: typer.Typer, name: str | None = None) -> None:
    """Add command `name` of this module to `app` (all of them when None)."""
    for command, (func, epilog) in COMMANDS.items():
        if name in (None, command):
            common.command(app, command, epilog=epilog)(func)
