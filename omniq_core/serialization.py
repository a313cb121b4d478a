"""JSON encoding of tasks, results and events, and import-path callables."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from omniq.errors import CorruptRecord, SerializationError
from omniq.models import (
    EventType,
    Task,
    TaskEvent,
    TaskKind,
    TaskResult,
    TaskStatus,
    WorkerInfo,
    from_timestamp,
    to_timestamp,
)

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_loads = json.loads

# The record formats this OmniQ writes (the "v" field). A record of a newer format
# (written by a newer OmniQ) is refused as corrupt rather than misread.
FORMAT_VERSION = 1
UNDECODABLE_FUNC = "<undecodable>"


def check_json(value: Any, name: str) -> None:
    """Raise SerializationError naming `name` if `value` is not plain JSON."""
    try:
        _dumps(value)
    except (TypeError, ValueError) as exc:
        raise SerializationError(
            f"{name} cannot be sent as JSON ({type(value).__name__}): {exc}. "
            "Pass JSON types (str, int, float, bool, None, list, dict with str keys)."
        ) from None


def check_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for i, arg in enumerate(args):
        check_json(arg, f"argument {i}")
    for key, value in kwargs.items():
        check_json(value, f"argument {key!r}")


# --- callables -----------------------------------------------------------


def callable_path(func: Callable[..., Any]) -> str | None:
    """`pkg.mod:qualname` when another process could import `func`, else None."""
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not module or not qualname or module == "__main__":
        return None
    if "<" in qualname:  # <lambda>, <locals>
        return None
    try:
        if resolve(f"{module}:{qualname}") is not func:
            return None
    except Exception:
        return None
    return f"{module}:{qualname}"


def resolve(path: str) -> Callable[..., Any]:
    """Import `pkg.mod:qualname` (or `pkg.mod.func`) and return the callable."""
    if ":" in path:
        module_name, _, qualname = path.partition(":")
    else:
        module_name, _, qualname = path.rpartition(".")
    if not module_name or not qualname:
        raise ValueError(f"{path!r} is not an import path like 'package.module:function'")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{path!r} is not callable")
    return obj


def module_of(path: str) -> str:
    return path.partition(":")[0] if ":" in path else path.rpartition(".")[0]


# --- records -------------------------------------------------------------


def _dt(value: datetime | None) -> float | None:
    return to_timestamp(value)


def task_to_dict(task: Task) -> dict[str, Any]:
    return {
        "v": FORMAT_VERSION,
        "id": task.id,
        "func": task.func,
        "args": list(task.args),
        "kwargs": task.kwargs,
        "queue": task.queue,
        "priority": task.priority,
        "eta": _dt(task.eta),
        "max_retries": task.max_retries,
        "retry_delay": task.retry_delay,
        "timeout": task.timeout,
        "expires_at": _dt(task.expires_at),
        "unique_key": task.unique_key,
        "unique_ttl": task.unique_ttl,
        "result_ttl": task.result_ttl,
        "kind": task.kind.value,
        "created_at": _dt(task.created_at),
        **_task_extras(task),
    }


def _task_extras(task: Task) -> dict[str, Any]:
    """Fields most tasks leave empty, written only when set (smaller records)."""
    extras: dict[str, Any] = {}
    if task.schedule is not None:
        extras["schedule"] = task.schedule
        extras["slot"] = _dt(task.slot)
    if task.after:
        extras["after"] = list(task.after)
    if task.pass_result:
        extras["pass_result"] = True
    return extras


def task_from_dict(d: dict[str, Any]) -> Task:
    return Task(
        id=d["id"],
        func=d["func"],
        args=tuple(d.get("args") or ()),
        kwargs=dict(d.get("kwargs") or {}),
        queue=d.get("queue", "default"),
        priority=int(d.get("priority", 0)),
        eta=from_timestamp(d.get("eta")),
        max_retries=int(d.get("max_retries", 0)),
        retry_delay=float(d.get("retry_delay", 1.0)),
        timeout=d.get("timeout"),
        expires_at=from_timestamp(d.get("expires_at")),
        unique_key=d.get("unique_key"),
        unique_ttl=d.get("unique_ttl"),
        result_ttl=d.get("result_ttl"),
        kind=TaskKind(d.get("kind", "python")),
        created_at=from_timestamp(d["created_at"]),  # type: ignore[arg-type]
        schedule=d.get("schedule"),
        slot=from_timestamp(d.get("slot")),
        after=tuple(d.get("after") or ()),
        pass_result=bool(d.get("pass_result", False)),
    )


def encode_task(task: Task) -> bytes:
    return _dumps(task_to_dict(task)).encode()


def _decoded(kind: str, data: bytes | str, build: Callable[[dict[str, Any]], Any]) -> Any:
    """`build(json of data)`, or CorruptRecord saying what is wrong with the record."""
    try:
        d = _loads(data)
        if not isinstance(d, dict):
            raise TypeError(f"a JSON object was expected, not {type(d).__name__}")
        version = d.get("v", 1)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"unknown {kind} format version {version!r} (this OmniQ reads {FORMAT_VERSION})"
            )
        return build(d)
    except CorruptRecord:
        raise
    except KeyError as exc:
        raise CorruptRecord(f"{kind} record lacks the field {exc.args[0]!r}") from None
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        # ValueError covers json.JSONDecodeError and UnicodeDecodeError.
        raise CorruptRecord(f"{kind} record does not decode: {exc}") from None


def decode_task(data: bytes | str) -> Task:
    """The task; CorruptRecord when `data` is not a task this OmniQ can read."""
    task: Task = _decoded("task", data, task_from_dict)
    return task


def placeholder_task(task_id: str, queue: str = "default") -> Task:
    """What a store hands out for a task whose payload does not decode: the worker
    records it failed (it never runs), and `get_task` shows it without a traceback."""
    return Task(func=UNDECODABLE_FUNC, id=task_id, queue=queue)


def decode_task_or_placeholder(
    data: bytes | str, task_id: str, queue: str = "default"
) -> tuple[Task, str | None]:
    """(task, None), or (placeholder, what is wrong) when the payload does not decode."""
    try:
        return decode_task(data), None
    except CorruptRecord as exc:
        return placeholder_task(task_id, queue), str(exc)


def result_to_dict(result: TaskResult) -> dict[str, Any]:
    return {
        "v": FORMAT_VERSION,
        "task_id": result.task_id,
        "status": result.status.value,
        "value": result.value,
        "error_type": result.error_type,
        "error_message": result.error_message,
        "traceback": result.traceback,
        "attempts": result.attempts,
        "queue": result.queue,
        "worker_id": result.worker_id,
        "enqueued_at": _dt(result.enqueued_at),
        "started_at": _dt(result.started_at),
        "finished_at": _dt(result.finished_at),
        "expires_at": _dt(result.expires_at),
    }


def result_from_dict(d: dict[str, Any]) -> TaskResult:
    return TaskResult(
        task_id=d["task_id"],
        status=TaskStatus(d["status"]),
        value=d.get("value"),
        error_type=d.get("error_type"),
        error_message=d.get("error_message"),
        traceback=d.get("traceback"),
        attempts=int(d.get("attempts", 1)),
        queue=d.get("queue", "default"),
        worker_id=d.get("worker_id"),
        enqueued_at=from_timestamp(d.get("enqueued_at")),
        started_at=from_timestamp(d.get("started_at")),
        finished_at=from_timestamp(d["finished_at"]),  # type: ignore[arg-type]
        expires_at=from_timestamp(d.get("expires_at")),
    )


def encode_result(result: TaskResult) -> bytes:
    try:
        return _dumps(result_to_dict(result)).encode()
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"task {result.task_id} result is not JSON: {exc}") from None


def decode_result(data: bytes | str) -> TaskResult:
    result: TaskResult = _decoded("result", data, result_from_dict)
    return result


def event_to_dict(event: TaskEvent) -> dict[str, Any]:
    return {
        "v": FORMAT_VERSION,
        "id": event.id,
        "task_id": event.task_id,
        "event_type": event.event_type.value,
        "timestamp": _dt(event.timestamp),
        "attempt": event.attempt,
        "worker_id": event.worker_id,
        "queue": event.queue,
        "details": event.details,
    }


def event_from_dict(d: dict[str, Any]) -> TaskEvent:
    return TaskEvent(
        task_id=d["task_id"],
        event_type=EventType(d["event_type"]),
        timestamp=from_timestamp(d["timestamp"]),  # type: ignore[arg-type]
        attempt=int(d.get("attempt", 0)),
        worker_id=d.get("worker_id"),
        queue=d.get("queue"),
        details=dict(d.get("details") or {}),
        # Events stored before ids existed get a stable one from their content.
        id=d.get("id") or _legacy_event_id(d),
    )


def _legacy_event_id(d: dict[str, Any]) -> str:
    import hashlib

    return "legacy-" + hashlib.sha1(_dumps(d).encode()).hexdigest()[:24]


def encode_event(event: TaskEvent) -> bytes:
    return _dumps(event_to_dict(event)).encode()


def decode_event(data: bytes | str) -> TaskEvent:
    event: TaskEvent = _decoded("event", data, event_from_dict)
    return event


def worker_to_dict(info: WorkerInfo) -> dict[str, Any]:
    return {
        "worker_id": info.worker_id,
        "host": info.host,
        "pid": info.pid,
        "queues": list(info.queues),
        "started_at": _dt(info.started_at),
        "heartbeat_at": _dt(info.heartbeat_at),
        "current_tasks": list(info.current_tasks),
        "concurrency": info.concurrency,
        "tasks_done": info.tasks_done,
        "events_buffered": info.events_buffered,
        "events_dropped": info.events_dropped,
    }


def worker_from_dict(d: dict[str, Any]) -> WorkerInfo:
    return WorkerInfo(
        worker_id=d["worker_id"],
        host=d["host"],
        pid=int(d["pid"]),
        queues=tuple(d.get("queues") or ()),
        started_at=from_timestamp(d["started_at"]),  # type: ignore[arg-type]
        heartbeat_at=from_timestamp(d["heartbeat_at"]),  # type: ignore[arg-type]
        current_tasks=tuple(d.get("current_tasks") or ()),
        concurrency=int(d.get("concurrency", 1)),
        tasks_done=int(d.get("tasks_done", 0)),
        events_buffered=int(d.get("events_buffered", 0)),
        events_dropped=int(d.get("events_dropped", 0)),
    )


def encode_worker(info: WorkerInfo) -> bytes:
    return _dumps(worker_to_dict(info)).encode()


def decode_worker(data: bytes | str) -> WorkerInfo:
    info: WorkerInfo = _decoded("worker", data, worker_from_dict)
    return info


def dumps(value: Any) -> str:
    return _dumps(value)


def loads(data: bytes | str) -> Any:
    return _loads(data)
