"""The file queue's dead letters, filed by failure time and found by id::

    queue/failed/<queue>/<YYYYMMDD>/<HHMM>/<F>~<sid>   a dead letter (the task's file)
    queue/dead/<sid>        its hint: a symlink whose target is `<queue>/<F>`

F = the failure time in microseconds (strictly increasing per process, so one process's
dead letters never tie). Names sort by failure time within a minute folder, and folder
names sort likewise, so `failed()` reads newest first by listing the queue's day folders,
the newest day's minute folders, and only as many minute folders as it takes to fill
`limit`, then reads those `limit` files: never the whole failed/ tree. A minute folder
holds the failures of one minute, so a burst (1k tasks failing together) is one listing
of 1k names; failures spread out cost a listing per minute read. Measured on local ext4
with 100k tasks of which 1k failed (in two queues), a page of the 100 newest: 2.2 ms
(7 listings of 1,006 names, 100 reads) when the 1k failed within a minute, 2.7 ms (106
listings) when they failed over a day; ready/ and leased/ are never listed.

A hint is written (and made durable) before its dead letter appears, so every dead letter
has one: `forget`, `get_task` and a retry's enqueue find a dead letter by id with one
readlink instead of a scan. A hint whose dead letter is gone (retried, forgotten, a crash
between the two) is stale and harmless; whoever removes a dead letter removes its hint.
Hints are symlinks for their atomic create-with-content and their size: a target under
60 bytes lives in the inode (ext4, xfs), with no data block to write or free (freeing
one cost 0.5 ms per file on a disk mounted with `discard`, measured).

Dead letters filed by an OmniQ before this layout lie directly in failed/<queue>/ under
their ready name (`<P>~<T>~<sid>~<n>`); `file_legacy` moves them into the tree (their
failure time read from the file's ctime, which the rename into failed/ set) on open and
whenever a listing meets one. An older OmniQ does not see dead letters filed in the tree.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .common import rename_into, utc

LAST_BUCKET = "99999999/9999"


def bucket_of(failed_us: int) -> str:
    """The `YYYYMMDD/HHMM` folder of a failure time."""
    return f"{utc(failed_us):%Y%m%d/%H%M}"


def dead_rel(queue: str, failed_us: int, sid: str) -> str:
    """A dead letter's path below failed/."""
    return f"{queue}/{bucket_of(failed_us)}/{failed_us:017d}~{sid}"


@dataclass(frozen=True)
class Dead:
    """A dead letter found in the tree."""

    path: str
    queue: str
    failed_us: int
    sid: str


def parse_dead(name: str) -> tuple[int, str] | None:
    """(failure time, sid) of a dead letter's file name; None for others."""
    parts = name.split("~")
    if len(parts) != 2 or len(parts[0]) != 17 or not parts[0].isdigit() or not parts[1]:
        return None
    return int(parts[0]), parts[1]


def is_legacy(name: str) -> bool:
    """A dead letter named by an older OmniQ: its ready name, `<P>~<T>~<sid>~<n>`."""
    parts = name.split("~")
    return len(parts) == 4 and parts[1].isdigit() and parts[3].isdigit()


def listdir(path: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(path) if not n.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _days(names: list[str]) -> list[str]:
    """The day folders (`YYYYMMDD`) among a queue folder's names."""
    return [n for n in names if n.isdigit() and len(n) == 8]


# --- reading -------------------------------------------------------------------------------


def newest(
    top: str, queue: str, since_us: int | None, before_us: int | None, names: list[str]
) -> Iterator[Dead]:
    """The queue's dead letters failed in [since, before), newest first, listing folders
    only as far as the caller reads; `names` is the listing of `top`."""
    first = "" if since_us is None else bucket_of(since_us)
    last = LAST_BUCKET if before_us is None else bucket_of(before_us)
    for day in reversed(_days(names)):
        if day > last[:8]:
            continue
        if day < first[:8]:
            return
        for minute in reversed(listdir(os.path.join(top, day))):
            bucket = f"{day}/{minute}"
            if bucket > last:
                continue
            if bucket < first:
                return
            yield from _in_minute(os.path.join(top, day, minute), queue, since_us, before_us)


def _in_minute(
    folder: str, queue: str, since_us: int | None, before_us: int | None
) -> Iterator[Dead]:
    for name in reversed(listdir(folder)):
        parsed = parse_dead(name)
        if parsed is None:
            continue
        failed_us, sid = parsed
        if before_us is not None and failed_us >= before_us:
            continue
        if since_us is not None and failed_us < since_us:
            return
        yield Dead(os.path.join(folder, name), queue, failed_us, sid)


def every(top: str) -> Iterator[tuple[str, str]]:
    """(folder, name) of each dead letter of one queue (failed/<queue>), legacy ones too."""
    names = listdir(top)
    yield from ((top, name) for name in names if is_legacy(name))
    for day in _days(names):
        for minute in listdir(os.path.join(top, day)):
            folder = os.path.join(top, day, minute)
            yield from ((folder, n) for n in listdir(folder) if parse_dead(n))


def count(top: str) -> int:
    """How many dead letters one queue holds: a listing per minute folder, no reads."""
    names = listdir(top)
    legacy = sum(1 for n in names if is_legacy(n))
    minutes = (os.path.join(top, d, m) for d in _days(names) for m in listdir(os.path.join(top, d)))
    return legacy + sum(len(listdir(folder)) for folder in minutes)


def legacy_of(top: str, sid: str) -> str | None:
    """The legacy dead letter of `sid` directly in failed/<queue>, if any."""
    for name in listdir(top):
        if is_legacy(name) and name.split("~")[2] == sid:
            return os.path.join(top, name)
    return None


# --- hints ---------------------------------------------------------------------------------


class Hints:
    """queue/dead/<sid> -> `<queue>/<F>`: where each dead letter is."""

    def __init__(self, root: str, sync: Callable[[str], None]) -> None:
        self.dir = os.path.join(root, "dead")
        self.tmp = os.path.join(root, "tmp")
        self.failed = os.path.join(root, "failed")
        self._sync = sync

    def point(self, sid: str, queue: str, failed_us: int) -> None:
        """Say that `sid`'s dead letter is (about to be) filed in `queue` at `failed_us`;
        durable when the queue is, before the dead letter appears."""
        tmp = os.path.join(self.tmp, secrets.token_hex(8))
        os.symlink(f"{queue}/{failed_us:017d}", tmp)  # made with its content in one step
        try:
            os.replace(tmp, os.path.join(self.dir, sid))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._sync(self.dir)

    def find(self, sid: str) -> Dead | None:
        """`sid`'s dead letter, if its hint points at one."""
        try:
            queue, _, when = os.readlink(os.path.join(self.dir, sid)).partition("/")
        except OSError:  # none, or not a link
            return None
        if len(when) != 17 or not when.isdigit():
            return None
        path = os.path.join(self.failed, dead_rel(queue, int(when), sid))
        if not os.path.lexists(path):
            return None  # stale: its dead letter was retried or forgotten
        return Dead(path, queue, int(when), sid)

    def drop(self, sid: str, queue: str, failed_us: int) -> None:
        """Remove `sid`'s hint if it names this dead letter (just removed). A new hint of
        the same id could only appear here after its task was enqueued anew, claimed and
        failed again between these two calls."""
        hint = os.path.join(self.dir, sid)
        with contextlib.suppress(OSError):
            if os.readlink(hint) == f"{queue}/{failed_us:017d}":
                os.unlink(hint)


# --- filing --------------------------------------------------------------------------------


def prune(folder: str, top: str) -> None:
    """Remove the minute and day folders of a removed dead letter once empty (a filer
    that loses its folder to this makes it again: see common.rename_into)."""
    while folder != top and folder.startswith(top):
        try:
            os.rmdir(folder)
        except OSError:  # not empty, or gone
            return
        folder = os.path.dirname(folder)


def file_legacy(top: str, queue: str, hints: Hints, sync: Callable[[str], None]) -> int:
    """Move the legacy dead letters of failed/<queue> into the tree; how many moved."""
    moved = 0
    for name in listdir(top):
        if not is_legacy(name):
            continue
        path = os.path.join(top, name)
        try:
            failed_us = os.stat(path).st_ctime_ns // 1000  # the rename into failed/
        except FileNotFoundError:
            continue  # moved by another process, retried or purged
        sid = name.split("~")[2]
        rel = dead_rel(queue, failed_us, sid)
        hints.point(sid, queue, failed_us)
        with contextlib.suppress(FileNotFoundError):
            rename_into(path, os.path.join(hints.failed, rel), top, sync)
            moved += 1
    return moved
