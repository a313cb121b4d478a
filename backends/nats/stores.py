"""NATS results (a KV bucket, waits pushed by the key's subject) and events (a stream,
one subject per task; the cursor is the stream sequence)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Sequence
from datetime import datetime

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from omniq.errors import BackendError
from omniq.models import TaskEvent, TaskResult
from omniq.serialization import decode_event, decode_result, encode_event, encode_result
from omniq.storage import NumberedCursors

from .backend import Store
from .connection import (
    Bucket,
    Entry,
    ack_of,
    boundary,
    ensure_bucket,
    ensure_stream,
    in_chunks,
    purge,
    scan,
    status_of,
    tok,
    widen_dedupe_window,
    within,
)

H_EXPIRES = "Omniq-Expires"
H_FINISHED = "Omniq-Finished"
H_TS = "Omniq-Ts"
# How long the events stream remembers event ids (Nats-Msg-Id) to drop a copy sent again.
# A write whose reply was lost is sent again within seconds (the worker's retries back off
# to 10 s), or once the server is reachable again; after this window a second copy would
# be stored. The server keeps the ids of the window in memory (~100 bytes each), so 5
# minutes at 1,000 events/s is ~30 MB: longer is not free.
EVENT_DEDUPE_WINDOW = 300.0


# --- results --------------------------------------------------------------------


def _expired(entry: Entry) -> bool:
    """Whether a stored result has expired, from its header (no decoding)."""
    return bool(entry.text(H_EXPIRES)) and entry.number(H_EXPIRES) <= time.time()


def _result_of(data: bytes) -> TaskResult | None:
    result = decode_result(data)
    return None if result.is_expired() else result


class NATSResultStorage(Store):
    """Results in a KV bucket; `wait` is pushed by a subscription on the key's subject."""

    ROLE = "results"

    def _name_things(self) -> None:
        self._bucket = Bucket(self._conn, f"{self.prefix}_results")

    async def _setup(self) -> None:
        await ensure_bucket(self._conn.js, self._bucket.name)

    @boundary
    async def store(self, result: TaskResult) -> bool:
        await self._ready()
        return await self.put(result)

    async def put(self, result: TaskResult) -> bool:
        """Store unless a result is stored (the first final outcome wins)."""
        headers = {H_FINISHED: repr(result.finished_at.timestamp())}
        if result.expires_at is not None:
            headers[H_EXPIRES] = repr(result.expires_at.timestamp())
        key, data = tok(result.task_id), encode_result(result)
        last = 0  # a KV create
        for _ in range(5):
            if await self._bucket.put(key, data, headers, last=last) is not None:
                return True
            entry = await self._bucket.get(key)
            if entry is None:
                last = 0  # deleted meanwhile
            elif entry.data == data:
                # This very result: our earlier write whose reply was lost (the bytes hold
                # the worker id and finish time to the microsecond, so no one else's).
                return True
            elif _expired(entry):
                last = entry.rev  # an expired result does not block a new one
            else:
                return False
        raise BackendError(f"the result of task {result.task_id} is contended; try again")

    async def read_many(self, task_ids: Sequence[str]) -> list[TaskResult | None]:
        """The results of several tasks: direct gets sent together, their replies awaited
        together (one round trip)."""
        sent = [await self._bucket.send_get(tok(t)) for t in task_ids]
        replies = await self._conn.replies(sent)
        out = []
        for task_id, reply in zip(task_ids, replies, strict=True):
            entry = self._bucket.entry_of(tok(task_id), reply)
            out.append(None if entry is None else _result_of(entry.data))
        return out

    @boundary
    async def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskResult]:
        await self._ready()
        ids = list(dict.fromkeys(task_ids))
        found = await self.read_many(ids)
        return {t: r for t, r in zip(ids, found, strict=True) if r is not None}

    @boundary
    async def get(self, task_id: str) -> TaskResult | None:
        await self._ready()
        return await self._get(task_id)

    async def _get(self, task_id: str) -> TaskResult | None:
        entry = await self._bucket.get(tok(task_id))
        return None if entry is None else _result_of(entry.data)

    @boundary
    async def wait(self, task_id: str, timeout: float | None) -> TaskResult | None:
        if timeout is not None and timeout <= 0:
            return await self.get(task_id)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            found, result = await self._wait_once(task_id, deadline)
            if found:
                return result

    async def _wait_once(
        self, task_id: str, deadline: float | None
    ) -> tuple[bool, TaskResult | None]:
        """One subscribe + one read, then the pushed write: (True, result) when done;
        (False, None) to go on (the connection came back: a write may have been missed,
        or the key changed without a result, e.g. a delete)."""
        link = await self._ready()
        nc = self._conn.nc
        loop = asyncio.get_running_loop()
        pushed: asyncio.Future[Msg | None] = loop.create_future()
        # A core subscription on the key's subject sees every write, like a KV watch,
        # without a consumer per waiter; subscribing before the read closes the race
        # with a store in between. One message at most (nats-py then drops the
        # subscription); a reconnect resolves it with None.
        sub = await nc.subscribe(self._bucket.subject(tok(task_id)), future=pushed, max_msgs=1)
        link.wakers.add(pushed)
        try:
            result = await self._get(task_id)
            if result is not None:
                return True, result
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return True, None
            if not await within(pushed, left):
                return True, None
            msg = pushed.result()
            if msg is not None and msg.data and not (msg.headers or {}).get("KV-Operation"):
                result = _result_of(msg.data)
                return result is not None, result
            return False, None
        finally:
            link.wakers.discard(pushed)
            if not pushed.done():
                pushed.cancel()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    @boundary
    async def delete(self, task_id: str) -> bool:
        await self._ready()
        return await self._bucket.purge(tok(task_id))

    @boundary
    async def cleanup(self, now: datetime, finished_before: datetime | None = None) -> int:
        await self._ready()
        cutoff = now.timestamp()
        oldest = -math.inf if finished_before is None else finished_before.timestamp()

        def doomed(e: Entry) -> bool:
            expired = bool(e.text(H_EXPIRES)) and e.number(H_EXPIRES) <= cutoff
            return expired or (bool(e.text(H_FINISHED)) and e.number(H_FINISHED) < oldest)

        keys = [e.key async for e in self._bucket.scan(">", headers_only=True) if doomed(e)]
        return sum(await in_chunks(keys, self._bucket.purge))


# --- events ---------------------------------------------------------------------


_CURSORS = NumberedCursors(16, "NATS")
_cursor = _CURSORS.format
_seq_of = _CURSORS.parse


class NATSEventStorage(Store):
    """Events in a stream, one subject per task; the cursor is the stream sequence."""

    ROLE = "events"

    def _name_things(self) -> None:
        self._stream = f"{self.prefix}_events"
        self._all = f"{self.prefix}.events.>"

    def _subject(self, task_id: str) -> str:
        return f"{self.prefix}.events.{tok(task_id)}"

    async def _setup(self) -> None:
        config = api.StreamConfig(
            name=self._stream,
            subjects=[self._all],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            allow_direct=True,
            duplicate_window=EVENT_DEDUPE_WINDOW,
        )
        await ensure_stream(self._conn.js, config)
        await widen_dedupe_window(self._conn.js, self._stream, EVENT_DEDUPE_WINDOW)

    async def send(self, events: Sequence[TaskEvent]) -> list[asyncio.Future[Msg]]:
        """Publish now, in order on the one connection; `acked` awaits the acks. The
        server drops a second message with the same Nats-Msg-Id (the event id) that
        arrives within the stream's duplicate window (EVENT_DEDUPE_WINDOW), answering it
        like the first: an event sent again is stored once."""
        sent = []
        for e in events:
            headers = {H_TS: repr(e.timestamp.timestamp()), "Nats-Msg-Id": e.id}
            sent.append(await self._conn.send(self._subject(e.task_id), encode_event(e), headers))
        return sent

    async def acked(self, sent: Sequence[asyncio.Future[Msg]]) -> None:
        for reply in await self._conn.replies(sent):
            ack_of(reply)

    async def write(self, events: Sequence[TaskEvent]) -> None:
        if events:
            await self.acked(await self.send(events))

    @boundary
    async def append(self, event: TaskEvent) -> None:
        await self._ready()
        await self.write([event])

    @boundary
    async def append_many(self, events: Sequence[TaskEvent]) -> None:
        await self._ready()
        await self.write(events)

    @boundary
    async def get(self, task_id: str) -> list[TaskEvent]:
        await self._ready()
        subject = self._subject(task_id)
        out: list[TaskEvent] = []
        seq = 1
        while True:
            msg = await self._conn.request(
                f"$JS.API.DIRECT.GET.{self._stream}",
                json.dumps({"seq": seq, "next_by_subj": subject}).encode(),
            )
            status = status_of(msg)
            if status == "404":
                return out
            if status:
                nats.js.errors.APIError.from_msg(msg)
            out.append(decode_event(msg.data))
            seq = int((msg.headers or {})["Nats-Sequence"]) + 1

    @boundary
    async def read(self, after: str | None, limit: int) -> list[tuple[str, TaskEvent]]:
        await self._ready()
        if limit <= 0:
            return []
        rows: list[tuple[str, TaskEvent]] = []
        async for msg in scan(
            self._conn, self._stream, self._all, start_seq=_seq_of(after) + 1, limit=limit
        ):
            rows.append((_cursor(msg.metadata.sequence.stream), decode_event(msg.data)))
        return rows

    @boundary
    async def latest(self, limit: int, before: str | None = None) -> list[tuple[str, TaskEvent]]:
        await self._ready()
        if limit <= 0:
            return []
        state = (await self._conn.js.stream_info(self._stream)).state
        first, upper = max(int(state.first_seq), 1), int(state.last_seq)
        if before is not None:
            upper = min(upper, _seq_of(before) - 1)
        rows: list[tuple[str, TaskEvent]] = []
        window = limit
        while len(rows) < limit and upper >= first:
            start = max(first, upper - window + 1)
            found = await self._between(start, upper)
            rows = found[len(rows) - limit :] + rows
            upper = start - 1
            window *= 2  # deleted sequences left gaps: widen rather than crawl back
        return rows

    async def _between(self, start: int, end: int) -> list[tuple[str, TaskEvent]]:
        """The events with stream sequence in [start, end], oldest first."""
        rows: list[tuple[str, TaskEvent]] = []
        async for msg in scan(
            self._conn, self._stream, self._all, start_seq=start, limit=end - start + 1
        ):
            seq = msg.metadata.sequence.stream
            if seq <= end:  # later ones were appended after we looked
                rows.append((_cursor(seq), decode_event(msg.data)))
        return rows

    async def _last_seq(self) -> int:
        return int((await self._conn.js.stream_info(self._stream)).state.last_seq)

    @boundary
    async def last_cursor(self) -> str | None:
        await self._ready()
        last = await self._last_seq()
        return _cursor(last) if last else None

    @boundary
    async def wait_new(self, after: str | None, timeout: float) -> None:
        await self._ready()
        # Subscribe first, then look: an append in between still wakes us.
        sub = await self._conn.nc.subscribe(self._all, max_msgs=1)
        try:
            if await self._last_seq() > _seq_of(after):
                return
            with contextlib.suppress(nats.errors.TimeoutError):
                await sub.next_msg(timeout=max(0.001, timeout))
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    @boundary
    async def cleanup(self, before: datetime) -> int:
        await self._ready()
        cutoff = before.timestamp()
        seqs: list[int] = []
        old: list[int] = []
        async for msg in scan(self._conn, self._stream, self._all, headers_only=True):
            seq = msg.metadata.sequence.stream
            seqs.append(seq)
            stamp = (msg.headers or {}).get(H_TS)
            ts = float(stamp) if stamp else msg.metadata.timestamp.timestamp()
            if ts < cutoff:
                old.append(seq)
        return await self._remove(seqs, old)

    async def _remove(self, seqs: list[int], old: list[int]) -> int:
        """Purge the old head of the stream in one call; delete stragglers one by one."""
        head = 0
        while head < len(old) and old[head] == seqs[head]:
            head += 1
        if head:
            await purge(self._conn, self._stream, None, below=old[head - 1] + 1)

        async def delete(seq: int) -> None:
            await self._conn.api(f"$JS.API.STREAM.MSG.DELETE.{self._stream}", {"seq": seq})

        await in_chunks(old[head:], delete)
        return len(old)
