"""Named exit codes of the `omniq` command (DESIGN.md, "CLI conventions")."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    TASK_FAILED = 1  # the task failed: failed, timed out (its own timeout), cancelled, expired
    USAGE = 2  # bad arguments, options or input
    PENDING = 3  # the wait timed out / the result is still pending
    NOT_FOUND = 4  # no such task (or schedule)
    REFUSED = 5  # not done: the task's state does not allow it, or the user said no
    ALERT = 6  # omniq metrics: a threshold given on the command line was crossed
    UNAVAILABLE = 69  # a store cannot be reached or its driver is missing (EX_UNAVAILABLE)
    CONFIG = 78  # bad configuration (EX_CONFIG)
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


# One text for `omniq --help` and the README table.
SUMMARY = (
    "Exit codes: 0 ok; 1 the task failed (error, its own timeout, cancelled, expired);\n"
    "2 usage error; 3 the wait timed out or the result is still pending;\n"
    "4 no such task (or schedule);\n"
    "5 refused (the task's state does not allow it, or a prompt was declined);\n"
    "6 omniq metrics: a threshold was crossed;\n"
    "69 backend unavailable; 78 configuration error; 130 interrupted.\n"
    "A shell task waited for (--wait, omniq result) exits with the command's own status."
)
