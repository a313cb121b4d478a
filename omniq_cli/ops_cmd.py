"""Operator commands: `omniq status`, `cancel`, `retry` and `purge`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from omniq.cli import common, console
from omniq.cli.exit_codes import ExitCode

if TYPE_CHECKING:
    from omniq.config import OmniQConfig
    from omniq.models import QueueStats, WorkerInfo

STATUS_EPILOG = common.examples("omniq status", "omniq status --json | jq '.queues'")
CANCEL_EPILOG = common.examples("omniq cancel TASK_ID") + (
    "\n\n\b\nExit codes: 0 cancelled; 5 refused: it has started or finished; 4 no such task."
)
RETRY_EPILOG = common.examples("id=$(omniq retry TASK_ID)") + (
    "\n\n\b\nPrints the id of the queued task. Retrying a task that is queued already does"
    "\nnothing and prints the same id (exit 0): running it twice queues one copy."
    "\nExit codes: 0 queued; 5 refused: the task has not failed; 4 no such task."
)
PURGE_EPILOG = (
    common.examples(
        "omniq purge --results-older-than 7d --events-older-than 7d",
        "omniq purge --expired --yes                # in cron: no question asked",
        "omniq purge --queue mail                   # drop mail's waiting and failed tasks",
        "omniq purge --all-queues --yes",
    )
    + "\n\nWithout --yes it asks first, and refuses (exit 2) when there is no terminal;"
    "\na declined question exits 5."
)


# --- status -----------------------------------------------------------------------------------


@common.command("status", epilog=STATUS_EPILOG)
@common.json_option("Print one JSON object: queues and workers.")
def status(as_json: bool) -> None:
    """Show task counts per queue and the live workers."""
    config = common.load_config()
    stats, workers = common.run_async(_status(config))
    if as_json:
        console.json_line(
            {
                "queues": [_stats_record(s) for s in stats],
                "workers": [_worker_record(w) for w in workers],
            }
        )
    elif console.stdout_is_tty():
        _status_tables(stats, workers)
    else:
        _status_lines(stats, workers)


async def _status(config: OmniQConfig) -> tuple[list[QueueStats], list[WorkerInfo]]:
    async with common.open_client(config) as client:
        return await client.stats(), await client.workers()


def _stats_record(s: QueueStats) -> dict[str, Any]:
    return {
        "queue": s.queue,
        "queued": s.queued,
        "scheduled": s.scheduled,
        "running": s.running,
        "failed": s.failed,
    }


def _worker_record(w: WorkerInfo) -> dict[str, Any]:
    return {
        "worker_id": w.worker_id,
        "host": w.host,
        "pid": w.pid,
        "queues": list(w.queues),
        "current_tasks": list(w.current_tasks),
        "concurrency": w.concurrency,
        "tasks_done": w.tasks_done,
        "events_buffered": w.events_buffered,
        "events_dropped": w.events_dropped,
        "started_at": console.iso(w.started_at),
        "heartbeat_at": console.iso(w.heartbeat_at),
    }


def _event_trouble(w: WorkerInfo) -> str:
    """What an event-store outage costs this worker, when it costs anything."""
    parts = []
    if w.events_buffered:
        parts.append(f"{w.events_buffered} events held")
    if w.events_dropped:
        parts.append(f"{w.events_dropped} events dropped")
    return ", ".join(parts)


def _status_lines(stats: list[QueueStats], workers: list[WorkerInfo]) -> None:
    """`key=value` lines, one per queue and per worker: easy to grep and cut."""
    for s in stats:
        counts = " ".join(f"{k}={v}" for k, v in _stats_record(s).items() if k != "queue")
        console.line(f"queue {s.queue} {counts}")
    for w in workers:
        current = ",".join(w.current_tasks) or "-"
        console.line(
            f"worker {w.worker_id} host={w.host} pid={w.pid} queues={','.join(w.queues)} "
            f"current={current} heartbeat={console.iso(w.heartbeat_at)} "
            f"events_held={w.events_buffered} events_dropped={w.events_dropped}"
        )


def _status_tables(stats: list[QueueStats], workers: list[WorkerInfo]) -> None:
    if stats:
        rows = [[str(v) for v in _stats_record(s).values()] for s in stats]
        console.table(["QUEUE", "QUEUED", "SCHEDULED", "RUNNING", "FAILED"], rows, title="Queues")
    else:
        console.line("no tasks in any queue")
    if not workers:
        console.line("no live workers")
        return
    rows = [
        [
            w.host,
            str(w.pid),
            ", ".join(w.queues),
            "\n".join(w.current_tasks) or "-",
            f"{console.iso(w.heartbeat_at)} ({console.ago(w.heartbeat_at)})",
            _event_trouble(w) or "-",
        ]
        for w in workers
    ]
    console.table(
        ["HOST", "PID", "QUEUES", "CURRENT TASK", "LAST HEARTBEAT", "EVENTS"], rows,
        title="Workers",
    )


# --- cancel and retry -------------------------------------------------------------------------


@common.command("cancel", epilog=CANCEL_EPILOG)
@common.task_id_argument()
@common.json_option('Print {"task_id": ..., "cancelled": true|false}.')
def cancel(task_id: str, as_json: bool) -> None:
    """Cancel a task that no worker has started yet."""
    config = common.load_config()
    done = common.run_async(_cancel(config, task_id))
    if as_json:
        console.json_line({"task_id": task_id, "cancelled": done})
    elif done:
        console.line(f"cancelled {task_id}")
    if not done:
        raise common.Refused(f"task {task_id} was not cancelled: it is running or already finished")


async def _cancel(config: OmniQConfig, task_id: str) -> bool:
    from omniq.errors import TaskNotFound

    async with common.open_client(config) as client:
        if await client.cancel(task_id):
            return True
        if not await client.task_exists(task_id):
            raise TaskNotFound(f"no task with id {task_id}")
        return False


@common.command("retry", epilog=RETRY_EPILOG)
@common.task_id_argument()
@common.json_option('Print {"task_id": ..., "new_id": ...}.')
def retry(task_id: str, as_json: bool) -> None:
    """Queue a failed task again; prints the queued task's id."""
    config = common.load_config()
    new_id = common.run_async(_retry(config, task_id))
    if as_json:
        console.json_line({"task_id": task_id, "new_id": new_id})
    else:
        console.line(new_id)


async def _retry(config: OmniQConfig, task_id: str) -> str:
    from omniq.errors import TaskStateError

    async with common.open_client(config) as client:
        try:
            return await client.retry(task_id)
        except TaskStateError as exc:  # it did not fail: refused (exit 5)
            raise common.Refused(str(exc)) from None


# --- purge ------------------------------------------------------------------------------------


def _duration_option(flag: str, help: str) -> Any:
    return click.option(flag, type=common.DURATION, metavar="DURATION", help=help)


@common.command("purge", epilog=PURGE_EPILOG)
@_duration_option("--results-older-than", "Delete results finished more than DURATION ago.")
@_duration_option("--events-older-than", "Delete events older than DURATION.")
@click.option("--expired", is_flag=True, help="Delete results past their TTL.")
@common.queue_option("Drop the waiting and failed tasks of this queue.")
@click.option(
    "--all-queues", is_flag=True, help="Drop the waiting and failed tasks of every queue."
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@common.json_option("Print the counts as one JSON object.")
def purge(
    results_older_than: float | None,
    events_older_than: float | None,
    expired: bool,
    queue: str | None,
    all_queues: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Delete old results and events, or the waiting tasks of queues."""
    plan = purge_plan(results_older_than, events_older_than, expired, queue, all_queues)
    config = common.load_config()  # a bad config is reported before any question
    if not yes:
        _confirm(plan)
    counts = common.run_async(
        _purge(config, results_older_than, events_older_than, expired, queue, all_queues)
    )
    if as_json:
        console.json_line(counts)
    else:
        console.line("purged " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))


def purge_plan(
    results_older_than: float | None,
    events_older_than: float | None,
    expired: bool,
    queue: str | None,
    all_queues: bool,
) -> list[str]:
    """What would be deleted, in words; ValueError when the request is empty or contradictory."""
    if queue is not None and all_queues:
        raise ValueError("give --queue NAME or --all-queues, not both")
    plan = []
    if results_older_than is not None:
        plan.append(f"results finished more than {_human(results_older_than)} ago")
    if expired:
        plan.append("results past their TTL")
    if events_older_than is not None:
        plan.append(f"events older than {_human(events_older_than)}")
    if queue is not None:
        plan.append(f"every waiting and failed task of queue {queue!r}")
    if all_queues:
        plan.append("every waiting and failed task of every queue")
    if not plan:
        raise ValueError(
            "nothing to purge: give --results-older-than, --events-older-than, --expired, "
            "--queue or --all-queues"
        )
    return plan


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _confirm(plan: list[str]) -> None:
    if not console.stdin_is_tty():
        raise ValueError("refusing to purge without confirmation (no terminal): add --yes")
    question = "Delete " + "; ".join(plan) + "?"
    if not console.confirm(question):
        console.info("nothing purged")
        raise SystemExit(ExitCode.REFUSED)


async def _purge(
    config: OmniQConfig,
    results_older_than: float | None,
    events_older_than: float | None,
    expired: bool,
    queue: str | None,
    all_queues: bool,
) -> dict[str, int]:
    async with common.open_client(config) as client:
        return await client.purge(
            results_older_than=results_older_than,
            events_older_than=events_older_than,
            expired=expired,
            queue=queue,
            all_queues=all_queues,
        )


COMMANDS = {"status": status, "cancel": cancel, "retry": retry, "purge": purge}
