"""`omniq result`, `omniq events` and `omniq tail`: read what tasks did."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import TYPE_CHECKING, Any

import click

from omniq.cli import common, console
from omniq.cli.exit_codes import ExitCode

if TYPE_CHECKING:
    from datetime import datetime

    from omniq.client import AsyncOmniQ
    from omniq.config import OmniQConfig
    from omniq.models import EventFilter, TaskEvent, TaskResult
    from omniq.storage import EventStorage

# Seconds of waiting before `--wait` checks that a live worker serves the task's queue.
HINT_AFTER = 3.0
SHELL_OUTPUT = frozenset(("exit_code", "stdout", "stderr"))

RESULT_EPILOG = common.examples(
    "omniq result TASK_ID                    # the value as JSON, exit 0",
    "omniq result TASK_ID --wait --timeout 1m",
    "omniq result TASK_ID --json | jq .status",
) + (
    "\n\n\b\nExit codes: 0 completed; 1 the task failed, timed out, was cancelled or expired"
    "\n(error and remote traceback on stderr); 3 no result yet / the wait timed out;"
    "\n4 no such task. A shell task: its own stdout and stderr, and its exit status."
)
EVENTS_EPILOG = common.examples(
    "omniq events TASK_ID",
    "omniq events TASK_ID --json | jq -r .event_type",
) + (
    "\n\nProgress events (omniq.current_task().progress) read \"3/10 (30%) message\"; a"
    "\nshell task's output events \"stdout: text\" (omniq logs ID prints the output itself)."
)
TAIL_EPILOG = (
    common.examples(
        "omniq tail                              # from now on, every task",
        "omniq tail -n 20                        # the last 20 events first",
        "omniq tail --since 10m --type failed --type timeout",
        "omniq tail --queue mail --json",
        "omniq tail --task TASK_ID",
        "omniq tail --type progress               # how far running tasks got",
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


OUTPUT_WIDTH = 200  # characters of an output event shown on its one line


def describe_event(kind: str, details: dict[str, Any]) -> str:
    """The DETAILS column: progress as "3/10 (30%) message", output as "stdout: text",
    anything else as key=value pairs."""
    if kind == "progress" and isinstance(details.get("done"), int | float):
        return progress_text(details["done"], details.get("total"), details.get("message"))
    if kind == "output" and isinstance(details.get("text"), str):
        text = " ".join(details["text"].split())
        if len(text) > OUTPUT_WIDTH:
            text = text[: OUTPUT_WIDTH - 1] + "…"
        return f"{details.get('stream', 'stdout')}: {text}"
    return format_details(details)


def progress_text(done: float, total: Any = None, message: Any = None) -> str:
    """"3/10 (30%) resized a.png", or "3 resized a.png" when the total is unknown."""
    text = f"{done:g}"
    if isinstance(total, int | float) and not isinstance(total, bool):
        text += f"/{total:g}"
        if total > 0:
            text += f" ({100 * done / total:.0f}%)"
    if message:
        text += f" {' '.join(str(message).split())}"
    return text


def shell_output(result: TaskResult) -> dict[str, Any] | None:
    """What a shell task's command printed and its exit status, if `result` is one's."""
    value = result.value
    if not (isinstance(value, dict) and set(value) == SHELL_OUTPUT):
        return None
    if not isinstance(value["exit_code"], int):
        return None
    failed = (result.error_type or "").rpartition(".")[2] == "ShellFailed"
    return value if result.ok or failed else None


def show_result(result: TaskResult, as_json: bool, extra: dict[str, Any] | None = None) -> int:
    """Print a final result; its exit code: 0 completed, 1 any other outcome, and for a
    shell task the command's own exit status (its output on our stdout and stderr)."""
    if as_json:
        record = result_record(result)
        console.json_line({**extra, "result": record} if extra is not None else record)
    output = shell_output(result)
    if output is not None:
        return _show_shell(output, as_json)
    if not as_json and result.ok:
        indent = 2 if console.stdout_is_tty() else None
        console.line(json.dumps(result.value, ensure_ascii=False, indent=indent))
    if result.ok:
        return ExitCode.OK
    kind = result.error_type or "Error"
    console.error(
        f"task {result.task_id} {result.status.value}: {kind}: {result.error_message or ''}"
    )
    if result.traceback and not as_json:
        console.info("Remote traceback:\n" + result.traceback.rstrip())
    return ExitCode.TASK_FAILED


def _show_shell(output: dict[str, Any], as_json: bool) -> int:
    """pueue/ts semantics: the command's streams as they were, and its exit status."""
    if not as_json:
        sys.stdout.write(str(output["stdout"]))
        sys.stdout.flush()
        sys.stderr.write(str(output["stderr"]))
        sys.stderr.flush()
    code = int(output["exit_code"])
    return code if 0 <= code <= 255 else 128 + abs(code)  # killed by a signal: 128 + N


async def wait_result(
    client: AsyncOmniQ, task_id: str, timeout: float | None, queue: str | None = None
) -> TaskResult:
    """`client.wait_result`, with one hint on stderr after HINT_AFTER seconds when no
    live worker serves the task's queue (the wait goes on). On a terminal, a waiting
    (timeout not 0) draws a bar from the task's progress events on stderr."""
    import asyncio

    waiting = asyncio.ensure_future(client.wait_result(task_id, timeout))
    watch: asyncio.Future[None] | None = None
    with console.task_bar(f"task {task_id}", draw=timeout != 0) as bar:
        if bar.drawn:
            watch = asyncio.ensure_future(_draw_progress(client, task_id, bar))
        try:
            done, _ = await asyncio.wait({waiting}, timeout=HINT_AFTER)
            if not done:
                await _hint_if_unserved(client, task_id, queue)
            return await waiting
        finally:
            waiting.cancel()
            if watch is not None:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)


async def _draw_progress(client: AsyncOmniQ, task_id: str, bar: console.TaskBar) -> None:
    """Feed the bar with the task's progress so far, then live (only while drawn: following
    the event log costs a read per new batch of events)."""
    from omniq.errors import OmniQError
    from omniq.models import EventFilter, EventType

    kinds = frozenset({EventType.PROGRESS, EventType.STARTED, EventType.RETRIED})
    with contextlib.suppress(OmniQError):  # only a picture: never let it break the wait
        cursor = await client.event_cursor()
        for event in await client.get_events(task_id):
            _on_bar(bar, event)
        only = EventFilter(task_id=task_id, event_types=kinds)
        async for _, event in client.follow_events(cursor, only, idle_wait=0.5):
            _on_bar(bar, event)


def _on_bar(bar: console.TaskBar, event: TaskEvent) -> None:
    kind, details = event.event_type.value, event.details
    if kind == "started":
        bar.state("running" if event.attempt <= 1 else f"running, attempt {event.attempt}")
    elif kind == "retried":
        bar.state("waiting to retry")
    elif kind == "progress" and isinstance(details.get("done"), int | float):
        total = details.get("total")
        bar.update(details["done"], total if isinstance(total, int | float) else None,
                   details.get("message"))


async def _hint_if_unserved(client: AsyncOmniQ, task_id: str, queue: str | None) -> None:
    from omniq.errors import OmniQError

    with contextlib.suppress(OmniQError):  # only a hint: never let it break the wait
        if queue is None:
            queue = next((e.queue for e in await client.get_events(task_id) if e.queue), None)
        if queue is None:
            return
        if not any(queue in w.queues for w in await client.workers()):
            console.info(
                f"omniq: still waiting: no live worker serves queue {queue!r}; "
                f"start one with: omniq worker -q {queue}"
            )


# --- result -----------------------------------------------------------------------------------


@common.command("result", epilog=RESULT_EPILOG)
@common.task_id_argument()
@click.option("--wait", is_flag=True, help="Wait until the task has finished.")
@click.option(
    "--timeout",
    type=common.DURATION,
    metavar="DURATION",
    help="Wait at most this long (implies --wait).",
)
@common.json_option("Print the result record as JSON (status, value, error, times).")
def result(task_id: str, wait: bool, timeout: float | None, as_json: bool) -> int:
    """Print the task's return value as JSON, or its error on stderr.

    For a shell task (omniq enqueue --shell/--sh): the command's own stdout and
    stderr, and its exit status as ours.
    """
    limit = timeout if timeout is not None else (None if wait else 0.0)
    config = common.load_config()
    return common.run_async(_result(config, task_id, limit, as_json))


async def _result(config: OmniQConfig, task_id: str, timeout: float | None, as_json: bool) -> int:
    from omniq.errors import ResultTimeout

    async with common.open_client(config) as client:
        try:
            outcome = await wait_result(client, task_id, timeout)
        except ResultTimeout:
            if as_json:
                console.json_line({"task_id": task_id, "status": "pending"})
            waited = "" if not timeout else f" after waiting {timeout:g}s"
            hint = " (use --wait to wait for it)" if timeout == 0 else ""
            console.error(f"task {task_id} has no result yet{waited}{hint}")
            return ExitCode.PENDING
    return show_result(outcome, as_json)


# --- events -----------------------------------------------------------------------------------


@common.command("events", epilog=EVENTS_EPILOG)
@common.task_id_argument()
@common.json_option("Print one JSON object per event (JSON lines).")
def events(task_id: str, as_json: bool) -> None:
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
            describe_event(e.event_type.value, e.details),
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


def validate_types(values: Any) -> list[str] | None:
    """Event type names, case-insensitive; click.BadParameter names the known ones."""
    if not values:
        return None
    from omniq.models import EventType

    known = [t.value for t in EventType]
    wrong = [v for v in values if v.lower() not in known]
    if wrong:
        raise click.BadParameter(f"unknown event type {wrong[0]!r}; choose from {', '.join(known)}")
    return [v.lower() for v in values]


def _types_callback(ctx: click.Context, param: click.Parameter, values: Any) -> list[str] | None:
    return validate_types(values)


@common.command("tail", epilog=TAIL_EPILOG)
@click.option("--task", metavar="TASK_ID", type=common.TASK_ID, help="Only this task's events.")
@click.option(
    "--type",
    "types",
    metavar="TYPE",
    multiple=True,
    callback=_types_callback,
    help="Only events of this type (repeatable): enqueued, started, completed, "
    "failed, retried, cancelled, timeout, expired, progress, output.",
)
@common.queue_option("Only events of this queue.")
@click.option(
    "--since",
    type=common.DURATION,
    metavar="DURATION",
    help="First show the events of the last DURATION (e.g. 10m).",
)
@click.option(
    "-n", "--last", type=click.IntRange(min=0), metavar="N", help="First show the last N events."
)
@common.json_option("Print one JSON object per event (JSON lines).")
def tail(
    task: str | None,
    types: list[str] | None,
    queue: str | None,
    since: float | None,
    last: int | None,
    as_json: bool,
) -> int:
    """Follow the events of all tasks live, as they happen."""
    config = common.load_config()
    try:
        common.run_async(_tail(config, _filters(task, types, queue), since, last, as_json))
    except KeyboardInterrupt:
        return ExitCode.OK
    return ExitCode.OK


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
        describe_event(event.event_type.value, event.details),
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


COMMANDS = {"result": result, "events": events, "tail": tail}
