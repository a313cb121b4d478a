"""Shell-command tasks: argv run without a shell unless the task asked for `sh`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Any

from omniq.models import Task

SHELL_FUNC = "omniq:shell"


def shell_task_args(
    argv: list[str] | None, sh: str | None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if sh is not None:
        return (), {"sh": sh}
    if not argv:
        raise ValueError("a shell task needs a command: omniq enqueue --shell -- CMD ARGS...")
    return tuple(argv), {}


def _truncate(data: bytes, limit: int) -> str:
    text = data.decode("utf-8", errors="replace")
    if len(text) > limit:
        return text[:limit] + f"\n[... {len(text) - limit} characters truncated]"
    return text


async def run_shell(task: Task, output_limit: int) -> dict[str, Any] | None:
    """Run the command; its outputs and exit code, or None when it timed out (killed)."""
    sh = task.kwargs.get("sh")
    if sh is not None:
        proc = await asyncio.create_subprocess_shell(
            str(sh),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
    else:
        proc = await asyncio.create_subprocess_exec(
            *[str(a) for a in task.args],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), task.timeout)
    except TimeoutError:
        await _kill_group(proc)
        return None
    except asyncio.CancelledError:
        await _kill_group(proc)
        raise
    return {
        "exit_code": proc.returncode,
        "stdout": _truncate(out, output_limit),
        "stderr": _truncate(err, output_limit),
    }


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    # The command may have started children of its own: end the whole group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(proc.wait(), 5)
