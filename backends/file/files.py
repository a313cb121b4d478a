"""Filesystem primitives of the file stores: local files (write, fsync, rename or link into
place) or any fsspec filesystem (one PUT per object; conditional PUTs on S3)."""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from omniq.errors import BackendError, MissingDependency, redact
from omniq.registry import require

from .common import RACES, fsync_dir, local_path, read_quiet, sweep_tmp, unlink_quiet, write_tmp

_create_lock = threading.Lock()  # see _RemoteFiles.create


@dataclass(frozen=True)
class Found:
    """What an exclusive create found in its way: its bytes and, where the store has
    one, a version tag to replace exactly that object (an S3 ETag)."""

    data: bytes
    tag: str | None = None


class Files(Protocol):
    """The few primitives the stores need; paths are relative to the store root.

    `create` writes only where nothing is: None when it wrote (or found these very
    bytes, its own write sent twice), else what is there. `replace` puts new bytes in
    place of what `create` found, only if that is still there (a compare-and-swap).
    `publish_all` puts each item's bytes at a name of its own (written over, if there:
    the item sent again), then creates them at its gate (as `create`); it returns
    what it found at gates that were taken.
    """

    def write(self, rel: str, data: bytes) -> None: ...
    def write_all(self, items: Mapping[str, bytes]) -> None: ...
    def mark(self, rel: str) -> None: ...
    def create(self, rel: str, data: bytes) -> Found | None: ...
    def create_all(self, items: Mapping[str, bytes]) -> dict[str, Found]: ...
    def publish_all(self, items: Sequence[tuple[str, str, bytes]]) -> dict[str, Found]: ...
    def replace(self, rel: str, old: Found, data: bytes) -> bool: ...
    def read(self, rel: str) -> bytes | None: ...
    def read_all(self, rels: Sequence[str]) -> dict[str, bytes]: ...
    def names(self, rel: str) -> list[str]: ...
    def delete(self, rels: Sequence[str]) -> None: ...
    def prune(self, rels: Sequence[str]) -> None: ...


class _LocalFiles:
    """Plain os calls: write to .tmp and fsync, rename or link into place, then fsync each
    directory that changed, once per call (a batch of events shares its log minute)."""

    def __init__(self, root: str, durable: bool) -> None:
        self.root = root
        self.durable = durable
        self.tmp = os.path.join(root, ".tmp")
        os.makedirs(self.tmp, exist_ok=True)
        sweep_tmp(self.tmp)

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def _synced(self, dests: Iterable[str]) -> None:
        if self.durable:
            for folder in sorted({os.path.dirname(dest) for dest in dests}):
                fsync_dir(folder)

    def write(self, rel: str, data: bytes) -> None:
        self.write_all({rel: data})

    def write_all(self, items: Mapping[str, bytes]) -> None:
        dests = [self._path(rel) for rel in items]
        for dest, data in zip(dests, items.values(), strict=True):
            tmp = write_tmp(self.tmp, data, self.durable)
            try:
                os.replace(tmp, dest)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                os.replace(tmp, dest)
        self._synced(dests)

    def mark(self, rel: str) -> None:
        # Empty: nothing to tear, so no temp file and no data to fsync, only its directory.
        dest = self._path(rel)
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT, 0o644)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT, 0o644)
        os.close(fd)
        self._synced([dest])

    def create(self, rel: str, data: bytes) -> Found | None:
        return self.create_all({rel: data}).get(rel)

    def create_all(self, items: Mapping[str, bytes]) -> dict[str, Found]:
        # link() of a fully written file: it appears whole, and only if the name is free.
        found: dict[str, Found] = {}
        made: list[str] = []
        for rel, data in items.items():
            tmp = write_tmp(self.tmp, data, self.durable)
            try:
                there = self._link(tmp, self._path(rel), data)
            finally:
                unlink_quiet(tmp)
            if there is None:
                made.append(self._path(rel))
            else:
                found[rel] = there
        self._synced(made)
        return found

    def publish_all(self, items: Sequence[tuple[str, str, bytes]]) -> dict[str, Found]:
        # One inode under both names: its data is written and fsynced once. Every own
        # name is durable before any gate is made, as if written one after the other.
        staged = [(write_tmp(self.tmp, data, self.durable), own, data) for own, _, data in items]
        found: dict[str, Found] = {}
        gates: list[str] = []
        try:
            for tmp, own, data in staged:
                self._link(tmp, self._path(own), data)  # there already: it is ours, sent again
            self._synced([self._path(own) for own, _, _ in items])
            for (tmp, _, data), (_, gate, _) in zip(staged, items, strict=True):
                there = self._link(tmp, self._path(gate), data)
                if there is None:
                    gates.append(self._path(gate))
                else:
                    found[gate] = there
        finally:
            for tmp, _, _ in staged:
                unlink_quiet(tmp)
        self._synced(gates)
        return found

    def _link(self, tmp: str, dest: str, data: bytes) -> Found | None:
        for _ in range(RACES):
            try:
                os.link(tmp, dest)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                continue
            except FileExistsError:
                there = read_quiet(dest)
                if there is None:
                    continue  # removed while we looked: try again
                return None if there == data else Found(there)
            return None
        raise BackendError(f"file store: could not create {dest}: it keeps changing")

    def replace(self, rel: str, old: Found, data: bytes) -> bool:
        dest = self._path(rel)
        grave = os.path.join(self.tmp, secrets.token_hex(8))
        try:
            os.rename(dest, grave)  # of all processes replacing it, one gets the file
        except FileNotFoundError:
            return False
        if read_quiet(grave) != old.data:
            # Replaced since we read it: put that one back. A third writer creating the
            # name in the microseconds between could still win over it (a documented race
            # that needs an expired result and three concurrent writers).
            with contextlib.suppress(FileExistsError):
                os.link(grave, dest)
            os.unlink(grave)
            return False
        os.unlink(grave)
        return self.create(rel, data) is None

    def read(self, rel: str) -> bytes | None:
        return read_quiet(self._path(rel))

    def read_all(self, rels: Sequence[str]) -> dict[str, bytes]:
        return {rel: data for rel in rels if (data := self.read(rel)) is not None}

    def names(self, rel: str) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self._path(rel)) if not n.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete(self, rels: Sequence[str]) -> None:
        for rel in rels:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(rel))

    def prune(self, rels: Sequence[str]) -> None:
        for rel in rels:
            with contextlib.suppress(OSError):  # not empty (a writer got there first) or gone
                os.rmdir(self._path(rel))


class _RemoteFiles:
    """fsspec calls: one PUT per object, listings never served from a cache."""

    def __init__(self, fs: Any, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        # s3fs asks for an object's size (a HEAD, plus a LIST when it is missing) before
        # each GET unless told to read it in one piece; our objects are small.
        self._get_options = {"max_concurrency": 1} if type(fs).__name__ == "S3FileSystem" else {}

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def write(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(rel), data)

    def write_all(self, items: Mapping[str, bytes]) -> None:
        if items:  # async filesystems upload these concurrently
            self.fs.pipe({self._path(rel): data for rel, data in items.items()})

    # A check and a write under one lock: atomic within this process, which is all of
    # memory://. Other filesystems (GCS, Azure, ...) get no cross-process guarantee
    # from this: two processes may both create (the later write wins). S3 does better.
    def create(self, rel: str, data: bytes) -> Found | None:
        with _create_lock:
            there = self.read(rel)
            if there is None:
                self.write(rel, data)
                return None
        return None if there == data else Found(there)

    def create_all(self, items: Mapping[str, bytes]) -> dict[str, Found]:
        found = {rel: self.create(rel, data) for rel, data in items.items()}
        return {rel: there for rel, there in found.items() if there is not None}

    def mark(self, rel: str) -> None:
        self.write(rel, b"")

    def publish_all(self, items: Sequence[tuple[str, str, bytes]]) -> dict[str, Found]:
        self.write_all({own: data for own, _, data in items})
        return self.create_all({gate: data for _, gate, data in items})

    def replace(self, rel: str, old: Found, data: bytes) -> bool:
        with _create_lock:
            if self.read(rel) != old.data:
                return False
            self.write(rel, data)
            return True

    def read(self, rel: str) -> bytes | None:
        try:
            data: bytes = self.fs.cat_file(self._path(rel), **self._get_options)
            return data
        except FileNotFoundError:
            return None

    def read_all(self, rels: Sequence[str]) -> dict[str, bytes]:
        if not rels:
            return {}
        paths = {self.fs._strip_protocol(self._path(rel)): rel for rel in rels}
        try:
            found = self.fs.cat(list(paths), on_error="omit", **self._get_options)
        except FileNotFoundError:
            return {}
        return {paths[self.fs._strip_protocol(p)]: data for p, data in found.items()}

    def names(self, rel: str) -> list[str]:
        try:
            listed = self.fs.ls(self._path(rel), detail=False, refresh=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        names = (str(p).rstrip("/").rsplit("/", 1)[-1] for p in listed)
        return sorted(n for n in names if n and not n.startswith("."))

    def delete(self, rels: Sequence[str]) -> None:
        paths = [self._path(rel) for rel in rels]
        if not paths:
            return
        try:
            self.fs.rm(paths)  # bulk delete where the store has one
        except FileNotFoundError:
            for path in paths:  # some filesystems refuse a batch with a missing member
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(path)

    def prune(self, rels: Sequence[str]) -> None:
        return None  # object stores have no directories to remove


class _S3Files(_RemoteFiles):
    """S3's conditional writes: PUT If-None-Match: * creates, If-Match: <ETag> replaces.

    Both are atomic on the server, so they hold across processes and hosts. A PUT the
    client library sends again (its reply was lost) fails its condition against our own
    first copy: `create` then finds its own bytes and reports success.
    """

    def create(self, rel: str, data: bytes) -> Found | None:
        path = self._path(rel)
        for _ in range(RACES):
            try:
                self.fs.pipe_file(path, data, IfNoneMatch="*")
                return None
            except OSError as exc:
                if not _condition_failed(exc):
                    raise
            found = self._found(path)
            if found is not None:
                return None if found.data == data else found
        raise BackendError(f"file store: could not create {path}: it keeps changing")

    def create_all(self, items: Mapping[str, bytes]) -> dict[str, Found]:
        if not items:
            return {}
        paths = {self._path(rel): data for rel, data in items.items()}
        try:
            self.fs.pipe(paths, IfNoneMatch="*")  # concurrently; the usual case
            return {}
        except OSError as exc:
            if not _condition_failed(exc):
                raise
        # Some were there: one by one (ours from the batch read back as ours).
        return super().create_all(items)

    def _found(self, path: str) -> Found | None:
        # The tag first: if the object changes before the read, a replace by this tag fails.
        try:
            tag = self.fs.info(path).get("ETag")
            data: bytes = self.fs.cat_file(path, **self._get_options)
        except FileNotFoundError:
            return None
        return Found(data, tag)

    def replace(self, rel: str, old: Found, data: bytes) -> bool:
        if old.tag is None:
            return False
        try:
            self.fs.pipe_file(self._path(rel), data, IfMatch=old.tag)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if not _condition_failed(exc):
                raise
            return False
        return True


def _condition_failed(exc: BaseException) -> bool:
    """S3 refused a conditional write: 412 (the condition is false) or 409 (another
    conditional write of the key is in flight)."""
    if isinstance(exc, FileExistsError):
        return True
    response = getattr(exc.__cause__, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def connect(base_dir: str, storage_options: Mapping[str, Any], durable: bool) -> Files:
    local = local_path(base_dir)
    if local is not None:
        return _LocalFiles(local, durable)
    fsspec = require("fsspec", "s3")
    options = {"use_listings_cache": False, "skip_instance_cache": True, **storage_options}
    try:
        fs, root = fsspec.core.url_to_fs(base_dir, **options)
    except ImportError as exc:  # the filesystem's own package (s3fs, gcsfs, adlfs) is missing
        raise MissingDependency(
            f"the file backend cannot open {redact(base_dir)!r}: {exc} "
            "(for S3: pip install 'omniq[s3]')"
        ) from exc
    if type(fs).__name__ == "LocalFileSystem":
        return _LocalFiles(os.path.abspath(root), durable)
    if type(fs).__name__ == "S3FileSystem":
        return _S3Files(fs, root)
    return _RemoteFiles(fs, root)

