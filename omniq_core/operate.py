"""Operator features over the stores: failed tasks in bulk, schedules, cancelling a
running task. `AsyncOmniQ` (and the CLI through it) calls these; workers call
`fire_schedules` and answer cancel requests (omniq.worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from omniq.errors import OmniQError, TaskNotFound, TaskStateError
from omniq.models import Task, TaskResult, TaskStatus, is_valid_id, utcnow
from omniq.schedules import SLOT_KEY_TTL, Schedule, schedule_from_mapping

if TYPE_CHECKING:
    from omniq.client import AsyncOmniQ

PAGE = 200  # dead letters read per store call while filtering
SCHEDULE = "schedule"  # record kinds beside the queue
SCHEDULE_STATE = "schedule-state"  # written by workers only: a pause is never lost to them
CANCEL = "cancel"

log = logging.getLogger("omniq.schedules")


# --- failed tasks -------------------------------------------------------------------------


@dataclass(frozen=True)
class FailedInfo:
    """A dead letter with its outcome (error type, message, attempts)."""

    task: Task
    failed_at: datetime
    result: TaskResult | None

    @property
    def status(self) -> str:
        return self.result.status.value if self.result else TaskStatus.FAILED.value

    @property
    def error(self) -> str:
        r = self.result
        if r is None:
            return "(its result has expired)"
        return f"{r.error_type or 'Error'}: {r.error_message or ''}".strip()


def func_matches(func: str, pattern: str | None) -> bool:
    """`pattern` is a glob over the import path (`myapp.tasks:*`) or the function name
    (`send_*`)."""
    if pattern is None:
        return True
    name = func.rpartition(":")[2]
    return fnmatch.fnmatchcase(func, pattern) or fnmatch.fnmatchcase(name, pattern)


async def failed(
    client: AsyncOmniQ,
    queue: str | None = None,
    since: datetime | None = None,
    func: str | None = None,
    limit: int | None = 50,
) -> list[FailedInfo]:
    """Dead letters, newest first, with their outcomes. The store reads them by
    failure time; the function filter is applied to those pages here."""
    store, results = await client._q(), await client._r()
    found: list[FailedInfo] = []
    before: datetime | None = None
    while limit is None or len(found) < limit:
        size = PAGE if func is not None or limit is None else min(PAGE, limit)
        page = await store.failed(queue, since, before, size)
        wanted = [f for f in page if func_matches(f.task.func, func)]
        outcomes = await results.get_many([f.task.id for f in wanted]) if wanted else {}
        found += [FailedInfo(f.task, f.failed_at, outcomes.get(f.task.id)) for f in wanted]
        if len(page) < size:
            break
        before = page[-1].failed_at
    return found if limit is None else found[:limit]


async def retry_failed(
    client: AsyncOmniQ,
    queue: str | None = None,
    since: datetime | None = None,
    func: str | None = None,
    *,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Queue every matching dead letter again (idempotent, as `retry` is); their ids."""
    ids = [f.task.id for f in await failed(client, queue, since, func, limit=None)]
    if dry_run:
        return ids
    done: list[str] = []
    for i, task_id in enumerate(ids, 1):
        with contextlib.suppress(TaskNotFound, TaskStateError):  # retried or purged meanwhile
            done.append(await client.retry(task_id))
        if progress is not None:
            progress(i, len(ids))
    return done


async def purge_failed(
    client: AsyncOmniQ,
    queue: str | None = None,
    since: datetime | None = None,
    func: str | None = None,
    *,
    dry_run: bool = False,
) -> list[str]:
    """Delete every matching dead letter (their results stay until their TTL)."""
    ids = [f.task.id for f in await failed(client, queue, since, func, limit=None)]
    if dry_run or not ids:
        return ids
    store = await client._q()
    for i in range(0, len(ids), PAGE):
        await store.forget(ids[i : i + PAGE])
    return ids


# --- schedules ----------------------------------------------------------------------------


class ScheduleNotFound(OmniQError):
    """No schedule of that name (neither stored nor in the configuration)."""


def configured_schedules(client: AsyncOmniQ) -> dict[str, Schedule]:
    """The `schedules:` of the configuration (omniq.yaml), by name."""
    declared = (schedule_from_mapping(entry) for entry in client.config.schedules)
    return {schedule.name: schedule for schedule in declared}


async def schedules(client: AsyncOmniQ) -> list[Schedule]:
    """Every schedule, with its last slot: the stored ones and those of the
    configuration (the configuration wins for a name in both, but keeps a pause)."""
    store = await client._q()
    stored = {n: Schedule.from_record(d) for n, d in await store.list_records(SCHEDULE)}
    for name, declared in configured_schedules(client).items():
        old = stored.get(name)
        stored[name] = replace(declared, paused=old.paused if old else declared.paused,
                               created_at=old.created_at if old else declared.created_at)
    states = dict(await store.list_records(SCHEDULE_STATE))
    return [_with_state(s, states.get(s.name)) for _, s in sorted(stored.items())]


def _with_state(schedule: Schedule, state: bytes | None) -> Schedule:
    if state is None:
        return schedule
    return replace(schedule, last_slot=datetime.fromisoformat(json.loads(state)["last_slot"]))


async def get_schedule(client: AsyncOmniQ, name: str) -> Schedule:
    for schedule in await schedules(client):
        if schedule.name == name:
            return schedule
    raise ScheduleNotFound(f"no schedule named {name!r}")


async def add_schedule(client: AsyncOmniQ, schedule: Schedule, *, replace_: bool = False) -> None:
    store = await client._q()
    if schedule.name in configured_schedules(client):
        raise TaskStateError(
            f"schedule {schedule.name!r} is declared in the configuration: change it there"
        )
    if not replace_ and await store.get_record(SCHEDULE, schedule.name) is not None:
        raise TaskStateError(f"a schedule named {schedule.name!r} exists (remove it first)")
    await store.put_record(SCHEDULE, schedule.name, replace(schedule, last_slot=None).to_record())


async def set_paused(client: AsyncOmniQ, name: str, paused: bool) -> Schedule:
    schedule = await get_schedule(client, name)
    store = await client._q()
    # A resume starts from the next slot: the pause's slots are not caught up.
    resumed = schedule.resumed_at if paused else utcnow()
    changed = replace(schedule, paused=paused, last_slot=None, resumed_at=resumed)
    await store.put_record(SCHEDULE, name, changed.to_record())
    return changed


async def remove_schedule(client: AsyncOmniQ, name: str) -> None:
    if name in configured_schedules(client):
        raise TaskStateError(f"schedule {name!r} is declared in the configuration: remove it there")
    store = await client._q()
    if not await store.delete_record(SCHEDULE, name):
        raise ScheduleNotFound(f"no schedule named {name!r}")
    await store.delete_record(SCHEDULE_STATE, name)


async def run_now(client: AsyncOmniQ, name: str) -> str:
    """Enqueue the schedule's task now, outside its slots."""
    schedule = await get_schedule(client, name)
    return await client.submit(_slot_task(client, schedule, None))


async def fire_schedules(client: AsyncOmniQ, now: datetime | None = None) -> list[str]:
    """Enqueue every due slot of every active schedule, once however many workers call
    this (each slot's unique key is held by the queue store); the ids enqueued here."""
    now = now or utcnow()
    fired: list[str] = []
    for schedule in await schedules(client):
        if schedule.paused:
            continue
        done = None
        for slot in schedule.due(now):
            task = _slot_task(client, schedule, slot)
            holder = await client.submit(task)
            if holder == task.id:
                fired.append(task.id)
                _half_since.pop((schedule.name, slot), None)
            elif await _half_fired(client, schedule.name, slot, holder):
                break  # its key is held by a firing that died half-way: try again later
            done = slot
        if done is not None:
            await _note_slot(client, schedule.name, done)
    return fired


# A slot whose key is held by a task that never appeared is tried again for this long
# (the queue frees such a key once its producer is surely dead: the file queue after
# _STALE_LOCK, 5 s); then it is given up as fired, with a warning, so that a key held
# for other reasons cannot stop the schedule.
HALF_FIRED_GIVE_UP = 60.0
_half_since: dict[tuple[str, datetime], float] = {}


async def _half_fired(client: AsyncOmniQ, name: str, slot: datetime, holder: str) -> bool:
    """True while the slot's key holder is a task that was never queued (its producer
    died between the key and the task: an ENQUEUED event may exist, nothing else)."""
    if await client.task_exists(holder, enqueued_event_counts=False):
        _half_since.pop((name, slot), None)
        return False
    now = asyncio.get_running_loop().time()
    first = _half_since.setdefault((name, slot), now)
    if now - first < HALF_FIRED_GIVE_UP:
        return True
    del _half_since[(name, slot)]
    log.warning("schedule %s: slot %s given up: its key is held by task %s, which never "
                "appeared", name, slot.isoformat(), holder)
    return False


async def _note_slot(client: AsyncOmniQ, name: str, slot: datetime) -> None:
    store = await client._q()
    old = await store.get_record(SCHEDULE_STATE, name)
    if old is not None and datetime.fromisoformat(json.loads(old)["last_slot"]) >= slot:
        return
    await store.put_record(SCHEDULE_STATE, name,
                           json.dumps({"last_slot": slot.isoformat()}).encode())


def _slot_task(client: AsyncOmniQ, schedule: Schedule, slot: datetime | None) -> Task:
    from omniq.client import TaskOptions

    options = TaskOptions(queue=schedule.queue, **schedule.options)
    if slot is not None:
        options = replace(options, unique_key=schedule.slot_key(slot), unique_ttl=SLOT_KEY_TTL)
    task = client.build_task(schedule.func, schedule.args, dict(schedule.kwargs), options)
    return replace(task, schedule=schedule.name, slot=slot)


# --- cancelling a running task --------------------------------------------------------------

BEFORE = "cancelled before it ran"
WHILE_RUNNING = "cancelled while running"
FINISHED = "had already finished"
REQUESTED = "cancel requested; no worker has confirmed yet"


async def cancel(client: AsyncOmniQ, task_id: str, *, kill: bool = False,
                 wait: float = 10.0) -> str:
    """Cancel a task wherever it is; one of BEFORE, WHILE_RUNNING, FINISHED, REQUESTED."""
    if not is_valid_id(task_id):
        raise TaskNotFound(f"no task with id {task_id!r}")
    if await client.cancel_waiting(task_id):
        return BEFORE
    results = await client._r()
    if await results.get(task_id) is not None:
        return FINISHED
    found = await client._find_task(task_id)  # this process's private queue, or the shared one
    if found is None:
        raise TaskNotFound(f"no task with id {task_id}")
    store = found[0]
    request = json.dumps({"kill": kill, "at": utcnow().isoformat()}).encode()
    await store.put_record(CANCEL, task_id, request)
    outcome = await _wait_outcome(client, task_id, wait)
    if outcome is None:
        return REQUESTED
    await store.delete_record(CANCEL, task_id)
    return WHILE_RUNNING if outcome.status == TaskStatus.CANCELLED else FINISHED


async def _wait_outcome(client: AsyncOmniQ, task_id: str, wait: float) -> TaskResult | None:
    results = await client._r()
    try:
        return await asyncio.wait_for(results.wait(task_id, wait), wait + 5)
    except TimeoutError:
        return None


def cancel_request(data: bytes) -> dict[str, Any]:
    """A stored cancel request: {"kill": bool, "at": iso time}."""
    try:
        found: dict[str, Any] = json.loads(data)
        return found
    except ValueError:
        return {"kill": False, "at": None}
