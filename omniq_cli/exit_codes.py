"""Named exit codes of the `omniq` command (DESIGN.md, "CLI conventions")."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    TASK_FAILED = 1  # the task failed, or the operation could not be done
    USAGE = 2  # bad arguments, options or input
    PENDING = 3  # timed out waiting / result still pending
    NOT_FOUND = 4  # no such task
    UNAVAILABLE = 69  # a store cannot be reached or its driver is missing (EX_UNAVAILABLE)
    CONFIG = 78  # bad configuration (EX_CONFIG)
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
