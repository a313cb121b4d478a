"""Shell-command tasks: argv run without a shell unless the task asked for `sh`."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import signal
from collections.abc import Callable
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


OutputSink = Callable[[str, str], None]  # (stream name, text) as the command writes it
CHUNK = 4096


class _Tail:
    """The last `limit` bytes a stream wrote, and how many came before them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        extra = len(self.data) - self.limit
        if extra > self.limit:  # trim now and then, not on every chunk
            del self.data[:extra]
            self.dropped += extra

    def text(self) -> str:
        extra = max(0, len(self.data) - self.limit)
        kept = self.data[extra:].decode("utf-8", errors="replace")
        dropped = self.dropped + extra
        return f"[... {dropped} bytes before this were cut]\n{kept}" if dropped else kept


async def run_shell(
    task: Task, output_limit: int, on_output: OutputSink | None = None
) -> dict[str, Any] | None:
    """Run the command; its outputs (the last `output_limit` bytes of each) and exit
    code, or None when it timed out (killed). `on_output` sees the output live."""
    proc = await _start(task)
    tails = {"stdout": _Tail(output_limit), "stderr": _Tail(output_limit)}
    readers = [
        _pump(proc.stdout, "stdout", tails["stdout"], on_output),
        _pump(proc.stderr, "stderr", tails["stderr"], on_output),
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*readers, proc.wait()), task.timeout)
    except TimeoutError:
        await _kill_group(proc)
        return None
    except asyncio.CancelledError:
        await _kill_group(proc)
        raise
    return {
        "exit_code": proc.returncode,
        "stdout": tails["stdout"].text(),
        "stderr": tails["stderr"].text(),
    }


async def _start(task: Task) -> asyncio.subprocess.Process:
    pipes: dict[str, Any] = {
        "stdout": asyncio.subprocess.PIPE,
        "stderr": asyncio.subprocess.PIPE,
        "stdin": asyncio.subprocess.DEVNULL,
        "start_new_session": True,
    }
    sh = task.kwargs.get("sh")
    if sh is not None:
        return await asyncio.create_subprocess_shell(str(sh), **pipes)
    return await asyncio.create_subprocess_exec(*[str(a) for a in task.args], **pipes)


async def _pump(
    stream: asyncio.StreamReader | None, name: str, tail: _Tail, on_output: OutputSink | None
) -> None:
    if stream is None:
        return
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # split characters
    while chunk := await stream.read(CHUNK):
        tail.add(chunk)
        if on_output is not None:
            on_output(name, decoder.decode(chunk))


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    # The command may have started children of its own: end the whole group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(proc.wait(), 5)
