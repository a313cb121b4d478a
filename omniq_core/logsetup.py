"""Logging for the worker daemon: one line per record on stderr, as text or JSON lines."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")

_COLOURS = {
    logging.DEBUG: "\033[2m",
    logging.INFO: "\033[36m",
    logging.WARNING: "\033[33m",
    logging.ERROR: "\033[31m",
    logging.CRITICAL: "\033[1;31m",
}
_RESET = "\033[0m"
# sd-daemon(3) priority prefixes: journald reads them from a service's stderr.
_SYSLOG = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}
# Attributes every LogRecord has; anything else was passed with `extra=` and is kept in JSON.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
# The fields the worker puts on its task records (`extra=`): top-level JSON fields, in this
# order, so log pipelines can filter on them without parsing the message.
TASK_FIELDS = ("task_id", "func", "queue", "attempt", "duration", "worker", "event")


def use_colour(stream: IO[str]) -> bool:
    """Colour only for a person at a terminal (https://no-color.org is honoured)."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def is_journal(stream: IO[str]) -> bool:
    """True when `stream` is connected to journald (it sets JOURNAL_STREAM=dev:inode)."""
    wanted = os.environ.get("JOURNAL_STREAM", "")
    if not wanted:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return wanted == f"{st.st_dev}:{st.st_ino}"


class TextFormatter(logging.Formatter):
    """`2024-05-01 12:00:00,123 INFO omniq.worker: task ... completed in 0.2s`."""

    def __init__(self, colour: bool = False, journal: bool = False) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.colour = colour
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        if self.journal:
            # journald stamps time and host itself; the prefix carries the level.
            level = _SYSLOG.get(record.levelno, 3 if record.levelno > logging.ERROR else 6)
            return f"<{level}>{record.name}: {self._body(record)}"
        text = super().format(record)
        if self.colour:
            colour = _COLOURS.get(record.levelno, "")
            text = text.replace(record.levelname, f"{colour}{record.levelname}{_RESET}", 1)
        return text

    def _body(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the task fields present on
    the record (TASK_FIELDS, None left out), then any other `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = vars(record)
        data.update((k, fields[k]) for k in TASK_FIELDS if fields.get(k) is not None)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        for key, value in fields.items():
            if key not in _STANDARD and key not in data and key not in TASK_FIELDS:
                data[key] = value
        return json.dumps(data, default=str, ensure_ascii=False)


def make_handler(fmt: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(out)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(colour=use_colour(out), journal=is_journal(out)))
    return handler


def setup_logging(
    level: str = "INFO", fmt: str = "text", stream: IO[str] | None = None
) -> Callable[[], None]:
    """Send every log record at `level` or above to `stream` (stderr); returns an undo.

    The root logger is configured, not just "omniq": a daemon's operator wants the task
    code's own log lines in the same place and format as the worker's.
    """
    name = level.strip().upper()
    if name not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    handler = make_handler(fmt, stream)
    root.handlers = [handler]
    root.setLevel(name)
    logging.captureWarnings(True)

    def undo() -> None:
        logging.captureWarnings(False)
        root.handlers = saved_handlers
        root.setLevel(saved_level)
        handler.close()

    return undo
