"""`omniq enqueue`: queue a Python call or a shell command, or many tasks from JSON lines."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import click

from omniq.cli import common, console
from omniq.cli.exit_codes import ExitCode

if TYPE_CHECKING:
    from omniq.client import AsyncOmniQ
    from omniq.config import OmniQConfig
    from omniq.models import Task

SHELL_FUNC = "omniq:shell"  # the same value as omniq.shell.SHELL_FUNC, without importing it
BATCH = 100  # tasks between progress updates and stdout flushes in --from-file

EPILOG = common.examples(
    "omniq enqueue omniq.examples:add 2 3",
    "omniq enqueue myapp.tasks:send_mail bob@example.com -k subject='\"Hi\"' -q mail",
    "omniq enqueue myapp.tasks:report --delay 5m --retries 3 --timeout 2m",
    "omniq enqueue omniq.examples:add 2 3 --wait --wait-timeout 30s   # prints 5",
    "x=$(omniq enqueue omniq.examples:add 2 3 --wait)                # x=5",
    "# cron, every 10 minutes, at most one report a day:",
    '*/10 * * * * omniq enqueue myapp.tasks:report --key "report-$(date +\\%F)" --key-ttl 1d',
    "omniq enqueue omniq.examples:add -- -1 2          # '--' before negative numbers",
    "omniq enqueue --from-file tasks.jsonl            # or '-' for stdin",
    "a=$(omniq enqueue omniq.examples:add 2 3)",
    "omniq enqueue omniq.examples:add 10 --after $a --pass-result   # 15, once a is done",
    "omniq enqueue --shell -- tar czf /tmp/b.tgz /srv",
    "omniq enqueue --sh 'pg_dump app | gzip > /tmp/app.sql.gz'",
)

HELP = """Queue a task and print its id.

FUNC is an import path 'package.module:function'. Each ARG (and -k value) is
parsed as JSON when it is valid JSON (2, 2.5, true, null, "[1, 2]", '{"a": 1}'),
else taken as a string; one that starts like JSON ('{' or '[') but is not valid
JSON is refused (exit 2): quote it as a JSON string to send it as text. The
module must be importable here unless --no-check is given (for producers that
do not have the task code).

--at takes an ISO 8601 time; without a UTC offset it is local time.

--wait prints only the outcome on stdout (the id goes to stderr), so
x=$(omniq enqueue ... --wait) captures the value; with --json one record holds
both. Exit 0 completed, 1 the task failed (or timed out, was cancelled, expired),
3 the wait timed out. A shell task prints its command's stdout and stderr and
exits with the command's status. After a few seconds with no live worker
serving the queue, one hint goes to stderr and the wait goes on.

--key KEY makes the task unique: while the key is held, enqueue queues nothing
and prints the id of the task that holds it (a note "duplicate of ID" goes to
stderr; --json says "duplicate": true). A key is held while its task is
unfinished and then, by default, as long as its result is kept (result_ttl,
default 7 days), so a cron job that enqueues "report-$(date +%F)" every few
minutes runs once a day. --key-ttl DURATION holds it that long after the task
finished instead (0: only while it is unfinished).

--after ID (repeatable) makes the task wait until those tasks completed; if one
of them fails, is cancelled or expires, this one fails with "dependency failed"
without running. While it waits it counts as scheduled in `omniq status`.
--pass-result gives it the first --after task's result as its first argument.

--from-file reads one JSON object per line: {"func": "mod:fn", "args": [...],
"kwargs": {...}} or {"shell": [argv...]} or {"sh": "command"}, plus any option
of the Python API: "queue", "delay", "eta" (or "at"), "priority", "retries",
"retry_delay", "timeout", "ttl", "result_ttl", "unique_key" (or "key"),
"unique_ttl" (or "key_ttl"), "after" (a task id or a list) and "pass_result";
durations as seconds or "30s", "5m". The
command-line options are the defaults for every line. Ids are printed one per
line, in order. Nothing is queued if any line is bad; errors name the file and
line.
"""


# --- argument parsing (pure, unit-tested) ---------------------------------------------------


def _no_constants(name: str) -> Any:
    # NaN and Infinity are not JSON; taken as JSON they could not be sent anyway.
    raise ValueError(name)


def parse_value(text: str, name: str = "argument") -> Any:
    """A command-line value: its JSON meaning when it is valid JSON, else the text itself.

    Text that starts like a JSON array or object but does not parse is a mistake (a
    lost quote, a cut-off line), not a string: refused with the parse error.
    """
    try:
        return json.loads(text, parse_constant=_no_constants)
    except ValueError as exc:
        if text.lstrip().startswith(("{", "[")):
            raise ValueError(
                f"{name} {text!r} looks like JSON but is not valid JSON ({exc}); to send it "
                f"as a string, give it as a JSON string: {json.dumps(text)!r}"
            ) from None
        return text


def parse_kwarg(text: str) -> tuple[str, Any]:
    """`key=value` (value parsed like a positional argument)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise ValueError(f"-k expects KEY=VALUE with KEY a Python identifier, got {text!r}")
    return key, parse_value(value, f"-k {key}")


def parse_json(text: str, option: str, want: type) -> Any:
    """Strict JSON for --args-json (a list) and --kwargs-json (an object)."""
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except ValueError as exc:
        raise ValueError(f"{option} is not valid JSON: {exc}") from None
    if not isinstance(value, want):
        kind = "an array" if want is list else "an object"
        raise ValueError(f"{option} must be {kind} in JSON, got {type(value).__name__}")
    return value


def parse_at(text: str) -> datetime:
    """An ISO 8601 time as aware UTC; a time without an offset is local time."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--at expects an ISO 8601 time such as 2030-01-31T14:30 (local time) or "
            f"2030-01-31T14:30:00Z, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # naive: the user's local time, as a person means it
    return moment.astimezone(UTC)


def positive_duration(text: str) -> float:
    seconds = common.duration(text)
    if seconds <= 0:
        raise ValueError(f"must be more than zero, got {text!r}")
    return seconds


def check_func_shape(func: str) -> str:
    """`package.module:function` (function may be dotted: Class.method)."""
    module, sep, qualname = func.partition(":")
    parts_ok = all(p.isidentifier() for p in module.split(".")) and all(
        p.isidentifier() for p in qualname.split(".")
    )
    if sep and module and qualname and parts_ok:
        return func
    raise ValueError(
        f"FUNC must look like 'package.module:function', got {func!r}{_shape_hint(func)}"
    )


def _shape_hint(func: str) -> str:
    """A right suggestion for a FUNC without ':': a module names its functions; a dotted
    path whose head is a module suggests head:tail; otherwise nothing is guessed."""
    if ":" in func or not all(p.isidentifier() for p in func.split(".")):
        return ""
    module = _import_quietly(func)
    if module is not None:
        names = [
            name
            for name, value in sorted(vars(module).items())
            if not name.startswith("_")
            and callable(value)
            and getattr(value, "__module__", None) == module.__name__
        ]
        listed = f"; its functions: {', '.join(names)}" if names else ""
        return f"; {func!r} is a module: give '{func}:<function>'{listed}"
    head, _, tail = func.rpartition(".")
    if head and _import_quietly(head) is not None:
        return f"; did you mean '{head}:{tail}'?"
    return ""


def _import_quietly(name: str) -> Any:
    try:
        if importlib.util.find_spec(name) is None:
            return None
        return importlib.import_module(name)
    except Exception:  # any failure just means: no suggestion from this name
        return None


def check_importable(func: str) -> None:
    """The module imports here and has the callable: catches typos before a worker does."""
    module_name, _, qualname = func.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # like `python -m`, but last so it never shadows packages
    skip = " (use --no-check if only the workers have this code)"
    try:
        found = importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ValueError(f"unknown module {module_name!r}: it cannot be imported here{skip}")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(
            f"module {module_name!r} failed to import: {type(exc).__name__}: {exc}{skip}"
        ) from None
    for part in qualname.split("."):
        target = getattr(target, part, _MISSING)
        if target is _MISSING:
            raise ValueError(f"unknown function {qualname!r} in module {module_name!r}{skip}")
    if not callable(target):
        raise ValueError(f"{func!r} is not callable")


_MISSING = object()


# --- what to queue --------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """One task to queue, before the client turns it into a Task."""

    func: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    shell: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # TaskOptions fields
    where: str = ""  # "tasks.jsonl line 3: " for a --from-file line; prefixes its errors


def python_spec(
    func: str,
    args: Iterable[str],
    kwargs: Iterable[str],
    args_json: str | None,
    kwargs_json: str | None,
    options: dict[str, Any],
) -> TaskSpec:
    values = [parse_value(a, f"ARG {n}") for n, a in enumerate(args, start=1)]
    if args_json is not None:
        values.extend(parse_json(args_json, "--args-json", list))
    named: dict[str, Any] = {}
    if kwargs_json is not None:
        named.update(parse_json(kwargs_json, "--kwargs-json", dict))
    named.update(parse_kwarg(k) for k in kwargs)  # -k wins over --kwargs-json
    return TaskSpec(check_func_shape(func), tuple(values), named, options=options)


def shell_spec(argv: list[str], sh: str | None, options: dict[str, Any]) -> TaskSpec:
    if sh is not None:
        if argv:
            raise ValueError("--sh takes the whole command as one string; give no FUNC or ARGS")
        return TaskSpec(SHELL_FUNC, (), {"sh": sh}, shell=True, options=options)
    if not argv:
        raise ValueError("a shell task needs a command: omniq enqueue --shell -- CMD ARGS...")
    return TaskSpec(SHELL_FUNC, tuple(argv), {}, shell=True, options=options)


# --from-file option fields: the Python API's names (TaskOptions), and the command-line
# flag names where they differ. Each maps to its TaskOptions field.
_LINE_NAMES = {
    "queue": "queue",
    "delay": "delay",
    "eta": "eta",
    "at": "eta",
    "priority": "priority",
    "retries": "retries",
    "retry_delay": "retry_delay",
    "timeout": "timeout",
    "ttl": "ttl",
    "result_ttl": "result_ttl",
    "unique_key": "unique_key",
    "key": "unique_key",
    "unique_ttl": "unique_ttl",
    "key_ttl": "unique_ttl",
    "after": "after",
    "pass_result": "pass_result",
}
_LINE_FIELDS = frozenset(("func", "args", "kwargs", "shell", "sh", *_LINE_NAMES))


def spec_from_line(text: str, defaults: dict[str, Any]) -> TaskSpec:
    """One --from-file line; ValueError says what is wrong with it."""
    try:
        obj = json.loads(text, parse_constant=_no_constants)
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _LINE_FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}")
    options = {**defaults, **line_options(obj)}
    if "shell" in obj or "sh" in obj:
        return _shell_line(obj, options)
    func = obj.get("func")
    if not isinstance(func, str):
        raise ValueError('needs "func": "package.module:function" (or "shell" / "sh")')
    args, kwargs = obj.get("args", []), obj.get("kwargs", {})
    if not isinstance(args, list):
        raise ValueError('"args" must be a JSON array')
    if not isinstance(kwargs, dict):
        raise ValueError('"kwargs" must be a JSON object')
    return TaskSpec(check_func_shape(func), tuple(args), kwargs, options=options)


def _shell_line(obj: dict[str, Any], options: dict[str, Any]) -> TaskSpec:
    if "func" in obj or "args" in obj or "kwargs" in obj:
        raise ValueError('a shell line has "shell" or "sh", not "func", "args" or "kwargs"')
    argv, sh = obj.get("shell"), obj.get("sh")
    if argv is not None and sh is not None:
        raise ValueError('give "shell" (argv) or "sh" (a string), not both')
    if sh is not None and not isinstance(sh, str):
        raise ValueError('"sh" must be a string')
    if argv is not None and not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        raise ValueError('"shell" must be an array of strings')
    return shell_spec(argv or [], sh, options)


def line_options(obj: dict[str, Any]) -> dict[str, Any]:
    """TaskOptions fields from the option fields of one JSON line."""
    options: dict[str, Any] = {}
    for name in obj.keys() & _LINE_NAMES.keys():
        target = _LINE_NAMES[name]
        if target in options:
            twins = sorted(n for n in obj if _LINE_NAMES.get(n) == target)
            raise ValueError(f"give one of {', '.join(map(repr, twins))}, not both")
        options[target] = _line_option(obj, name, target)
    if "delay" in options and "eta" in options:
        raise ValueError('give "delay" or "at", not both')
    return options


def _line_option(obj: dict[str, Any], name: str, target: str) -> Any:
    plain = _PLAIN_FIELDS.get(target)
    if plain is not None:
        return plain(obj, name)
    seconds = common.duration(_duration_text(obj, name))
    if target in ("timeout", "ttl", "result_ttl") and seconds <= 0:
        raise ValueError(f'"{name}" must be more than zero, got {obj[name]!r}')
    return seconds


# The option fields that are not durations, and how each is read.
_PLAIN_FIELDS: dict[str, Any] = {
    "queue": lambda obj, name: common.check_queue(_typed(obj, name, str)),
    "eta": lambda obj, name: parse_at(_typed(obj, name, str)),
    "unique_key": lambda obj, name: _typed(obj, name, str),
    "priority": lambda obj, name: _typed(obj, name, int),
    "retries": lambda obj, name: _non_negative(_typed(obj, name, int), name),
    "after": lambda obj, name: _after_ids(obj[name]),
    "pass_result": lambda obj, name: _typed(obj, name, bool),
}


_KINDS = {str: "a string", int: "an integer", bool: "true or false"}


def _typed(obj: dict[str, Any], name: str, kind: type) -> Any:
    value = obj[name]
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise ValueError(f'"{name}" must be {_KINDS[kind]}')
    return value


def _after_ids(value: Any) -> tuple[str, ...]:
    """"after": one task id or a list of them."""
    ids = [value] if isinstance(value, str) else value
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise ValueError('"after" must be a task id or a list of task ids')
    return tuple(common.check_task_id(i) for i in ids)


def _duration_text(obj: dict[str, Any], name: str) -> str:
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f'"{name}" must be a duration such as 30, "30s" or "5m"')
    return str(value)


def _non_negative(value: int, name: str) -> int:
    if value < 0:
        raise ValueError(f'"{name}" cannot be negative')
    return value


def read_specs(source: str, defaults: dict[str, Any]) -> list[TaskSpec]:
    """Every task of a JSON-lines file ('-' = stdin); a bad line names its number."""
    name = "stdin" if source == "-" else source
    specs = []
    for number, text in _lines(source):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        where = f"{name} line {number}: "
        try:
            spec = spec_from_line(text, defaults)
        except ValueError as exc:
            raise ValueError(f"{where}{exc}") from None
        specs.append(dataclasses.replace(spec, where=where))
    return specs


def _lines(source: str) -> Iterator[tuple[int, str]]:
    if source == "-":
        yield from enumerate(sys.stdin, start=1)
        return
    try:
        with open(source, encoding="utf-8") as handle:
            yield from enumerate(handle, start=1)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {source}: {exc}") from None


# --- queueing -------------------------------------------------------------------------------


def _build(client: AsyncOmniQ, spec: TaskSpec) -> Task:
    from omniq.client import TaskOptions
    from omniq.errors import SerializationError
    from omniq.models import TaskKind

    try:
        task = client.build_task(spec.func, spec.args, spec.kwargs, TaskOptions(**spec.options))
    except (ValueError, SerializationError) as exc:
        if not spec.where:
            raise
        raise type(exc)(f"{spec.where}{exc}") from None
    return dataclasses.replace(task, kind=TaskKind.SHELL) if spec.shell else task


def _record(task: Task, task_id: str) -> dict[str, Any]:
    duplicate = task_id != task.id
    eta = console.iso(task.eta) if task.eta and not duplicate else None
    return {"id": task_id, "queue": task.queue, "func": task.func, "eta": eta,
            "duplicate": duplicate}  # fmt: skip


def _report(task: Task, task_id: str, as_json: bool, flush: bool = True) -> None:
    if as_json:
        console.json_line(_record(task, task_id), flush=flush)
    else:
        console.line(task_id, flush=flush)


async def _report_duplicate(client: AsyncOmniQ, task: Task, holder: str) -> None:
    """One line on stderr: which task holds the key, and until when."""
    from omniq.errors import OmniQError

    ttl = task.unique_ttl
    until = "while it is unfinished"
    if ttl is None:
        until = "while it is unfinished and as long as its result is kept"
    elif ttl > 0:
        until = f"while it is unfinished and for {_human(ttl)} after it finished"
    with contextlib.suppress(OmniQError):
        done = await client.wait_result(holder, 0)
        if ttl is not None and ttl > 0:
            until = f"until {console.iso(done.finished_at + timedelta(seconds=ttl))}"
        elif ttl is None and done.expires_at is not None:
            until = f"until {console.iso(done.expires_at)} (its result's expiry)"
        elif ttl is None:
            until = "as long as its result is kept"
    console.info(f"duplicate of {holder}: key {task.unique_key!r} is held {until}")


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


async def _enqueue_one(
    config: OmniQConfig, spec: TaskSpec, as_json: bool, wait: bool, wait_timeout: float | None
) -> int:
    async with common.open_client(config) as client:
        task = _build(client, spec)
        task_id = await client.submit(task)
        if task_id != task.id:
            await _report_duplicate(client, task, task_id)
        if not wait:
            _report(task, task_id, as_json)
            return ExitCode.OK
        # Waiting: stdout carries only the outcome, so x=$(omniq enqueue ... --wait) works.
        if not as_json:
            console.info(task_id)
        from omniq.cli.inspect_cmd import show_result, wait_result

        outcome = await wait_result(client, task_id, wait_timeout, task.queue)
        return show_result(outcome, as_json, _record(task, task_id) if as_json else None)


async def _enqueue_all(config: OmniQConfig, specs: list[TaskSpec], as_json: bool) -> None:
    async with common.open_client(config) as client:
        tasks = [_build(client, spec) for spec in specs]  # refuses bad input before queueing
        with console.progress(len(tasks), "queueing") as meter:
            for start in range(0, len(tasks), BATCH):
                batch = tasks[start : start + BATCH]
                # Events in one write; tasks in file order, which is the queue's FIFO order.
                for task, task_id in zip(batch, await client.submit_many(batch), strict=True):
                    _report(task, task_id, as_json, flush=False)
                    if task_id != task.id:
                        await _report_duplicate(client, task, task_id)
                sys.stdout.flush()
                meter.advance(len(batch))


# --- the command ----------------------------------------------------------------------------


def duration_option(flag: str, help: str, positive: bool = False) -> Any:
    """A DURATION option (`positive`: more than zero); also used by `omniq schedule add`."""
    kind = common.Checked("duration", positive_duration) if positive else common.DURATION
    return click.option(flag, type=kind, metavar="DURATION", help=help)


_duration = duration_option


@common.command("enqueue", help=HELP, epilog=EPILOG)
@click.argument("func", metavar="FUNC", required=False)
@click.argument("args", metavar="[ARGS]...", nargs=-1)
@click.option(
    "--kwarg", "-k", metavar="KEY=VALUE", multiple=True, help="Keyword argument (repeatable)."
)
@click.option("--args-json", metavar="JSON", help="Arguments as a JSON array (after ARGS).")
@click.option("--kwargs-json", metavar="JSON", help="Keyword arguments as a JSON object.")
@common.queue_option("Queue (default: the default_queue setting).")
@_duration("--delay", "Run no sooner than this from now: 30s, 5m, 2h.")
@click.option("--at", metavar="TIME", help="Run no sooner than this ISO time (local by default).")
@click.option("--priority", type=int, default=0, metavar="N", help="Higher runs first.")
@click.option("--retries", type=click.IntRange(min=0), metavar="N", help="Retries after a failure.")
@_duration("--retry-delay", "First retry's delay; later ones back off exponentially.")
@_duration("--timeout", "Time limit per attempt.", positive=True)
@_duration("--ttl", "Expire unless a worker starts it within this.", positive=True)
@_duration("--result-ttl", "Keep the result this long (default: result_ttl).", positive=True)
@click.option(
    "--key", metavar="KEY", help="Unique key: while it is held, print the holder's id instead."
)
@_duration("--key-ttl", "Hold --key this long after the task finished (default: its result's).")
@click.option(
    "--after", metavar="TASK_ID", type=common.TASK_ID, multiple=True,
    help="Run only once this task completed (repeatable; see above).",
)
@click.option("--pass-result", is_flag=True, help="Pass the first --after task's result first.")
@click.option("--wait", is_flag=True, help="Wait for the outcome and print it (see above).")
@_duration("--wait-timeout", "Stop waiting after this, exit 3 (implies --wait).")
@common.json_option("Print one JSON object per task (with --wait: with its result).")
@click.option(
    "--from-file", metavar="PATH", help="Queue the tasks of a JSON-lines file ('-': stdin)."
)
@click.option(
    "--shell", is_flag=True, help="FUNC ARGS... is a command to run (needs worker --allow-shell)."
)
@click.option("--sh", metavar="COMMAND", help="A command string for /bin/sh (needs --allow-shell).")
@click.option("--no-check", is_flag=True, help="Do not import FUNC's module to check it exists.")
def enqueue(
    func: str | None,
    args: tuple[str, ...],
    kwarg: tuple[str, ...],
    args_json: str | None,
    kwargs_json: str | None,
    wait: bool,
    wait_timeout: float | None,
    as_json: bool,
    from_file: str | None,
    shell: bool,
    sh: str | None,
    no_check: bool,
    **given: Any,
) -> int:
    options = task_options(**given)
    if from_file is not None:
        single = (func, args_json, kwargs_json, given["key"], sh)
        if any(v is not None for v in single) or args or kwarg or wait or wait_timeout or shell:
            raise ValueError(
                "--from-file takes the tasks from the file: give no FUNC, ARGS, -k, --args-json, "
                "--kwargs-json, --key, --wait, --shell or --sh with it"
            )
        specs = read_specs(from_file, options)
        check_specs(specs, no_check)
        common.run_async(_enqueue_all(common.load_config(), specs, as_json))
        return ExitCode.OK
    spec = one_spec(func, list(args), list(kwarg), args_json, kwargs_json, shell, sh, options)
    check_specs([spec], no_check)
    waiting = wait or wait_timeout is not None
    config = common.load_config()
    return common.run_async(_enqueue_one(config, spec, as_json, waiting, wait_timeout))


def task_options(
    queue: str | None = None,
    delay: float | None = None,
    at: str | None = None,
    priority: int = 0,
    retries: int | None = None,
    timeout: float | None = None,
    ttl: float | None = None,
    key: str | None = None,
    retry_delay: float | None = None,
    result_ttl: float | None = None,
    key_ttl: float | None = None,
    after: tuple[str, ...] = (),
    pass_result: bool = False,
) -> dict[str, Any]:
    """TaskOptions fields from the options the user gave (the rest stay config defaults)."""
    if delay is not None and at is not None:
        raise ValueError("give --delay or --at, not both")
    if key_ttl is not None and key is None:
        raise ValueError("--key-ttl needs --key")
    if pass_result and not after:
        raise ValueError("--pass-result needs --after TASK_ID (the task whose result to pass)")
    given = {
        "queue": queue,
        "delay": delay,
        "eta": parse_at(at) if at is not None else None,
        "priority": priority or None,
        "retries": retries,
        "retry_delay": retry_delay,
        "timeout": timeout,
        "ttl": ttl,
        "result_ttl": result_ttl,
        "unique_key": key,
        "unique_ttl": key_ttl,
        "after": tuple(after) or None,
        "pass_result": pass_result or None,
    }
    return {name: value for name, value in given.items() if value is not None}


def one_spec(
    func: str | None,
    args: list[str],
    kwarg: list[str],
    args_json: str | None,
    kwargs_json: str | None,
    shell: bool,
    sh: str | None,
    options: dict[str, Any],
) -> TaskSpec:
    if shell or sh is not None:
        if shell and sh is not None:
            raise ValueError("give --shell (a command line) or --sh (a string), not both")
        if kwarg or args_json is not None or kwargs_json is not None:
            raise ValueError("shell tasks take no -k, --args-json or --kwargs-json")
        return shell_spec([func, *args] if func is not None else [], sh, options)
    if func is None:
        raise ValueError("missing FUNC, e.g. omniq enqueue omniq.examples:add 2 3")
    return python_spec(func, args, kwarg, args_json, kwargs_json, options)


def check_specs(specs: list[TaskSpec], no_check: bool) -> None:
    if no_check:
        return
    checked: set[str] = set()
    for spec in specs:
        if spec.shell or spec.func in checked:
            continue
        checked.add(spec.func)
        try:
            check_importable(spec.func)
        except ValueError as exc:
            raise ValueError(f"{spec.where}{exc}") from None


COMMANDS = {"enqueue": enqueue}
