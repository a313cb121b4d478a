"""Periodic schedules, fired by the ordinary workers: no second daemon, no clock leader.

A schedule says when (a cron expression in a timezone, or a fixed interval) to enqueue
which call. Every worker looks at the schedules about once a second; each due *slot*
(schedule name + due time) is enqueued with the unique key `schedule:<name>:<slot>`,
which the queue store holds atomically, so a slot runs once however many workers look
at it, and a worker killed mid-fire leaves the next one to finish the job.

Slots missed while no worker ran follow the schedule's `catch_up` policy: `latest`
(default: run the most recent missed slot once), `all` (each missed slot, at most
`catch_up_limit` of them) or `none` (skip them; wait for the next slot).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from omniq.models import check_queue_name, utcnow

CATCH_UP = ("latest", "all", "none")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
DEFAULT_CATCH_UP_LIMIT = 100
# A slot's key stays held this long after its task finished: longer than any worker
# can lag behind (they re-read schedules every few seconds), short enough to not pile up.
SLOT_KEY_TTL = 6 * 3600.0
# Task options a schedule may carry (omniq.client.TaskOptions, without the per-call ones).
TASK_OPTIONS = ("priority", "retries", "retry_delay", "timeout", "ttl", "result_ttl")


class ScheduleError(ValueError):
    """A schedule that cannot work: names the field and what is wrong."""


@dataclass(frozen=True)
class Schedule:
    """What and when. `cron` (with `timezone`) or `every` (seconds), not both."""

    name: str
    func: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str = "default"
    options: dict[str, Any] = field(default_factory=dict)
    cron: str | None = None
    timezone: str = "UTC"
    every: float | None = None
    catch_up: str = "latest"
    catch_up_limit: int = DEFAULT_CATCH_UP_LIMIT
    paused: bool = False
    source: str = "cli"  # "config" when declared in omniq.yaml (the file wins at start)
    created_at: datetime = field(default_factory=utcnow)
    last_slot: datetime | None = None  # the newest slot enqueued (by any worker)
    resumed_at: datetime | None = None  # slots of a pause are not caught up

    def __post_init__(self) -> None:
        check_schedule(self)

    def due(self, now: datetime) -> list[datetime]:
        """The slots to enqueue at `now` under the catch-up policy, oldest first."""
        missed = self._slots_between(self._since(), now)
        if len(missed) <= 1:
            return missed
        if self.catch_up == "latest":
            return missed[-1:]
        if self.catch_up == "none":
            # Only a slot that is due right now (within a tick) still counts.
            return [s for s in missed[-1:] if now - s <= timedelta(seconds=5)]
        return missed[-self.catch_up_limit :]

    def next_slot(self, after: datetime | None = None) -> datetime:
        """The first slot after `after` (default: now)."""
        return self._iterate(after or utcnow())[0]

    def _since(self) -> datetime:
        return max(t for t in (self.created_at, self.last_slot, self.resumed_at) if t)

    def _slots_between(self, start: datetime, end: datetime) -> list[datetime]:
        """Slots in (start, end]; at most catch_up_limit + 1 of the newest."""
        if self.every is not None:
            step = timedelta(seconds=self.every)
            # Slots sit on a grid anchored at the creation time (not at the last fire).
            first = self.created_at + step * _steps_after(start - self.created_at, step)
            if first > end:
                return []
            count = int((end - first) / step) + 1
            skip = max(0, count - (self.catch_up_limit + 1))
            return [first + step * i for i in range(skip, count)]
        slots: list[datetime] = []
        for slot in _cron(self.cron or "", start, self.timezone):
            if slot > end:
                break
            slots.append(slot)
            if len(slots) > self.catch_up_limit + 1:
                slots.pop(0)
        return slots

    def _iterate(self, after: datetime) -> list[datetime]:
        if self.every is not None:
            step = timedelta(seconds=self.every)
            return [self.created_at + step * _steps_after(after - self.created_at, step)]
        return [next(_cron(self.cron or "", after, self.timezone))]

    def slot_key(self, slot: datetime) -> str:
        return f"schedule:{self.name}:{slot.astimezone(UTC).isoformat()}"

    def to_record(self) -> bytes:
        data = asdict(self)
        data["args"] = list(self.args)
        for key in ("created_at", "last_slot", "resumed_at"):
            value = getattr(self, key)
            data[key] = None if value is None else value.isoformat()
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_record(cls, data: bytes | str) -> Schedule:
        d = json.loads(data)
        for key in ("created_at", "last_slot", "resumed_at"):
            if d.get(key) is not None:
                d[key] = datetime.fromisoformat(d[key])
        d["args"] = tuple(d.get("args") or ())
        return cls(**d)

    def fired(self, slot: datetime) -> Schedule:
        newest = slot if self.last_slot is None else max(self.last_slot, slot)
        return replace(self, last_slot=newest)


def _steps_after(span: timedelta, step: timedelta) -> int:
    """The smallest k >= 1 with k * step > span: the first grid slot after `span`."""
    return max(1, int(span // step) + 1)


def _cron(expr: str, after: datetime, timezone: str) -> Any:
    """Slots of `expr` after `after`, as aware UTC datetimes; DST as cron does it
    (a time skipped by a spring-forward runs at the first minute after the gap)."""
    from cronsim import CronSim

    local = after.astimezone(ZoneInfo(timezone)).replace(microsecond=0)
    for slot in CronSim(expr, local):
        yield slot.astimezone(UTC)


def check_schedule(s: Schedule) -> None:
    """Raise ScheduleError for a schedule that cannot work, naming the field."""
    if not NAME_RE.match(s.name):
        raise ScheduleError(
            f"schedule name {s.name!r}: use letters, digits, '_', '.', '-' (at most 100)"
        )
    if (s.cron is None) == (s.every is None):
        raise ScheduleError(f"schedule {s.name!r}: give either `cron` or `every`, not both")
    if s.every is not None and s.every < 1:
        raise ScheduleError(f"schedule {s.name!r}: `every` must be at least 1 second")
    if s.catch_up not in CATCH_UP:
        raise ScheduleError(
            f"schedule {s.name!r}: catch_up must be one of {', '.join(CATCH_UP)}"
        )
    if s.catch_up_limit < 1:
        raise ScheduleError(f"schedule {s.name!r}: catch_up_limit must be at least 1")
    try:
        ZoneInfo(s.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"schedule {s.name!r}: unknown timezone {s.timezone!r}") from None
    if s.cron is not None:
        _check_cron(s.name, s.cron)
    try:
        check_queue_name(s.queue)
    except ValueError as exc:
        raise ScheduleError(f"schedule {s.name!r}: {exc}") from None
    unknown = sorted(set(s.options) - set(TASK_OPTIONS))
    if unknown:
        raise ScheduleError(
            f"schedule {s.name!r}: unknown task option(s) {', '.join(unknown)}; "
            f"known: {', '.join(TASK_OPTIONS)}"
        )


def _check_cron(name: str, expr: str) -> None:
    from cronsim import CronSim, CronSimError

    try:
        CronSim(expr, datetime.now(UTC))
    except CronSimError as exc:
        raise ScheduleError(f"schedule {name!r}: bad cron expression {expr!r}: {exc}") from None


_FIELDS = ("name", "func", "args", "kwargs", "queue", "cron", "timezone", "every",
           "catch_up", "catch_up_limit", "paused")
_DURATIONS = ("every", "retry_delay", "timeout", "ttl", "result_ttl")


def schedule_from_mapping(values: dict[str, Any], source: str = "config") -> Schedule:
    """A Schedule from a YAML/JSON mapping: `every: 30s` and other durations as text,
    task options (retries, timeout, ...) beside the other fields or under `options`."""
    from omniq.config import parse_duration

    data = dict(values)
    options = dict(data.pop("options", None) or {})
    for key in TASK_OPTIONS:
        if key in data:
            options[key] = data.pop(key)
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ScheduleError(
            f"schedule {data.get('name', '?')!r}: unknown field(s) {', '.join(unknown)}; "
            f"known: {', '.join((*_FIELDS, *TASK_OPTIONS))}"
        )
    for key in _DURATIONS:
        holder = data if key in data else options
        if holder.get(key) is not None and not isinstance(holder[key], bool):
            holder[key] = parse_duration(holder[key])
    for key in ("name", "func"):
        if not isinstance(data.get(key), str):
            raise ScheduleError(f"a schedule needs `{key}` (text)")
    data["args"] = tuple(data.get("args") or ())
    data["kwargs"] = dict(data.get("kwargs") or {})
    return Schedule(**data, options=options, source=source)
