"""`omniq logs ID [--follow]`: what a shell task printed, live while it runs (from its
`output` events), then as kept with its result; like `pueue follow`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from omniq.cli import common, console
from omniq.cli.exit_codes import ExitCode

if TYPE_CHECKING:
    from omniq.client import AsyncOmniQ
    from omniq.config import OmniQConfig
    from omniq.models import TaskEvent, TaskResult

CUT = "[live output stops here"  # the worker's note once a stream passed its live limit
OUTCOMES = ("completed", "failed", "timeout", "cancelled", "expired")

EPILOG = common.examples(
    "id=$(omniq enqueue --sh 'make test')",
    "omniq logs $id --follow              # live, until it ends (Ctrl-C stops following)",
    "omniq logs $id                       # what it printed so far, or all of it",
    "omniq logs $id --json | jq -r 'select(.stream == \"stderr\") | .text'",
) + (
    "\n\nThe command's stdout goes to stdout and its stderr to stderr. While the task runs,"
    "\nthe output comes from its output events (sent about twice a second, up to"
    "\nshell_output_limit characters per stream); once it ended, from its result, which"
    "\nkeeps the last shell_output_limit bytes of each stream. Exit 0 once shown (the task's"
    "\nown exit status: omniq result ID); 4 no such task; 5 not a shell task."
)


@common.command("logs", epilog=EPILOG)
@common.task_id_argument()
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the task has ended.")
@common.json_option('One JSON object per chunk: {"stream", "text", "attempt"} (JSON lines).')
def logs(task_id: str, follow: bool, as_json: bool) -> int:
    """Print a shell task's output (stdout and stderr); --follow it live."""
    config = common.load_config()
    try:
        return common.run_async(_logs(config, task_id, follow, as_json))
    except KeyboardInterrupt:
        return ExitCode.OK


class _Printer:
    """Writes each chunk once, to the stream it came from (or as JSON lines)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.seen: set[str] = set()
        self.cut = False  # the live output stopped at its limit: the result has the end
        self.any = False

    def chunk(self, stream: str, text: str, attempt: int | None = None) -> None:
        self.any = True
        if self.as_json:
            console.json_line({"stream": stream, "text": text, "attempt": attempt}, flush=True)
        else:
            console.write(text, err=stream == "stderr")

    def event(self, event: TaskEvent) -> None:
        if event.id in self.seen:
            return
        self.seen.add(event.id)
        kind, details = event.event_type.value, event.details
        if kind == "started" and event.attempt > 1 and self.any:
            console.info(f"--- attempt {event.attempt} ---")
        if kind == "output" and isinstance(details.get("text"), str):
            self.cut = self.cut or CUT in details["text"]
            self.chunk(str(details.get("stream", "stdout")), details["text"], event.attempt)


async def _logs(config: OmniQConfig, task_id: str, follow: bool, as_json: bool) -> int:
    async with common.open_client(config) as client:
        cursor = await client.event_cursor() if follow else None
        result = await _result(client, task_id)
        printer = _Printer(as_json)
        if result is not None and _kept(printer, result):
            return ExitCode.OK
        events = await client.get_events(task_id)
        if not events and not await client.task_exists(task_id):
            from omniq.errors import TaskNotFound

            raise TaskNotFound(f"no task with id {task_id}")
        _check_shell(task_id, events)
        for event in events:
            printer.event(event)
        if result is not None or not follow:
            if not printer.any and result is None:
                console.info(f"task {task_id} has printed nothing yet (--follow waits for it)")
            return ExitCode.OK
        await _follow(client, task_id, cursor, printer)
        return ExitCode.OK


async def _result(client: AsyncOmniQ, task_id: str) -> TaskResult | None:
    from omniq.errors import ResultTimeout, TaskNotFound

    try:
        return await client.wait_result(task_id, 0)
    except (ResultTimeout, TaskNotFound):
        return None


def _kept(printer: _Printer, result: TaskResult) -> bool:
    """Print the output kept with a shell task's result; False when it has none."""
    from omniq.cli.inspect_cmd import shell_output

    output = shell_output(result)
    if output is None:
        return False
    for stream in ("stdout", "stderr"):
        if output[stream]:
            printer.chunk(stream, str(output[stream]), result.attempts)
    return True


def _check_shell(task_id: str, events: list[TaskEvent]) -> None:
    funcs = {e.details.get("func") for e in events if e.event_type.value == "enqueued"}
    if funcs and "shell" not in funcs:
        raise common.Refused(
            f"task {task_id} runs {funcs.pop()}, not a shell command: only shell tasks have "
            f"logs (see omniq result {task_id} and omniq events {task_id})"
        )


async def _follow(client: AsyncOmniQ, task_id: str, cursor: str | None,
                  printer: _Printer) -> None:
    """Print output events as they come, until the task's outcome; then the end of the
    output from the result when the live output stopped at its limit."""
    import asyncio

    from omniq.cli.inspect_cmd import HINT_AFTER, _hint_if_unserved
    from omniq.models import EventFilter, EventType

    async def hint_later() -> None:
        await asyncio.sleep(HINT_AFTER)
        await _hint_if_unserved(client, task_id, None)

    kinds = frozenset({EventType.OUTPUT, EventType.STARTED, *map(EventType, OUTCOMES)})
    hint = asyncio.ensure_future(hint_later())
    try:
        async for _, event in client.follow_events(cursor, EventFilter(task_id, kinds),
                                                   idle_wait=0.5):
            if event.event_type == EventType.STARTED:
                hint.cancel()
            printer.event(event)
            if event.event_type.value in OUTCOMES:
                break
    finally:
        hint.cancel()
        await asyncio.gather(hint, return_exceptions=True)
    result = await _result(client, task_id)
    if printer.cut and result is not None:
        console.info("--- the end of the output, as kept with the result ---")
        _kept(printer, result)


COMMANDS = {"logs": logs}
