"""Operator commands: `omniq status`, `cancel`, `retry` and `purge`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from omniq.cli import common, console, failed_cmd
from omniq.cli.exit_codes import ExitCode

if TYPE_CHECKING:
    from omniq.config import OmniQConfig
    from omniq.models import QueueStats, WorkerInfo

STATUS_EPILOG = common.examples("omniq status", "omniq status --json | jq '.queues'")
PURGE_EPILOG = (
    common.examples(
        "omniq purge --results-older-than 7d --events-older-than 7d",
        "omniq purge --expired --yes                # in cron: no question asked",
        "omniq purge --queue mail                   # drop mail's waiting and failed tasks",
        "omniq purge --all-queues --yes",
        "omniq purge --failed --since 30d --yes      # failed tasks (dead letters) only",
        "omniq purge --failed -q mail --func 'send_*' --dry-run",
    )
    + "\n\nWithout --yes it asks first, and refuses (exit 2) when there is no terminal;"
    "\na declined question exits 5. With --failed, -q/--since/--func choose which failed"
    "\ntasks to delete (their results stay until their TTL)."
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


CANCEL_EPILOG = common.examples(
    "omniq cancel TASK_ID                  # waits up to 10s for the worker to confirm",
    "omniq cancel TASK_ID --kill           # a --pool process task: no grace period",
    "omniq cancel TASK_ID --wait 1m --json",
) + (
    "\n\nA task no worker has started is cancelled at once. A running one is asked to stop"
    "\nand its worker confirms within about a second: an async task gets CancelledError,"
    "\na sync task sees omniq.current_task().cancelled (it must check it), a --pool"
    "\nprocess child is killed after the worker's --cancel-grace (--kill: at once). It"
    "\nends cancelled and is not retried."
    "\n\n\b\nExit codes: 0 cancelled (before it ran, or while running); 3 requested but no"
    "\nworker confirmed within --wait (it may still stop later); 5 it had already finished;"
    "\n4 no such task."
)

# operate's outcome -> (JSON name, exit code, plain sentence)
_CANCEL_OUTCOMES = {
    "before": ("cancelled_before_start", ExitCode.OK, "cancelled {id} before it ran"),
    "running": ("cancelled_while_running", ExitCode.OK, "cancelled {id} while it was running"),
    "finished": ("already_finished", ExitCode.REFUSED,
                 "task {id} had already finished ({status}): nothing to cancel"),
    "requested": ("requested", ExitCode.PENDING,
                  "cancel of task {id} requested, but no worker confirmed within {wait}: it "
                  "stops when its worker next looks, or when a sync task checks "
                  "omniq.current_task().cancelled"),
}


@common.command("cancel", epilog=CANCEL_EPILOG)
@common.task_id_argument()
@click.option("--kill", is_flag=True, help="Kill a --pool process task at once (no grace).")
@click.option(
    "--wait", type=common.DURATION, default="10s", show_default=True, metavar="DURATION",
    help="How long to wait for the worker running it to confirm.",
)
@common.json_option('Print {"task_id", "outcome", "cancelled", "status"}.')
def cancel(task_id: str, kill: bool, wait: float, as_json: bool) -> int:
    """Cancel a task: waiting, or running (its worker stops it)."""
    config = common.load_config()
    kind, status = common.run_async(_cancel(config, task_id, kill, wait))
    name, code, sentence = _CANCEL_OUTCOMES[kind]
    if as_json:
        console.json_line({"task_id": task_id, "outcome": name,
                           "cancelled": code == ExitCode.OK, "status": status})
    text = sentence.format(id=task_id, status=status, wait=f"{wait:g}s")
    if code == ExitCode.OK:
        if not as_json:
            console.line(text)
    elif code == ExitCode.PENDING:
        console.warn(text)
    else:
        console.error(text)
    return code


async def _cancel(config: OmniQConfig, task_id: str, kill: bool, wait: float
                  ) -> tuple[str, str | None]:
    """What happened ("before", "running", "finished", "requested") and the task's final
    status when it has one."""
    from omniq import operate

    async with common.open_client(config) as client:
        outcome = await client.cancel_task(task_id, kill=kill, wait=wait)
        kind = {operate.BEFORE: "before", operate.WHILE_RUNNING: "running",
                operate.FINISHED: "finished"}.get(outcome, "requested")
        if kind == "requested":
            return kind, None
        return kind, (await client.wait_result(task_id, 0)).status.value


RETRY_EPILOG = common.examples(
    "id=$(omniq retry TASK_ID)",
    "omniq retry --all-failed                         # every failed task",
    "omniq retry --all-failed -q mail --since 1h --func 'send_*' --dry-run",
) + (
    "\n\n\b\nPrints the id of the queued task. Retrying a task that is queued already does"
    "\nnothing and prints the same id (exit 0): running it twice queues one copy."
    "\n--all-failed queues every failed task that matches the filters again (each under"
    "\nits own id) and prints how many; a bar on a terminal when there are many."
    "\nExit codes: 0 queued; 5 refused: the task has not failed; 4 no such task."
)


@common.command("retry", epilog=RETRY_EPILOG)
@click.argument("task_id", metavar="[TASK_ID]", type=common.TASK_ID, required=False)
@click.option("--all-failed", is_flag=True, help="Every failed task matching the filters below.")
@common.queue_option("With --all-failed: only this queue's.")
@failed_cmd.filter_options
@click.option("--dry-run", is_flag=True, help="With --all-failed: count them, queue nothing.")
@common.json_option('Print {"task_id": ..., "new_id": ...} (--all-failed: {"count", "task_ids"}).')
def retry(task_id: str | None, all_failed: bool, queue: str | None, since: float | None,
          func: str | None, dry_run: bool, as_json: bool) -> None:
    """Queue a failed task again (prints its id), or every failed one (--all-failed)."""
    if all_failed:
        if task_id is not None:
            raise ValueError("give a TASK_ID or --all-failed, not both")
        failed_cmd.retry_all(failed_cmd.Filters(queue, since, func), dry_run, as_json)
        return
    if task_id is None:
        raise ValueError("missing TASK_ID (or --all-failed to retry every failed task)")
    if queue is not None or since is not None or func is not None or dry_run:
        raise ValueError("-q, --since, --func and --dry-run go with --all-failed")
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
@common.queue_option("Drop the waiting and failed tasks of this queue (--failed: its failed ones).")
@click.option(
    "--all-queues", is_flag=True, help="Drop the waiting and failed tasks of every queue."
)
@click.option(
    "--failed", "failed", is_flag=True,
    help="Delete failed tasks (dead letters) only: those of -q, --since and --func.",
)
@failed_cmd.filter_options
@click.option("--dry-run", is_flag=True, help="With --failed: count them, delete nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@common.json_option("Print the counts as one JSON object.")
def purge(
    results_older_than: float | None,
    events_older_than: float | None,
    expired: bool,
    queue: str | None,
    all_queues: bool,
    failed: bool,
    since: float | None,
    func: str | None,
    dry_run: bool,
    yes: bool,
    as_json: bool,
) -> int:
    """Delete old results and events, the waiting tasks of queues, or failed tasks."""
    if failed:
        others = (results_older_than, events_older_than, expired or None, all_queues or None)
        if any(v is not None for v in others):
            raise ValueError("--failed deletes failed tasks only: run the other purges apart")
        return failed_cmd.purge_failed(failed_cmd.Filters(queue, since, func), dry_run, yes,
                                       as_json)
    if since is not None or func is not None or dry_run:
        raise ValueError("--since, --func and --dry-run go with --failed")
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
    return ExitCode.OK


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
            "--queue, --all-queues or --failed"
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
