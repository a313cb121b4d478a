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


class TaskStateError(OmniQError):
    """The operation is not possible in the task's current state (retry of a task that
    did not fail, cancel of one that started)."""


class TaskRefused(OmniQError):
    """The worker will not run this callable (allow-list, shell disabled)."""


class WorkerLost(OmniQError):
    """Recorded as a task's error: its workers vanished (lease expired) on every attempt."""


class DependencyFailed(OmniQError):
    """Recorded as a task's error: a task it waited for (`after=`) did not complete."""


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


# URL userinfo: "user:password@" (the password masked) or a bare "token@" of the
# NATS schemes, where the userinfo alone is a token (postgresql://app@db names a user).
_USERINFO = r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@"
_TOKEN_SCHEMES = r"(?P<scheme>(?:nats|tls|ws|wss)://)[^:/@\s]+@"
_SECRET_NAME = r"[A-Za-z_]*(?:pass(?:word|wd)?|secret|token|credential|api_?key|access_?key)"
# name=value in URL queries (?password=...) and key=value DSNs (password='x y'), and
# name: value in mapping reprs and YAML ({'token': 'x'}).
_SECRET_PARAM = (
    rf"(?i)(?P<name>['\"]?\b{_SECRET_NAME}['\"]?\s*[:=]\s*)"
    r"(?P<value>'[^']*'|\"[^\"]*\"|[^\s&;,'\"}]+)"
)
# NATS credentials: a creds file's JWT and seed blocks, bare user/account seeds, JWTs.
_CREDS_BLOCK = r"(-----BEGIN [A-Z ]+-----)[\s\S]*?(-*END [A-Z ]+-----*)"
_NKEY_SEED = r"\bS[UAO][A-Z2-7]{40,}\b"
_JWT = r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"


def redact(text: str) -> str:
    """Mask credentials found anywhere in a message: passwords and tokens in URLs and
    DSNs, secret-looking name=value parameters, NATS creds, seeds and JWTs."""
    import re

    text = re.sub(_USERINFO, r"\g<scheme>\g<user>:***@", text)
    text = re.sub(_TOKEN_SCHEMES, r"\g<scheme>***@", text)
    text = re.sub(_SECRET_PARAM, r"\g<name>***", text)
    text = re.sub(_CREDS_BLOCK, r"\1 *** \2", text)
    text = re.sub(_NKEY_SEED, "***", text)
    return re.sub(_JWT, "***", text)
