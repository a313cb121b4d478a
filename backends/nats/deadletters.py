"""The NATS queue's dead letters by failure time: one failure record per dead letter in
the stream ``P_failed``, read newest first.

KV has no range query, so the index is a stream of its own: a record on
``P.failed.<queue>.<task id>`` (no payload; headers: the task's id, queue and the claim
token of the lease holder that failed it) is published with the compare-and-set write
that makes the task's state a dead letter, in the same write to the socket (no round
trip more). Its failure time is when the server stored the record: stream timestamps
grow with the sequence, so newest first is highest sequence first, and the failure time
is the server's (workers' clocks may disagree). `failed()` walks back from the newest
record through windows of sequences, each read by an ephemeral consumer that starts
there: its creation tells how many records of the filter lie from there to the end, so
exactly the window's records are pulled. `before` is found by a consumer that starts at
that time (the server finds the sequence). Then the tasks' states are read, all in one
round trip: a record counts only while its task is still that dead letter (state failed,
same claim token), so stale records cost nothing but a read.

A retry's enqueue removes the records of the task (a purge of its subject) before the
task can run again; `forget` and `purge` remove them after the state. A record left
behind (a crash in between, a lease lost while failing the task) is dropped by the first
`failed()` that reads it after STALE seconds.

Measured on nats-server 2.9.10 (local), 100k tasks of which 1k failed (two queues), one
`failed(limit=100)`: 105 requests in 4 round trips, 6-10 ms: a direct get of the newest
record (1), a consumer made 127 sequences below it (101 records wanted, a quarter more)
(1), one pull of those (1), its deletion (1, not awaited), then 101 states sent together. One
queue's page: 107 requests, 5 round trips (the first consumer's window held half as many
of that queue: it is placed again, lower, by the density seen, before any pull); the
same with 50 holes among the newest records. A page deep down (`before`): 106 requests,
4 round trips (a consumer that starts at that time tells its sequence). What grows with
the number of dead letters is none of these; with the number of tasks, nothing. The
alternatives: reading every record (what a KV key space scan would do) reads all 1k to
list 100 (6 requests, 13 ms before the states are read); a scan of the task states reads
100k headers (393 pulls, 1.7-4.8 s).

Dead letters of an older omniq (no records) get theirs when a queue first opens the
store (`migrate`): published oldest first, each with its true failure time (the state
entry's timestamp) in a header, below every later record; the marker key ``m.failed``
says how far that block goes, so a walk from an earlier `before` starts above it. That
costs one scan of the task states once per store, and a read of the marker per
connection. A dead letter that an older worker still running writes later gets a record
when `stats()` meets it (stamped then).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from .connection import (
    Bucket,
    Connection,
    Entry,
    Reader,
    ack_of,
    ensure_stream,
    status_of,
    stored_ns,
    tok,
)
from .headers import FAILED, H_CLAIM, H_FAILED_AT, H_ID, H_INDEXED, H_QUEUE, H_STATE

STALE = 60.0  # seconds: a record younger than this may be one whose state write is in flight
DEDUPE_WINDOW = 300.0  # a record sent again (a lost reply) within this is stored once
MARKER = "m.failed"  # in the queue's bucket: the records of an older omniq's dead letters


@dataclass(frozen=True)
class Record:
    """One failure record: which dead letter, failed when (us since the epoch)."""

    seq: int
    task_id: str
    queue: str
    claim: str
    at: int

    def current(self, entry: Entry | None) -> bool:
        """Whether the task is still the dead letter this record was written for."""
        return (entry is not None and entry.text(H_STATE) == FAILED
                and entry.text(H_CLAIM) == self.claim)


class FailureIndex:
    """The failure records of one queue prefix."""

    def __init__(self, conn: Connection, prefix: str, qtok: Callable[[str], str]) -> None:
        self._conn = conn
        self.stream = f"{prefix}_failed"
        self._base = f"{prefix}.failed"
        self._qtok = qtok
        self.block = 0  # last sequence of the records moved from an older omniq's store

    def subject(self, queue: str | None, task_id: str | None = None) -> str:
        q = "*" if queue is None else self._qtok(queue)
        return f"{self._base}.{q}.{'*' if task_id is None else tok(task_id)}"

    async def setup(self) -> None:
        await ensure_stream(self._conn.js, api.StreamConfig(
            name=self.stream,
            subjects=[f"{self._base}.>"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            allow_direct=True,
            duplicate_window=DEDUPE_WINDOW,
        ))

    # --- writes ---------------------------------------------------------------------------

    async def send(self, task_id: str, queue: str, claim: str) -> asyncio.Future[Msg]:
        """Publish the record of a dead letter about to be written (its reply: `seq_of`).
        Its message id is the claim token: sent again, it is stored once."""
        headers = {H_ID: task_id, H_QUEUE: queue, H_CLAIM: claim, "Nats-Msg-Id": f"f:{claim}"}
        return await self._conn.send(self.subject(queue, task_id), b"", headers)

    @staticmethod
    def seq_of(reply: Msg) -> int:
        return int(ack_of(reply)["seq"])

    def drop_soon(self, seqs: Sequence[int]) -> None:
        """Delete these records with the next request (no answer awaited)."""
        for seq in seqs:
            payload = json.dumps({"seq": seq, "no_erase": True}).encode()
            self._conn.publish_soon(f"$JS.API.STREAM.MSG.DELETE.{self.stream}", payload)

    async def send_drop(self, task_id: str) -> asyncio.Future[Msg]:
        """Remove every record of a task (whatever queue it was in)."""
        request = json.dumps({"filter": self.subject(None, task_id)}).encode()
        return await self._conn.send(f"$JS.API.STREAM.PURGE.{self.stream}", request)

    async def drop(self, task_ids: Sequence[str]) -> None:
        if task_ids:
            replies = await self._conn.replies([await self.send_drop(t) for t in task_ids])
            for reply in replies:
                Bucket.purged_of(reply)  # raises the stream's error, if any

    # --- the walk, newest first -------------------------------------------------------------

    async def walk(
        self, queue: str | None, since: int | None, before: int | None, want: int
    ) -> AsyncGenerator[list[Record], None]:
        """Records of `queue` (or all) with `since` <= failure time < `before`, newest
        first, in windows of sequences holding about `want` records (then twice that)."""
        subject = self.subject(queue)
        top = await self._top(subject, before)
        if top is None:
            return
        upper, above = top
        density = 1.0  # records of the subject per sequence, as the last window showed
        while upper >= 1:
            reader, start, density = await self._reader(subject, upper, above, want, density)
            try:
                found = await self._window(reader, upper, above)
            finally:
                await reader.close()
            records = [r for r in reversed(found) if before is None or r.at < before]
            kept = [r for r in records if since is None or r.at >= since]
            if kept:
                yield kept
            if len(kept) < len(records) or reader.start > start or start == 1:
                return  # older than `since` (so is everything below), or the first record
            upper, above, want = reader.start - 1, reader.pending, want * 2

    async def _reader(
        self, subject: str, upper: int, above: int, want: int, density: float
    ) -> tuple[Reader, int, float]:
        """A consumer whose window, from its start up to `upper`, holds about `want`
        records; placed once more, lower, before anything is pulled if it holds too few
        (records deleted there, or another queue's)."""
        reader, start, density = await self._place(subject, upper, above, want, density)
        if reader.pending - above < want and reader.start == start > 1:
            await reader.close()
            reader, start, density = await self._place(subject, upper, above, want, density)
        return reader, start, density

    async def _place(
        self, subject: str, upper: int, above: int, want: int, density: float
    ) -> tuple[Reader, int, float]:
        """A consumer `want` records below `upper` by `density` (records per sequence,
        a quarter more for slack); its start, and the density its window shows."""
        span = min(upper, math.ceil(want * 1.25 / density))
        start = upper - span + 1
        reader = await Reader.open(self._conn, self.stream, subject, seq=start)
        held = max(0, reader.pending - above)
        return reader, start, max(held / span, density / 16)  # none seen: 16 times as wide

    async def _top(self, subject: str, before: int | None) -> tuple[int, int] | None:
        """The highest sequence to read and how many records of `subject` lie above it."""
        if before is None:
            last = await self._last(subject)
            return None if last is None else (last, 0)
        upper, above = await self._position(subject, at=before)
        if upper < self.block:
            # Moved records carry older times than their place: start above them all.
            upper, above = await self._position(subject, seq=self.block + 1)
        return upper, above

    async def _last(self, subject: str) -> int | None:
        """The sequence of the newest record of `subject` (one direct get)."""
        try:
            msg = await self._conn.request(f"$JS.API.DIRECT.GET.{self.stream}",
                                           json.dumps({"last_by_subj": subject}).encode())
        except nats.errors.NoRespondersError:
            raise nats.js.errors.NoStreamResponseError from None  # deleted: made again
        status = status_of(msg)
        if status == "404":
            return None
        if status:
            nats.js.errors.APIError.from_msg(msg)
        return int((msg.headers or {})["Nats-Sequence"])

    async def _position(self, subject: str, *, at: int = 0, seq: int = 0) -> tuple[int, int]:
        reader = await Reader.open(self._conn, self.stream, subject, at=at, seq=seq)
        await reader.close()
        return reader.start - 1, reader.pending

    async def _window(self, reader: Reader, upper: int, above: int) -> list[Record]:
        """The records from the reader's start up to `upper`, oldest first. Records are
        added and removed meanwhile, so the count is where to begin, not where to end."""
        out: list[Record] = []
        if reader.start > upper:
            return out
        size = max(1, reader.pending - above)
        while not reader.ended:
            msgs = await reader.pull(size)
            out += [_record(m) for m in msgs if m.metadata.sequence.stream <= upper]
            if not msgs or msgs[-1].metadata.sequence.stream >= upper:
                break
            size = 16
        return out

    # --- records for an older omniq's dead letters ------------------------------------------

    async def migrate(self, state: Bucket) -> None:
        """Give the dead letters of an older omniq their records (their true failure
        times), once per store; the marker says it is done and where the block ends."""
        marker = await state.get(MARKER)
        if marker is not None:
            self.block = int(json.loads(marker.data).get("block", 0))
            return
        old = [e async for e in state.scan("t.*", headers_only=True) if _unindexed(e)]
        old.sort(key=lambda e: e.stored)
        await self.backfill(state, old, keep_time=True)
        info = await self._conn.js.stream_info(self.stream)
        self.block = int(info.state.last_seq) if old else 0
        await state.put(MARKER, json.dumps({"block": self.block}).encode(), {})

    async def backfill(self, state: Bucket, entries: Sequence[Entry], *, keep_time: bool) -> None:
        """Records for these dead letters (in this order), then the mark on their states."""
        for i in range(0, len(entries), 256):
            chunk = entries[i : i + 256]
            sent = [await self._send_moved(e, keep_time) for e in chunk]
            for reply in await self._conn.replies(sent):
                ack_of(reply)
            full = await self._conn.replies([await state.send_get(e.key) for e in chunk])
            marks = []
            for e, reply in zip(chunk, full, strict=True):
                now = state.entry_of(e.key, reply)
                if now is not None and _unindexed(now):
                    own = {k: v for k, v in now.headers.items() if k.startswith("Omniq-")}
                    headers = {**own, H_INDEXED: "1"}
                    marks.append(await state.send_put(now.key, now.data, headers, last=now.rev))
            await self._conn.replies(marks)  # a lost race: its record is stale, and harmless

    async def _send_moved(self, entry: Entry, keep_time: bool) -> asyncio.Future[Msg]:
        # (Entries of an older omniq may lack the id header: their key is the id then.)
        task_id, queue = entry.text(H_ID) or entry.key[2:], entry.text(H_QUEUE) or "default"
        headers = {H_ID: task_id, H_QUEUE: queue, H_CLAIM: entry.text(H_CLAIM),
                   "Nats-Msg-Id": f"m:{task_id}:{entry.rev}"}
        if keep_time:
            headers[H_FAILED_AT] = str(round(entry.stored * 1e6))
        return await self._conn.send(self.subject(queue, task_id), b"", headers)


def _unindexed(entry: Entry) -> bool:
    return entry.text(H_STATE) == FAILED and not entry.text(H_INDEXED)


def unindexed(entries: Sequence[Entry]) -> list[Entry]:
    """The dead letters among these that have no failure record (an older omniq's)."""
    return [e for e in entries if _unindexed(e)]


def _record(msg: Msg) -> Record:
    headers = msg.headers or {}
    moved = headers.get(H_FAILED_AT)
    return Record(
        seq=msg.metadata.sequence.stream,
        task_id=headers.get(H_ID, ""),
        queue=headers.get(H_QUEUE, ""),
        claim=headers.get(H_CLAIM, ""),
        at=int(moved) if moved else stored_ns(msg) // 1000,
    )


def stale(record: Record) -> bool:
    return time.time() * 1e6 - record.at > STALE * 1e6
