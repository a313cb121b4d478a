"""OmniQ's own exceptions; backends translate driver errors into these at their boundary."""

from __future__ import annotations


class OmniQError(Exception):
    """Base of every error OmniQ raises on purpose."""


class ConfigError(OmniQError):
    """Bad configuration: names the key and where it came from."""


class BackendUnavailable(OmniQError):
    """A store could not be reached (server down, wrong host, bad credentials)."""


class BackendError(OmniQError):
    """A store answered with an error that is not about reachability."""


class CorruptRecord(BackendError):
    """A stored record does not decode: bad bytes, an unknown format version, missing fields."""


class MissingDependency(OmniQError):
    """An optional driver is not installed; the message carries the install hint."""


class SerializationError(OmniQError):
    """A value cannot be carried as JSON (names the argument)."""


class TaskNotFound(OmniQError):
    """No task, result or event is known for this id."""


class ResultTimeout(OmniQError):
    """The result was not ready within the timeout."""


class TaskRefused(OmniQError):
    """The worker will not run this callable (allow-list, shell disabled)."""


class WorkerLost(OmniQError):
    """Recorded as a task's error: its workers vanished (lease expired) on every attempt."""


class UndecodableTask(OmniQError):
    """Recorded as a task's error: its stored payload could not be decoded."""


class TaskFailed(OmniQError):
    """The task ended without a value; carries the remote error."""

    def __init__(
        self,
        task_id: str,
        status: str,
        error_type: str | None,
        message: str | None,
        traceback: str | None = None,
    ) -> None:
        self.task_id = task_id
        self.status = status
        self.error_type = error_type
        self.message = message
        self.remote_traceback = traceback
        super().__init__(f"task {task_id} {status}: {error_type or 'Error'}: {message or ''}")

    def __str__(self) -> str:
        text = super().__str__()
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback
        return text


class TaskTimeout(TaskFailed):
    """The task ran over its timeout."""


class TaskCancelled(TaskFailed):
    """The task was cancelled before it started."""


class TaskExpired(TaskFailed):
    """The task's TTL passed before a worker started it."""


def redact(text: str) -> str:
    """Mask passwords in URLs/DSNs found anywhere in a message."""
    import re

    text = re.sub(
        r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@",
        r"\g<scheme>\g<user>:***@",
        text,
    )
    return re.sub(r"(?i)(password\s*=\s*)('[^']*'|\S+)", r"\1***", text)
