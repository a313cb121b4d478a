"""The NATS task queue: a work-queue stream dispatches, a KV bucket decides.

Tasks are messages on ``P.tasks.<queue>.<priority>`` (one durable pull consumer per
lane: JetStream has no priorities, so each level is its own lane, tried highest first).
``t.<task id>`` in the bucket ``P_queue`` holds the task with its state in headers
(waiting / running / failed / cancelled, attempts, ready and lease times). Claims,
leases, cancels and dead letters are compare-and-set writes on that key, so the stream
only dispatches and the key decides. ``u.<unique key>`` -> task id, ``w.<worker id>`` ->
worker registry, ``m.failed`` -> how far the failure records moved from an older omniq go.

Dead letters are listed by failure time through their records in the stream
``P_failed`` (deadletters.py); named records live in the bucket ``P_records``
(records.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from omniq.errors import BackendError, BackendUnavailable, CorruptRecord
from omniq.models import (
    Delivery,
    FailedTask,
    QueueStats,
    Task,
    WorkerInfo,
    from_timestamp,
    is_queue_name,
)
from omniq.serialization import (
    decode_task,
    decode_task_or_placeholder,
    decode_worker,
    encode_task,
    encode_worker,
)

from .backend import Store
from .connection import (
    Bucket,
    Connection,
    Entry,
    Link,
    at_us,
    bound_cb,
    boundary,
    describe,
    ensure_bucket,
    ensure_stream,
    in_chunks,
    purge,
    status_of,
    tok,
    us_of,
    within,
)
from .deadletters import FailureIndex, Record, stale, unindexed
from .headers import (
    CANCELLED,
    FAILED,
    H_ATTEMPTS,
    H_CLAIM,
    H_ETA,
    H_ID,
    H_INDEXED,
    H_LEASE,
    H_PRIORITY,
    H_QUEUE,
    H_READY,
    H_REV,
    H_STATE,
    H_UNIQUE,
    H_UNIQUE_TTL,
    H_UNTIL,
    RUNNING,
    WAITING,
)
from .records import RecordBucket

log = logging.getLogger("omniq.backends.nats")

# Consumer AckWait: how long a pulled message stays away when nobody settles it: one that
# a process fetched and then died before claiming it or handing it back, or one whose
# lease NAK was lost. Short, so a worker killed by a task does not hold the tasks it had
# prefetched for long (issue 8, item 2); a claimed task's lease is set on its message with
# a delayed NAK instead (one fire-and-forget publish per claim, no round trip).
ACK_WAIT = 5.0
HOLD = 1.0  # pulled messages nobody claimed go back to the stream after this
FRESH = 0.1  # a lane the server just called empty is skipped this long, unless woken
MAX_BATCH = 64
# Stranded enqueues (NATSQueue.finish_stranded): a task's message follows its state
# within a round trip, so one waiting this long without a message never gets one.
STRANDED_AFTER = 10.0
SWEEP_EVERY = 15.0  # an idle worker looks for them this often, at first;
SWEEP_MOST = 600.0  # after 3 looks that found none, twice as long each time, up to this
SWEEP_LOOKBACK = 3600.0  # over the tasks written this long ago at most
LEVEL_REFRESH = 10.0  # re-discover the priority levels of a queue this often
ETA_SLACK = 0.005
POLL_MARGIN = 0.02  # long polls end this much before the caller's deadline
LEASE_MARGIN = 1.5  # a long lease's NAK goes out this long before AckWait runs out
FORGET_BATCH = 256  # dead letters forgotten per round trip of each step


# --- names ----------------------------------------------------------------


def _qtok(queue: str) -> str:
    """A queue name as one token: readable and reversible ('_' -> '__', '.' -> '_d')."""
    if not is_queue_name(queue):
        return tok(queue)
    return queue.replace("_", "__").replace(".", "_d")


def _ptok(priority: int) -> str:
    return f"p{priority}" if priority >= 0 else f"n{-priority}"


def _parse_ptok(token: str) -> int | None:
    if len(token) > 1 and token[0] in "pn" and token[1:].isdigit():
        return int(token[1:]) * (1 if token[0] == "p" else -1)
    return None


def task_key(task_id: str) -> str:
    return "t." + tok(task_id)


def _unique_key(key: str) -> str:
    return "u." + tok(key)


def _worker_key(worker_id: str) -> str:
    return "w." + tok(worker_id)


def _nak_payload(delay: float) -> bytes:
    if delay <= 0:
        return b"-NAK"
    return b"-NAK " + json.dumps({"delay": int(delay * 1e9)}).encode()


# --- local lanes -------------------------------------------------------------------


@dataclass
class _Pull:
    """One outstanding pull request; at most one per lane, so its status is unambiguous."""

    size: int
    long: bool
    deadline: float  # loop time after which we stop waiting for its answer
    received: int = 0
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass
class _Lane:
    """One (queue, priority) consumer and the messages pulled for it, not claimed yet."""

    queue: str
    priority: int
    consumer: str
    inbox: str
    buffer: deque[tuple[Msg, float]] = field(default_factory=deque)
    pull: _Pull | None = None
    empty_at: float = -math.inf
    hint: bool = True
    batch: int = 1
    pulled_at: float = -math.inf
    lost: bool = False
    sub: Subscription | None = None
    timer: asyncio.TimerHandle | None = None


class _Dispatcher:
    """Pulls task messages per lane into small buffers and wakes claimers (one per
    connection, shared by the queue handles of a Backend).

    A lane the server just reported empty is skipped for FRESH seconds unless an
    enqueue woke it, so claims served from a buffer cost no round trip for the empty
    higher-priority lanes above it. Waiting claimers hold one long poll per lane: the
    server pushes new, retried and lease-expired messages.
    """

    def __init__(self, conn: Connection, prefix: str, stream: str) -> None:
        self._conn = conn
        self._prefix = prefix
        self._stream = stream
        self._lanes: dict[tuple[str, int], _Lane] = {}
        self._levels: dict[str, set[int]] = {}
        self._levels_at: dict[str, float] = {}
        self._wakes: dict[str, Subscription] = {}
        self._create_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self.sweeper: asyncio.Task[None] | None = None  # finishing stranded enqueues
        self.swept_at = -math.inf
        self.sweep_gaps = 0  # sweeps in a row that found nothing (each doubles the gap)
        # Resolved (and replaced) whenever work may have arrived: claimers wait on it.
        self.changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def subject(self, queue: str, priority: int) -> str:
        return f"{self._prefix}.tasks.{_qtok(queue)}.{_ptok(priority)}"

    def wake_subject(self, queue: str) -> str:
        return f"{self._prefix}.wake.{_qtok(queue)}"

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _notify(self) -> None:
        changed, self.changed = self.changed, asyncio.get_running_loop().create_future()
        if not changed.done():
            changed.set_result(None)

    def note(self, queue: str, priority: int) -> None:
        """Work may have arrived in this lane (an enqueue or release seen or made here)."""
        self._levels.setdefault(queue, set()).add(priority)
        lane = self._lanes.get((queue, priority))
        if lane is not None:
            lane.hint = True
        self._notify()

    async def lanes(self, queues: Sequence[str]) -> list[_Lane]:
        """The lanes to try, in order: queues as given, then higher priority first."""
        out: list[_Lane] = []
        for queue in queues:
            for priority in sorted(await self._levels_of(queue), reverse=True):
                out.append(await self._lane(queue, priority))
        return out

    async def _levels_of(self, queue: str) -> set[int]:
        if queue not in self._wakes:
            self._wakes[queue] = await self._conn.nc.subscribe(
                self.wake_subject(queue), cb=bound_cb(self._on_wake, queue)
            )
        if self._now() - self._levels_at.get(queue, -math.inf) > LEVEL_REFRESH:
            self._levels_at[queue] = self._now()
            info = await self._conn.js.stream_info(
                self._stream, subjects_filter=f"{self._prefix}.tasks.{_qtok(queue)}.*"
            )
            for subject in info.state.subjects or {}:
                priority = _parse_ptok(subject.rsplit(".", 1)[-1])
                if priority is not None:
                    self._levels.setdefault(queue, set()).add(priority)
        return self._levels.setdefault(queue, set())

    async def _on_wake(self, queue: str, msg: Msg) -> None:
        with contextlib.suppress(ValueError):
            self.note(queue, int(msg.data))

    async def _lane(self, queue: str, priority: int) -> _Lane:
        lane = self._lanes.get((queue, priority))
        if lane is not None and not lane.lost:
            return lane
        async with self._create_lock:
            lane = self._lanes.get((queue, priority))
            if lane is None or lane.lost:
                lane = await self._create_lane(queue, priority, lane)
        return lane

    async def _create_lane(self, queue: str, priority: int, lane: _Lane | None) -> _Lane:
        consumer = f"{_qtok(queue)}-{_ptok(priority)}"
        config = api.ConsumerConfig(
            durable_name=consumer,
            filter_subject=self.subject(queue, priority),
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT,
            # Scheduled and retried tasks wait as pending acks: never cap them.
            max_ack_pending=-1,
            max_deliver=-1,
            max_waiting=4096,
        )
        try:
            # Also updates the AckWait of a consumer made by an older omniq (30 s).
            await self._conn.js.add_consumer(self._stream, config)
        except nats.js.errors.BadRequestError:
            # A server that will not update it: use the consumer as it is.
            await self._conn.js.consumer_info(self._stream, consumer)
        if lane is None:
            lane = _Lane(queue, priority, consumer, self._conn.nc.new_inbox())
            lane.sub = await self._conn.nc.subscribe(
                lane.inbox, cb=bound_cb(self._on_message, lane)
            )
            self._lanes[(queue, priority)] = lane
        lane.lost = False
        lane.pull = None
        return lane

    async def _on_message(self, lane: _Lane, msg: Msg) -> None:
        status = status_of(msg)
        if status is None:
            lane.buffer.append((msg, self._now()))
            self._arm_hold(lane)
            pull = lane.pull
            if pull is not None:
                pull.received += 1
                if pull.received >= pull.size:
                    self._end_pull(lane)
        elif status != "100":  # 100 = heartbeat
            if status in ("404", "408"):
                lane.empty_at = self._now()
            elif status == "503" or "Deleted" in str(msg.headers):
                lane.lost = True
            self._end_pull(lane)
        self._notify()

    def _end_pull(self, lane: _Lane) -> None:
        if lane.pull is not None:
            if not lane.pull.done.done():
                lane.pull.done.set_result(None)
            lane.pull = None

    def _live_pull(self, lane: _Lane) -> _Pull | None:
        pull = lane.pull
        if pull is not None and pull.deadline < self._now():
            # No answer at all: the consumer is gone (the server stays silent then)
            # or the connection dropped the request.
            lane.pull = None
            lane.lost = lane.lost or not pull.long
            return None
        return pull

    def _arm_hold(self, lane: _Lane) -> None:
        if lane.timer is None and lane.buffer:
            delay = max(0.0, lane.buffer[0][1] + HOLD - self._now())
            lane.timer = asyncio.get_running_loop().call_later(delay, self._give_back, lane)

    def _give_back(self, lane: _Lane) -> None:
        """Hand unclaimed messages back: a busy process must not sit on others' work."""
        lane.timer = None
        cutoff = self._now() - HOLD + 0.001
        stale: list[Msg] = []
        while lane.buffer and lane.buffer[0][1] <= cutoff:
            stale.append(lane.buffer.popleft()[0])
        if stale:
            lane.batch = max(1, lane.batch // 2)
            self._spawn(self._nak_all(stale))
        self._arm_hold(lane)

    async def _nak_all(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            self._conn.publish_soon(msg.reply, b"-NAK")

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def take(self, lanes: Sequence[_Lane], limit: int) -> list[tuple[_Lane, Msg, float]]:
        """Up to `limit` pulled messages, lanes in order, pulling once per lane at most
        when its buffer runs dry."""
        items: list[tuple[_Lane, Msg, float]] = []
        for lane in lanes:
            if not lane.buffer:
                await self._refill(lane, limit - len(items))
            while lane.buffer and len(items) < limit:
                msg, arrived = lane.buffer.popleft()
                items.append((lane, msg, arrived))
            if len(items) >= limit:
                break
        return items

    async def _refill(self, lane: _Lane, wanted: int) -> None:
        pull = self._live_pull(lane)
        if pull is None:
            if not lane.hint and self._now() - lane.empty_at < FRESH:
                return
            pull = await self._pull(lane, size=min(MAX_BATCH, max(wanted, self._batch(lane))))
        elif pull.long:
            return  # an open long poll: the server has nothing for us right now
        # A quick pull is in flight (ours, or a concurrent claim's): wait for it.
        await within(pull.done, pull.deadline - self._now())

    def _batch(self, lane: _Lane) -> int:
        now = self._now()
        if now - lane.pulled_at < 0.05:  # drained the last batch quickly: take more
            lane.batch = min(MAX_BATCH, lane.batch * 2)
        lane.pulled_at = now
        return lane.batch

    async def _pull(self, lane: _Lane, size: int, expires: float = 0.0) -> _Pull:
        req: dict[str, Any] = {"batch": size}
        if expires > 0:
            req["expires"] = int(expires * 1e9)
        else:
            req["no_wait"] = True
        pull = _Pull(size, expires > 0, self._now() + expires + self._conn.timeout)
        lane.pull = pull
        lane.hint = False
        await self._conn.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{self._stream}.{lane.consumer}",
            json.dumps(req).encode(),
            reply=lane.inbox,
        )
        return pull

    async def arm(self, lanes: Sequence[_Lane], budget: float) -> None:
        """Open a long poll on every idle lane, ending just before the caller's deadline."""
        expires = budget - POLL_MARGIN
        if expires < 0.05:
            return
        for lane in lanes:
            if not lane.buffer and self._live_pull(lane) is None:
                await self._pull(lane, size=1, expires=expires)

    async def close(self, same_connection: bool) -> None:
        leftovers: list[Msg] = []
        for lane in self._lanes.values():
            if lane.timer is not None:
                lane.timer.cancel()
            leftovers.extend(msg for msg, _ in lane.buffer)
            lane.buffer.clear()
        if self.sweeper is not None:
            self.sweeper.cancel()
        if not same_connection:
            return
        subs = [lane.sub for lane in self._lanes.values() if lane.sub] + list(self._wakes.values())
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self._nak_all(leftovers)
            await asyncio.gather(*self._background, return_exceptions=True)
            await self._conn.nc.flush(timeout=1)


# --- task state ---------------------------------------------------------------------

# What identifies a task. Its state entry and its dispatch message both carry these
# headers, so claims, scans, unique-key checks and problem deliveries never need to
# decode a payload (which may be corrupt).
_META = (H_ID, H_QUEUE, H_PRIORITY, H_UNIQUE, H_UNIQUE_TTL)


def _meta_of(task: Task) -> dict[str, str]:
    meta = {H_ID: task.id, H_QUEUE: task.queue, H_PRIORITY: str(task.priority)}
    if task.unique_key is not None:
        meta[H_UNIQUE] = _unique_key(task.unique_key)
        if task.unique_ttl:
            meta[H_UNIQUE_TTL] = repr(float(task.unique_ttl))
    return meta


def _pick_meta(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: headers[k] for k in _META if headers.get(k)}


def _state_headers(
    meta: Mapping[str, str],
    state: str,
    attempts: int,
    *,
    ready: float = 0.0,
    lease: float = 0.0,
    claim: str | None = None,
) -> dict[str, str]:
    headers = {**meta, H_STATE: state, H_ATTEMPTS: str(attempts)}
    if ready:
        headers[H_READY] = repr(ready)
    if lease:
        headers[H_LEASE] = repr(lease)
    if claim:
        headers[H_CLAIM] = claim
    return headers


@dataclass(eq=False)  # hashable by identity: a delivery's receipt names one claim
class Receipt:
    """What a delivery needs to settle: the message's ack subject, the claim's revision,
    and the claim token that every write of this lease holder carries (so a write of
    ours whose reply was lost is recognised when it is sent again)."""

    reply: str
    key: str
    rev: int
    data: bytes
    attempts: int
    token: str
    meta: dict[str, str]
    acked: bool = False  # a finishing purge was sent (its reply may have been lost)
    until: float = 0.0  # when the lease taken by the claim ends
    hold: asyncio.TimerHandle | None = None  # sends the lease's NAK (see _set_lease)

    def unhold(self) -> None:
        """The lease holder settles or extends: the pending lease NAK is not needed."""
        if self.hold is not None:
            self.hold.cancel()
            self.hold = None

    def __str__(self) -> str:
        # What names the claim (storage.started_event puts it in the STARTED event's id).
        return self.token


@dataclass(frozen=True)
class _Unsettled:
    """A claim whose reply never came: the server may have taken it for us."""

    reply: str
    key: str
    token: str


def _state(entry: Entry) -> str:
    return entry.text(H_STATE)


def _attempts(entry: Entry) -> int:
    return int(entry.number(H_ATTEMPTS))


def _own_headers(entry: Entry, state: str) -> dict[str, str]:
    out = {k: v for k, v in entry.headers.items() if k.startswith("Omniq-")}
    out[H_STATE] = state
    return out


def _task_id_of(entry: Entry) -> str:
    # Entries of an older omniq lack the id header; their key is the id when it is plain.
    return entry.text(H_ID) or entry.key[2:]


def _never_dispatched(entry: Entry, before: float) -> bool:
    """A waiting task that never ran, stored before `before`: its message should exist."""
    return (_state(entry) == WAITING and not entry.text(H_CLAIM) and bool(entry.text(H_ID))
            and entry.stored < before)


def _holder(entry: Entry) -> str:
    return entry.data.decode(errors="replace")


def _message_meta(lane: _Lane, msg: Msg) -> dict[str, str] | None:
    """The identity of the task a message dispatches, or None when it names no task."""
    headers = msg.headers or {}
    meta = _pick_meta(headers)
    if H_ID not in meta:
        # A message of an older omniq: the task's id was its Nats-Msg-Id.
        try:
            meta = _meta_of(decode_task(msg.data))
        except CorruptRecord:
            task_id = headers.get("Nats-Msg-Id")
            if not task_id:
                return None
            meta = {H_ID: task_id}
    # The lane knows where the message was published, whatever its payload says.
    meta.setdefault(H_QUEUE, lane.queue)
    meta.setdefault(H_PRIORITY, str(lane.priority))
    return meta


def _stat_of(entry: Entry, now: float) -> tuple[str, float] | None:
    """The entry's stats column, and since when it is ready (for queued ones)."""
    state = _state(entry)
    if state == WAITING:
        ready = entry.number(H_READY)
        if ready > now:
            return "scheduled", 0.0
        return "queued", max(ready, entry.stored)
    if state == RUNNING:
        lease = entry.number(H_LEASE)
        return ("running", 0.0) if lease > now else ("queued", lease)
    if state == FAILED:
        return "failed", 0.0
    return None


def receipt_of(delivery: Delivery) -> Receipt:
    if not isinstance(delivery.receipt, Receipt):
        raise BackendError(f"delivery of task {delivery.task_id} was not made by a NATS queue")
    return delivery.receipt


@dataclass
class _Claim:
    """One message of a batch claim."""

    receipt: Receipt
    rev0: int  # the state revision its enqueuer wrote (0: a message of an older omniq)
    arrived: float
    won: bool = False


@dataclass
class _Held:
    """The queue's state on one connection: its lanes."""

    dispatcher: _Dispatcher


# --- the queue ---------------------------------------------------------------------


class NATSQueue(Store):
    """Tasks in a JetStream work-queue stream; claims and leases arbitrated in a KV bucket."""

    ROLE = "queue"

    def _name_things(self) -> None:
        self._stream = f"{self.prefix}_tasks"
        self._state = Bucket(self._conn, f"{self.prefix}_queue")
        self._index = FailureIndex(self._conn, self.prefix, _qtok)
        self._records = RecordBucket(self._conn, self.prefix)

    async def _setup(self) -> None:
        js = self._conn.js
        await ensure_stream(
            js,
            api.StreamConfig(
                name=self._stream,
                subjects=[f"{self.prefix}.tasks.>"],
                retention=api.RetentionPolicy.WORK_QUEUE,
                storage=api.StorageType.FILE,
                allow_direct=True,
            ),
        )
        await ensure_bucket(js, self._state.name)
        await self._index.setup()
        await self._records.setup()
        await self._index.migrate(self._state)

    def _held(self, link: Link) -> _Held:
        held = link.extras.get("queue")
        if held is None:
            held = link.extras["queue"] = _Held(_Dispatcher(self._conn, self.prefix, self._stream))
        assert isinstance(held, _Held)
        return held

    async def _lanes(self) -> _Dispatcher:
        link = await self._ready()
        if link.nc is None or not link.nc.is_connected:
            raise BackendUnavailable(f"NATS at {self._conn.where} is unavailable: reconnecting")
        return self._held(link).dispatcher

    async def teardown(self, link: Link) -> None:
        """The connection closes: hand back the claims whose reply was lost (so they run
        again now, without an attempt counted against them) and the pulled messages."""
        unsettled = self.unsettled()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._hand_back(unsettled), self._conn.timeout)
        unsettled.clear()
        held = link.extras.pop("queue", None)
        if isinstance(held, _Held):
            await held.dispatcher.close(same_connection=True)

    async def _hand_back(self, unsettled: deque[_Unsettled]) -> None:
        while unsettled:
            lost = unsettled.popleft()
            entry = await self._state.get(lost.key)
            if entry is not None and _state(entry) == RUNNING and entry.text(H_CLAIM) == lost.token:
                r = Receipt(lost.reply, lost.key, entry.rev, entry.data, _attempts(entry),
                            lost.token, _pick_meta(entry.headers))
                waiting = _state_headers(r.meta, WAITING, max(0, r.attempts - 1), claim=r.token)
                await self.fenced(r, waiting)
            await self._conn.publish(lost.reply, b"-NAK")

    # --- enqueue -------------------------------------------------------------

    @boundary
    async def enqueue(self, task: Task) -> str:
        return await self.put_task(task, None)

    async def put_task(self, task: Task, announce: Awaitable[Any] | None) -> str:
        """Enqueue; `announce` (the ENQUEUED event's write, already sent) is awaited
        before the task's message goes out: a worker can only claim after that."""
        dispatcher = await self._lanes()
        key = task_key(task.id)
        # State first: the worker that fetches the message, and an enqueuer checking
        # who holds a unique key, must find it.
        entry = await self._put_waiting(task, key)
        if _state(entry) != WAITING or entry.text(H_CLAIM) or not entry.text(H_ID):
            return task.id  # claimed at least once (or an older omniq's): left alone
        # Ours, or an earlier enqueue of this id whose reply was lost: finish its work.
        return await self._finish_put(dispatcher, entry, task.id, announce)

    async def _finish_put(
        self, dispatcher: _Dispatcher, entry: Entry, task_id: str,
        announce: Awaitable[Any] | None,
    ) -> str:
        """Take the task's unique key (or drop the task if another holds it), then
        send the message that makes it claimable."""
        ukey = entry.text(H_UNIQUE)
        if ukey:
            holder = await self._hold_unique(ukey, task_id)
            if holder != task_id:
                await self._state.purge_at(entry.key, entry.rev)
                return holder
        if announce is not None:
            await announce
        await self._dispatch(dispatcher, entry)
        return task_id

    async def _put_waiting(self, task: Task, key: str) -> Entry:
        """Create the task's state; or the unfinished entry of its id, left as it is;
        a dead letter of its id is replaced (queued again from scratch)."""
        data = encode_task(task)
        eta = task.eta.timestamp() if task.eta else 0.0
        headers = _state_headers(_meta_of(task), WAITING, 0, ready=eta)
        last, dead = 0, False
        for _ in range(5):
            rev = await self._state.put(key, data, headers, last=last)
            if rev is not None:
                if dead:  # queued again: its failure records go before it can fail again
                    await self._index.drop([task.id])
                return Entry(key, rev, data, headers)
            entry = await self._state.get(key)
            if entry is not None and _state(entry) in (WAITING, RUNNING):
                return entry
            last = 0 if entry is None else entry.rev  # gone, dead, or being cancelled
            dead = entry is not None and _state(entry) == FAILED
        raise BackendError(f"task {task.id} is being changed by others; try again")

    async def _dispatch(self, dispatcher: _Dispatcher, entry: Entry) -> None:
        """Publish the message that hands the task (this state revision) to a worker."""
        queue, priority = entry.text(H_QUEUE), int(entry.number(H_PRIORITY))
        # The message id names this enqueue: a publish sent again (its reply was lost, or
        # the enqueue was repeated) is dropped within the stream's duplicate window, while
        # a dead letter queued again gets a new revision and so goes through. A copy after
        # the window is harmless: the state key, not the message, decides who runs it.
        headers = {
            **_pick_meta(entry.headers),
            H_REV: str(entry.rev),
            "Nats-Msg-Id": f"{entry.text(H_ID)}:{entry.rev}",
        }
        ready = entry.number(H_READY)
        if ready:
            headers[H_ETA] = repr(ready)
        sent = await self._conn.send(dispatcher.subject(queue, priority), entry.data, headers)
        # The wake-up goes out in the same write to the socket: it tells other processes'
        # dispatchers about a priority level they may not know yet.
        await self._conn.publish(dispatcher.wake_subject(queue), b"%d" % priority)
        (reply,) = await self._conn.replies([sent])
        Bucket.rev_of(reply)  # raises when the stream refused it
        dispatcher.note(queue, priority)

    async def _hold_unique(self, ukey: str, task_id: str) -> str:
        """Take the unique key for `task_id`, or return the task holding it."""
        for _ in range(5):
            if await self._state.put(ukey, task_id.encode(), {}, last=0) is not None:
                return task_id
            entry = await self._state.get(ukey)
            if entry is None:
                continue  # freed meanwhile
            holder = _holder(entry)
            if holder == task_id and not entry.text(H_UNTIL):
                return task_id  # ours already (an enqueue sent again)
            if holder != task_id and await self._key_held(entry, holder):
                return holder
            # Free: its holder finished and its time ran out, or it ended without freeing
            # the key (a crash in between); or ours from a dead letter queued again.
            if await self._state.put(ukey, task_id.encode(), {}, last=entry.rev) is not None:
                return task_id
        raise BackendError(f"unique key {ukey!r} is contended; try again")

    async def _key_held(self, entry: Entry, holder: str) -> bool:
        if entry.text(H_UNTIL):  # finished: held for its unique_ttl
            return entry.number(H_UNTIL) > time.time()
        return await self._unfinished(holder)

    async def _unfinished(self, task_id: str) -> bool:
        entry = await self._state.get(task_key(task_id))
        return entry is not None and _state(entry) in (WAITING, RUNNING)

    async def _free_unique(self, ukey: str, task_id: str) -> None:
        if not ukey:
            return
        entry = await self._state.get(ukey)
        if entry is not None and _holder(entry) == task_id:
            await self._state.purge_at(ukey, entry.rev)

    async def _settle_unique(self, meta: Mapping[str, str]) -> None:
        """The task finished: hold its key for its unique_ttl more, or free it now."""
        ukey = meta.get(H_UNIQUE)
        if not ukey:
            return
        ttl = float(meta.get(H_UNIQUE_TTL) or 0)
        if not ttl:
            await self._free_unique(ukey, meta.get(H_ID, ""))
            return
        entry = await self._state.get(ukey)
        if entry is not None and _holder(entry) == meta.get(H_ID):
            until = {H_UNTIL: repr(time.time() + ttl)}
            await self._state.put(ukey, entry.data, until, last=entry.rev)

    # --- claims ------------------------------------------------------------------

    @boundary
    async def dequeue(
        self, queues: Sequence[str], lease: float, timeout: float
    ) -> Delivery | None:
        got = await self.claim_many(queues, lease, timeout, 1)
        return got[0] if got else None

    @boundary
    async def dequeue_many(
        self, queues: Sequence[str], lease: float, timeout: float, limit: int
    ) -> list[Delivery]:
        return await self.claim_many(queues, lease, timeout, limit)

    async def claim_many(
        self, queues: Sequence[str], lease: float, timeout: float, limit: int
    ) -> list[Delivery]:
        """Up to `limit` deliveries, waiting up to `timeout` for the first. The pulled
        messages of a batch are claimed together: their compare-and-set writes go out in
        one write to the socket and their replies are awaited together (one round trip
        for the batch, plus one for a message that turns out to be a redelivery)."""
        dispatcher = await self._lanes()
        refound = await self._refind(lease, limit)
        if refound:
            return refound
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while True:
            changed = dispatcher.changed  # taken first: a change during the pass wakes us
            lanes = await dispatcher.lanes(queues)
            got = await self._claim_pulled(dispatcher, lanes, lease, limit)
            if got:
                return got
            budget = deadline - loop.time()
            if budget <= 0:
                self._sweep_when_idle(dispatcher)
                return []
            await dispatcher.arm(lanes, budget)
            await within(changed, budget)

    # --- stranded enqueues ---------------------------------------------------------
    # An enqueue writes the task's state, then its message: a producer killed between
    # the two (one round trip) leaves a waiting task that no message will hand out,
    # counted as queued and holding its unique key. Idle workers finish such enqueues.

    def _sweep_when_idle(self, dispatcher: _Dispatcher) -> None:
        now = time.monotonic()
        if dispatcher.sweeper is not None and not dispatcher.sweeper.done():
            return
        gap = SWEEP_EVERY * 2 ** max(0, dispatcher.sweep_gaps - 2)  # 3 looks, then slower
        if now - dispatcher.swept_at < min(SWEEP_MOST, gap):
            return
        dispatcher.swept_at = now
        dispatcher.sweeper = asyncio.create_task(self._sweep_quietly(dispatcher))

    async def _sweep_quietly(self, dispatcher: _Dispatcher) -> None:
        try:
            finished = await self.finish_stranded(dispatcher)
        except Exception as exc:  # an outage: the claims report it; tried again later
            log.debug("NATS: stranded enqueues not swept: %s", describe(exc))
            return
        # Rare by nature: each look that finds none waits twice as long for the next
        # (a look reads every task written within SWEEP_LOOKBACK, headers only).
        dispatcher.sweep_gaps = 0 if finished else min(dispatcher.sweep_gaps + 1, 10)
        if finished:
            log.warning("NATS: finished %d enqueues whose producer died between the "
                        "task and its message", finished)

    async def finish_stranded(self, dispatcher: _Dispatcher | None = None) -> int:
        """Finish the enqueues of tasks written in the last SWEEP_LOOKBACK seconds whose
        message never went out; how many. A task counts as stranded when it never ran,
        is older than STRANDED_AFTER and its queue has no message left in the stream
        (so none stands for it): queues with messages are looked at once they drain."""
        dispatcher = dispatcher or await self._lanes()
        now = time.time()
        found: dict[str, list[Entry]] = {}
        async for entry in self._state.scan("t.*", headers_only=True,
                                            since=now - SWEEP_LOOKBACK):
            if _never_dispatched(entry, now - STRANDED_AFTER):
                found.setdefault(entry.text(H_QUEUE), []).append(entry)
        finished = 0
        for queue, entries in found.items():
            if await self._messages_in(queue):
                continue
            for seen in entries:
                now_at = await self._state.get(seen.key)
                if now_at is not None and now_at.rev == seen.rev:
                    await self._finish_put(dispatcher, now_at, _task_id_of(now_at), None)
                    finished += 1
        return finished

    async def _messages_in(self, queue: str) -> int:
        info = await self._conn.api(
            f"$JS.API.STREAM.INFO.{self._stream}",
            {"subjects_filter": f"{self.prefix}.tasks.{_qtok(queue)}.*"},
        )
        return sum((info.get("state", {}).get("subjects") or {}).values())

    def unsettled(self) -> deque[_Unsettled]:
        # On the Backend, not the connection: a claim outlives a connection closed
        # under it, but not a fork (the parent hands its own back).
        lost: deque[_Unsettled] = self.backend.process_state("unsettled", deque)
        return lost

    async def _refind(self, lease: float, limit: int) -> list[Delivery]:
        """Claims of ours whose reply never came: deliver those the server took (they
        must not sit out their lease and come back with an attempt that never ran), hand
        the others' messages back at once. Costs a read only after such a failure."""
        unsettled = self.unsettled()
        found: list[Delivery] = []
        while unsettled and len(found) < limit:
            lost = unsettled.popleft()  # taken: concurrent claims share the list
            try:
                delivery = await self._refound(lost, lease)
            except BaseException:
                # Still maybe ours, and those found so far are: all asked again next time.
                unsettled.append(lost)
                self.held_again(found)
                raise
            if delivery is not None:
                found.append(delivery)
        return found

    async def _refound(self, lost: _Unsettled, lease: float) -> Delivery | None:
        entry = await self._state.get(lost.key)
        if entry is not None and _state(entry) == RUNNING and entry.text(H_CLAIM) == lost.token:
            r = Receipt(lost.reply, lost.key, entry.rev, entry.data, _attempts(entry),
                        lost.token, _pick_meta(entry.headers))
            # Renewed: the lease has been running while we did not know we held it.
            if await self.fenced(r, self._running(r, lease)):
                await self._set_lease(r, lease, -math.inf)  # its NAK now
                return self._delivery(r)
        await self._conn.publish(lost.reply, b"-NAK")
        return None

    async def _claim_pulled(
        self, dispatcher: _Dispatcher, lanes: Sequence[_Lane], lease: float, limit: int
    ) -> list[Delivery]:
        # A message that cannot be claimed now (held by a live lease, not due, already
        # settled) is parked server-side and the next one is tried: one task redelivered
        # over and over never blocks its lane.
        while True:
            items = await dispatcher.take(lanes, limit)
            if not items:
                return []
            got = await self._claim_items(items, lease)
            if got:
                return got

    async def _claim_items(
        self, items: Sequence[tuple[_Lane, Msg, float]], lease: float
    ) -> list[Delivery]:
        now = time.time()
        live: list[_Claim] = []
        for lane, msg, arrived in items:
            r = await self._receipt(lane, msg, now)
            if r is not None:
                live.append(_Claim(r, int((msg.headers or {}).get(H_REV) or 0), arrived))
        await self._claim_fresh([c for c in live if c.rev0], now + lease)
        # Redeliveries, and first deliveries whose key moved on (a copy of the message):
        # read, then claim.
        errors = await self._claim_each([c for c in live if not c.won], lease)
        out = []
        for c in live:  # in the order they were taken
            if c.won:
                await self._set_lease(c.receipt, lease, c.arrived)
                out.append(self._delivery(c.receipt))
        if not out and errors:
            raise errors[0]
        return out

    async def _receipt(self, lane: _Lane, msg: Msg, now: float) -> Receipt | None:
        """What a claim of this message needs; None for one parked or dropped at once."""
        headers = msg.headers or {}
        eta = float(headers.get(H_ETA) or 0)
        if eta > now + ETA_SLACK:
            # Fetched early: park it server-side until its ETA; no attempt is counted.
            self._conn.publish_soon(msg.reply, _nak_payload(eta - now))
            return None
        meta = _message_meta(lane, msg)
        if meta is None:
            # No id anywhere: not written by omniq, so no task state waits for it.
            log.error("dropping a message on %s that is not an omniq task", msg.subject)
            self._conn.publish_soon(msg.reply, b"+TERM")
            return None
        # A client-chosen claim token: if the reply of the claim is lost, the next
        # claim finds it by it (see _refind).
        return Receipt(msg.reply, task_key(meta[H_ID]), 0, msg.data, 0, uuid.uuid4().hex, meta)

    def _lost(self, r: Receipt) -> None:
        self.unsettled().append(_Unsettled(r.reply, r.key, r.token))

    async def _claim_fresh(self, fresh: Sequence[_Claim], until: float) -> None:
        """First deliveries: each key is still at the revision its enqueuer wrote. One
        compare-and-set write each, all sent together."""
        if not fresh:
            return
        try:
            sent = []
            for c in fresh:
                r = c.receipt
                state = _state_headers(r.meta, RUNNING, 1, lease=until, claim=r.token)
                sent.append(await self._state.send_put(r.key, r.data, state, last=c.rev0))
            for c, reply in zip(fresh, await self._conn.replies(sent), strict=True):
                rev = Bucket.rev_of(reply)
                if rev is not None:
                    c.receipt.rev, c.receipt.attempts, c.won = rev, 1, True
        except BaseException:
            for c in fresh:  # whichever the server took, the next claim re-finds
                self._lost(c.receipt)
            raise

    async def _claim_each(self, claims: Sequence[_Claim], lease: float) -> list[BaseException]:
        """Claim these one by one, concurrently; a claim that failed on the way is left
        to _refind, and its error returned."""
        outcomes = await asyncio.gather(
            *(self._claim_again(c.receipt, lease) for c in claims), return_exceptions=True
        )
        errors = []
        for c, outcome in zip(claims, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                self._lost(c.receipt)
                errors.append(outcome)
            c.won = outcome is True
        return errors

    async def _claim_again(self, r: Receipt, lease: float) -> bool:
        """Redelivery (lease expired, retry due, released): read the state, then claim."""
        for _ in range(3):
            entry = await self._state.get(r.key)
            if entry is None or _state(entry) not in (WAITING, RUNNING):
                self._conn.publish_soon(r.reply, b"+ACK")  # cancelled, purged or done
                return False
            now = time.time()
            busy = entry.number(H_LEASE if _state(entry) == RUNNING else H_READY) - now
            if busy > ETA_SLACK:
                # Held by a live lease or not due yet: re-park the message until then.
                self._conn.publish_soon(r.reply, _nak_payload(busy))
                return False
            # The stored entry is the truth (an operator may have rewritten it).
            r.meta = {**r.meta, **_pick_meta(entry.headers)}
            r.data = entry.data
            state = self._running(r, lease, _attempts(entry) + 1)
            rev = await self._state.put(r.key, entry.data, state, last=entry.rev)
            if rev is not None:
                r.rev, r.attempts = rev, _attempts(entry) + 1
                return True
        return False

    def _delivery(self, r: Receipt) -> Delivery:
        task, problem = decode_task_or_placeholder(
            r.data, r.meta[H_ID], r.meta.get(H_QUEUE) or "default"
        )
        # (The worker records it failed and logs that one line.)
        return Delivery(task=task, attempt=r.attempts, receipt=r, problem=problem)

    def _running(self, r: Receipt, lease: float, attempts: int | None = None) -> dict[str, str]:
        attempts = r.attempts if attempts is None else attempts
        until = time.time() + lease
        return _state_headers(r.meta, RUNNING, attempts, lease=until, claim=r.token)

    async def _set_lease(self, r: Receipt, lease: float, arrived: float) -> None:
        """Make the server redeliver the message once the lease has run out, not when its
        AckWait does. A short lease: one delayed NAK now. A long one: the NAK only if the
        task still runs shortly before AckWait would bring its message back, so a task
        that ends sooner (most do) costs no message for it."""
        loop = asyncio.get_running_loop()
        if lease < ACK_WAIT - 1.0:
            self._conn.publish_soon(r.reply, _nak_payload(lease))
        elif lease > ACK_WAIT + 1.0:
            r.until = time.time() + lease
            at = max(0.0, arrived + ACK_WAIT - LEASE_MARGIN - loop.time())
            r.hold = loop.call_later(at, self._hold, r)

    def _hold(self, r: Receipt) -> None:
        r.hold = None
        self._conn.publish_soon(r.reply, _nak_payload(r.until - time.time()))

    def held_again(self, deliveries: Sequence[Delivery]) -> None:
        """Claims that stand but whose caller will never see them (the rest of a fused
        claim failed): the next claim re-finds them."""
        for d in deliveries:
            self._lost(receipt_of(d))

    # --- settle ------------------------------------------------------------------

    async def fenced(self, r: Receipt, headers: dict[str, str]) -> bool:
        """Write the lease holder's next state while it still holds the lease (a
        compare-and-set on the claim's revision). When that fails, an entry carrying
        our claim token can only be a write of ours whose reply was lost: adopt it."""
        for _ in range(3):
            rev = await self._state.put(r.key, r.data, headers, last=r.rev)
            if rev is not None:
                r.rev = rev
                return True
            entry = await self._state.get(r.key)
            if entry is None or entry.text(H_CLAIM) != r.token:
                return False  # the lease was lost: whoever holds the task now settles it
            r.rev = entry.rev
            if _state(entry) == headers[H_STATE] != RUNNING:
                return True  # this very write landed before
        return False

    async def send_done(self, r: Receipt) -> _Tagged:
        """The first try of a finished task's fenced purge, sent now (see finish_done)."""
        sent_before, r.acked = r.acked, True
        future = await self._state.send_purge_at(r.key, r.rev)
        return _Tagged(future, sent_before)

    async def finish_done(self, r: Receipt, first: _Tagged | None = None) -> bool:
        """Remove a finished task's state while this lease holds it: one fenced purge
        (`first`, when the caller sent it already together with other writes)."""
        for _ in range(3):
            tagged = first if first is not None else await self.send_done(r)
            first = None
            (reply,) = await self._conn.replies([tagged.future])
            if Bucket.purged_of(reply):
                return True
            entry = await self._state.get(r.key)
            if entry is None:
                # Our earlier purge whose reply was lost (if we sent one); else another
                # holder finished it after our lease ran out.
                return tagged.sent_before
            if entry.text(H_CLAIM) != r.token:
                return False
            r.rev = entry.rev  # an extend of ours landed unseen: still ours
        return False

    async def settle(self, r: Receipt, failed: bool, first: _Tagged | None = None) -> bool:
        """`ack`: the state first, then the message; if we die in between, the redelivery
        finds no state (or a dead letter) and is dropped."""
        r.unhold()
        if failed:
            done = await self._dead_letter(r)
        else:
            done = await self.finish_done(r, first)
        if not done:
            return False
        await self._settle_unique(r.meta)
        self._conn.publish_soon(r.reply, b"+ACK")
        return True

    async def _dead_letter(self, r: Receipt) -> bool:
        """The state becomes a dead letter, fenced; its failure record goes out in the
        same write to the socket. A record whose state write lost (the lease had run
        out) is deleted again; sent again after a lost reply, it is stored once."""
        task_id = r.meta.get(H_ID) or r.key[2:]
        record = await self._index.send(task_id, r.meta.get(H_QUEUE) or "default", r.token)
        headers = _state_headers(r.meta, FAILED, r.attempts, claim=r.token)
        try:
            done = await self.fenced(r, {**headers, H_INDEXED: "1"})
        except BaseException:
            self._conn.forget([record])
            raise
        (reply,) = await self._conn.replies([record])
        seq = self._index.seq_of(reply)  # raises when the stream refused it
        if not done:
            self._index.drop_soon([seq])
        return done

    @boundary
    async def ack(self, delivery: Delivery, *, failed: bool = False) -> bool:
        await self._ready()
        return await self.settle(receipt_of(delivery), failed)

    @boundary
    async def retry(self, delivery: Delivery, delay: float) -> bool:
        await self._ready()
        r = receipt_of(delivery)
        r.unhold()
        ready = time.time() + max(0.0, delay)
        headers = _state_headers(r.meta, WAITING, r.attempts, ready=ready, claim=r.token)
        if not await self.fenced(r, headers):
            return False  # the lease was lost: whoever holds the task now settles it
        await self._conn.publish(r.reply, _nak_payload(delay))
        return True

    @boundary
    async def release(self, delivery: Delivery, delay: float = 0.0) -> None:
        dispatcher = await self._lanes()
        r = receipt_of(delivery)
        r.unhold()
        ready = time.time() + delay if delay > 0 else 0.0  # (stats count it scheduled)
        headers = _state_headers(r.meta, WAITING, max(0, r.attempts - 1), ready=ready,
                                 claim=r.token)
        if not await self.fenced(r, headers):
            return
        if delay > 0:
            # Parked server-side until then: no one to wake now.
            self._conn.publish_soon(r.reply, _nak_payload(delay))
            return
        await self._conn.publish(r.reply, b"-NAK")
        queue, priority = r.meta.get(H_QUEUE) or "default", int(r.meta.get(H_PRIORITY) or 0)
        await self._conn.publish(dispatcher.wake_subject(queue), b"%d" % priority)
        dispatcher.note(queue, priority)

    @boundary
    async def extend(self, delivery: Delivery, lease: float) -> bool:
        await self._ready()
        r = receipt_of(delivery)
        r.unhold()
        if not await self.fenced(r, self._running(r, lease)):
            return False  # another delivery claimed it, or it was settled
        if abs(lease - ACK_WAIT) <= 1.0:
            self._conn.publish_soon(r.reply, b"+WPI")
        else:
            self._conn.publish_soon(r.reply, _nak_payload(lease))
        return True

    # --- inspection and maintenance ---------------------------------------------

    @boundary
    async def cancel(self, task_id: str) -> bool:
        await self._ready()
        key = task_key(task_id)
        entry = await self._state.get(key)
        if entry is None or _state(entry) != WAITING:
            return False
        # The message stays in the stream; the worker that fetches it finds no state and drops it.
        rev = await self._state.put(key, b"", _own_headers(entry, CANCELLED), last=entry.rev)
        if rev is None:
            return False  # claimed meanwhile
        await self._state.purge_at(key, rev)
        await self._free_unique(entry.text(H_UNIQUE), task_id)
        return True

    @boundary
    async def get_task(self, task_id: str) -> Task | None:
        await self._ready()
        entry = await self._state.get(task_key(task_id))
        if entry is None or _state(entry) not in (WAITING, RUNNING, FAILED):
            return None
        task, _ = decode_task_or_placeholder(entry.data, task_id, entry.text(H_QUEUE) or "default")
        return task

    @boundary
    async def stats(self) -> list[QueueStats]:
        await self._ready()
        now = time.time()
        counts: dict[str, Counter[str]] = {}
        oldest: dict[str, float] = {}
        dead: list[Entry] = []
        async for entry in self._state.scan("t.*", headers_only=True):
            found = _stat_of(entry, now)
            if found is None:
                continue
            kind, since = found
            queue = entry.text(H_QUEUE)
            counts.setdefault(queue, Counter())[kind] += 1
            if kind == "queued" and since:
                oldest[queue] = min(oldest.get(queue, since), since)
            elif kind == "failed":
                dead.append(entry)
        await self._index_older(unindexed(dead))
        return [
            QueueStats(queue=name, queued=c["queued"], scheduled=c["scheduled"],
                       running=c["running"], failed=c["failed"],
                       oldest_ready_at=from_timestamp(oldest.get(name)))
            for name, c in sorted(counts.items())
        ]

    async def _index_older(self, dead: list[Entry]) -> None:
        """Records for dead letters that an older omniq still running beside wrote
        (stamped now). Best effort: stats are read by those who may not write."""
        try:
            await self._index.backfill(self._state, dead, keep_time=False)
        except Exception as exc:
            log.warning("NATS: could not index %d dead letters of an older omniq: %s",
                        len(dead), describe(exc))

    @boundary
    async def purge(self, queue: str | None = None) -> int:
        await self._ready()
        floor = (await self._conn.js.stream_info(self._stream)).state.last_seq
        entries = [
            e async for e in self._state.scan("t.*", headers_only=True)
            if queue is None or e.text(H_QUEUE) == queue
        ]
        outcomes = await in_chunks(entries, self._drop)
        if floor and all(o is not None for o in outcomes):
            # Nothing of these queues is running: drop their messages too, instead of
            # leaving them for workers to skip. Newer messages (above floor) stay.
            subject = f"{self.prefix}.tasks.{_qtok(queue)}.*" if queue else f"{self.prefix}.tasks.>"
            await purge(self._conn, self._stream, subject, below=floor + 1)
        return sum(1 for o in outcomes if o)

    async def _drop(self, entry: Entry) -> bool | None:
        """Drop one waiting/dead task: True if counted, False if silently, None if running."""
        state = _state(entry)
        if state == RUNNING:
            return None
        rev: int | None = entry.rev
        if state == WAITING:
            rev = await self._state.put(
                entry.key, b"", _own_headers(entry, CANCELLED), last=entry.rev
            )
            if rev is None:
                return None  # claimed meanwhile
        if not await self._state.purge_at(entry.key, rev or entry.rev):
            return None if state == FAILED else False  # queued again meanwhile
        if state == FAILED:
            await self._index.drop([_task_id_of(entry)])
        await self._free_unique(entry.text(H_UNIQUE), _task_id_of(entry))
        return state in (WAITING, FAILED)

    # --- dead letters ----------------------------------------------------------------

    @boundary
    async def failed(
        self,
        queue: str | None = None,
        since: datetime | None = None,
        before: datetime | None = None,
        limit: int = 100,
    ) -> list[FailedTask]:
        await self._ready()
        if limit <= 0:
            return []
        found: list[tuple[Record, Task]] = []
        seen: set[str] = set()
        walk = self._index.walk(queue, None if since is None else us_of(since),
                                None if before is None else us_of(before), limit + 1)
        async with contextlib.aclosing(walk) as windows:
            async for records in windows:
                if await self._add_current(found, records, seen, limit):
                    break
        end = min(limit, len(found))
        while 0 < end < len(found) and found[end][0].at == found[end - 1][0].at:
            end += 1
        return [FailedTask(task, at_us(record.at)) for record, task in found[:end]]

    async def _add_current(
        self, found: list[tuple[Record, Task]], records: Sequence[Record], seen: set[str],
        limit: int,
    ) -> bool:
        """Add the current ones of these records (newest first), reading no more states
        than the page needs; whether the page is full, and does not end inside a group
        of one failure time."""
        i = 0
        while i < len(records):
            need = max(8, limit + 1 - len(found))  # (8: a few stale ones, or a tie)
            found += await self._current(records[i : i + need], seen)
            i += need
            found.sort(key=lambda f: (f[0].at, f[0].seq), reverse=True)
            if len(found) > limit and found[limit][0].at != found[limit - 1][0].at:
                return True
        return False

    async def _current(
        self, records: Sequence[Record], seen: set[str]
    ) -> list[tuple[Record, Task]]:
        """The records whose task is still that dead letter, with the task (the states
        read in one round trip); the other records are stale, and go once old enough."""
        fresh = [r for r in records if r.task_id not in seen]
        keys = [task_key(r.task_id) for r in fresh]
        replies = await self._conn.replies([await self._state.send_get(k) for k in keys])
        out: list[tuple[Record, Task]] = []
        gone: list[int] = [r.seq for r in records if r.task_id in seen and stale(r)]
        for record, key, reply in zip(fresh, keys, replies, strict=True):
            entry = self._state.entry_of(key, reply)
            if entry is None or not record.current(entry) or record.task_id in seen:
                if stale(record):
                    gone.append(record.seq)
                continue
            seen.add(record.task_id)
            queue = entry.text(H_QUEUE) or record.queue or "default"
            task, _ = decode_task_or_placeholder(entry.data, record.task_id, queue)
            out.append((record, task))
        self._index.drop_soon(gone)
        return out

    @boundary
    async def forget(self, task_ids: Sequence[str]) -> int:
        await self._ready()
        ids = list(dict.fromkeys(task_ids))
        gone = 0
        for i in range(0, len(ids), FORGET_BATCH):
            gone += await self._forget(ids[i : i + FORGET_BATCH])
        return gone

    async def _forget(self, ids: Sequence[str]) -> int:
        """Read the states together, purge the dead letters among them together (each
        fenced by its revision), then their records and unique keys."""
        keys = [task_key(t) for t in ids]
        replies = await self._conn.replies([await self._state.send_get(k) for k in keys])
        dead = [e for k, reply in zip(keys, replies, strict=True)
                if (e := self._state.entry_of(k, reply)) is not None and _state(e) == FAILED]
        if not dead:
            return 0
        sent = [await self._state.send_purge_at(e.key, e.rev) for e in dead]
        purged = await self._conn.replies(sent)
        gone = [e for e, reply in zip(dead, purged, strict=True) if Bucket.purged_of(reply)]
        await asyncio.gather(
            self._index.drop([_task_id_of(e) for e in gone]),
            *(self._free_unique(e.text(H_UNIQUE), _task_id_of(e)) for e in gone),
        )
        return len(gone)

    # --- named records --------------------------------------------------------------

    @boundary
    async def put_record(self, kind: str, name: str, data: bytes) -> None:
        await self._ready()
        await self._records.put(kind, name, data)

    @boundary
    async def get_record(self, kind: str, name: str) -> bytes | None:
        await self._ready()
        return await self._records.get(kind, name)

    @boundary
    async def list_records(self, kind: str) -> list[tuple[str, bytes]]:
        await self._ready()
        return await self._records.of_kind(kind)

    @boundary
    async def delete_record(self, kind: str, name: str) -> bool:
        await self._ready()
        return await self._records.delete(kind, name)

    # --- workers -------------------------------------------------------------------

    @boundary
    async def register_worker(self, info: WorkerInfo, ttl: float) -> None:
        await self._ready()
        until = {H_UNTIL: repr(time.time() + ttl)}
        await self._state.put(_worker_key(info.worker_id), encode_worker(info), until)

    @boundary
    async def unregister_worker(self, worker_id: str) -> None:
        await self._ready()
        await self._state.purge(_worker_key(worker_id))

    @boundary
    async def workers(self) -> list[WorkerInfo]:
        await self._ready()
        now = time.time()
        live: list[WorkerInfo] = []
        dead: list[str] = []
        async for entry in self._state.scan("w.*", headers_only=False):
            if entry.number(H_UNTIL) > now:
                live.append(decode_worker(entry.data))
            else:
                dead.append(entry.key)
        await in_chunks(dead, self._state.purge)
        return sorted(live, key=lambda w: w.worker_id)


@dataclass
class _Tagged:
    """A fenced purge in flight, and whether one had been sent for this claim before."""

    future: asyncio.Future[Msg]
    sent_before: bool
