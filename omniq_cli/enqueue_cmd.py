"""`omniq enqueue`: queue a Python call or a shell command, or many tasks from JSON lines."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

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
    "omniq enqueue myapp.tasks:nightly --at 2030-01-31T02:00 --key nightly-2030-01-31",
    "omniq enqueue omniq.examples:add 2 3 --wait --wait-timeout 30s",
    "omniq enqueue omniq.examples:add -- -1 2          # '--' before negative numbers",
    "omniq enqueue --from-file tasks.jsonl            # or '-' for stdin",
    "omniq enqueue --shell -- tar czf /tmp/b.tgz /srv",
    "omniq enqueue --sh 'pg_dump app | gzip > /tmp/app.sql.gz'",
)

HELP = """Queue a task and print its id.

FUNC is an import path 'package.module:function'. Each ARG is parsed as JSON
when it is valid JSON (2, 2.5, true, null, "[1, 2]", '{"a": 1}'), else taken as
a string. The module must be importable here unless --no-check is given (for
producers that do not have the task code).

--at takes an ISO 8601 time; without a UTC offset it is local time.

--from-file reads one JSON object per line: {"func": "mod:fn", "args": [...],
"kwargs": {...}} or {"shell": [argv...]} or {"sh": "command"}, plus any of
"queue", "delay", "at", "priority", "retries", "timeout", "ttl", "key". The
command-line options are the defaults for every line. Ids are printed one per
line, in order. Nothing is queued if any line is bad.
"""


# --- argument parsing (pure, unit-tested) ---------------------------------------------------


def _no_constants(name: str) -> Any:
    # NaN and Infinity are not JSON; taken as JSON they could not be sent anyway.
    raise ValueError(name)


def parse_value(text: str) -> Any:
    """A command-line value: its JSON meaning when it is valid JSON, else the text itself."""
    try:
        return json.loads(text, parse_constant=_no_constants)
    except ValueError:
        return text


def parse_kwarg(text: str) -> tuple[str, Any]:
    """`key=value` (value parsed like a positional argument)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise ValueError(f"-k expects KEY=VALUE with KEY a Python identifier, got {text!r}")
    return key, parse_value(value)


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
    hint = ""
    if not sep and "." in func:
        head, _, tail = func.rpartition(".")
        hint = f"; did you mean '{head}:{tail}'?"
    raise ValueError(f"FUNC must look like 'package.module:function', got {func!r}{hint}")


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


def python_spec(
    func: str,
    args: Iterable[str],
    kwargs: Iterable[str],
    args_json: str | None,
    kwargs_json: str | None,
    options: dict[str, Any],
) -> TaskSpec:
    values = [parse_value(a) for a in args]
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


_LINE_OPTIONS = ("queue", "delay", "at", "priority", "retries", "timeout", "ttl", "key")
_LINE_FIELDS = frozenset(("func", "args", "kwargs", "shell", "sh", *_LINE_OPTIONS))


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
    if "queue" in obj:
        options["queue"] = common.check_queue(_typed(obj, "queue", str))
    if "delay" in obj:
        options["delay"] = common.duration(_duration_text(obj, "delay"))
    if "at" in obj:
        options["eta"] = parse_at(_typed(obj, "at", str))
    if "priority" in obj:
        options["priority"] = _typed(obj, "priority", int)
    if "retries" in obj:
        options["retries"] = _non_negative(_typed(obj, "retries", int), "retries")
    for name in ("timeout", "ttl"):
        if name in obj:
            options[name] = positive_duration(_duration_text(obj, name))
    if "key" in obj:
        options["unique_key"] = _typed(obj, "key", str)
    if "delay" in options and "eta" in options:
        raise ValueError('give "delay" or "at", not both')
    return options


def _typed(obj: dict[str, Any], name: str, kind: type) -> Any:
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f'"{name}" must be {"a string" if kind is str else "an integer"}')
    return value


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
        try:
            specs.append(spec_from_line(text, defaults))
        except ValueError as exc:
            raise ValueError(f"{name} line {number}: {exc}") from None
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
    from omniq.models import TaskKind

    task = client.build_task(spec.func, spec.args, spec.kwargs, TaskOptions(**spec.options))
    return dataclasses.replace(task, kind=TaskKind.SHELL) if spec.shell else task


def _report(task: Task, task_id: str, as_json: bool, flush: bool = True) -> None:
    duplicate = task_id != task.id
    if as_json:
        eta = console.iso(task.eta) if task.eta and not duplicate else None
        record = {"id": task_id, "queue": task.queue, "func": task.func, "eta": eta}
        console.json_line({**record, "duplicate": duplicate}, flush=flush)
    else:
        console.line(task_id, flush=flush)
    if duplicate:
        console.info(f"a task with key {task.unique_key!r} is already queued: {task_id}")


async def _enqueue_one(
    config: OmniQConfig, spec: TaskSpec, as_json: bool, wait: bool, wait_timeout: float | None
) -> ExitCode:
    async with common.open_client(config) as client:
        task = _build(client, spec)
        task_id = await client.submit(task)
        _report(task, task_id, as_json)
        if not wait:
            return ExitCode.OK
        from omniq.cli.inspect_cmd import show_result

        return show_result(await client.wait_result(task_id, wait_timeout), as_json)


async def _enqueue_all(config: OmniQConfig, specs: list[TaskSpec], as_json: bool) -> None:
    async with common.open_client(config) as client:
        tasks = [_build(client, spec) for spec in specs]  # refuses bad input before queueing
        with console.progress(len(tasks), "queueing") as meter:
            for start in range(0, len(tasks), BATCH):
                batch = tasks[start : start + BATCH]
                # Events in one write; tasks in file order, which is the queue's FIFO order.
                for task, task_id in zip(batch, await client.submit_many(batch), strict=True):
                    _report(task, task_id, as_json, flush=False)
                sys.stdout.flush()
                meter.advance(len(batch))


# --- the command ----------------------------------------------------------------------------


def _opt(*decls: str, help: str, **kwargs: Any) -> Any:
    return typer.Option(*decls, help=help, show_default=False, **kwargs)


def _duration_opt(parser: Any, help: str) -> Any:
    return _opt(parser=parser, metavar="DURATION", help=help)


FuncArg = Annotated[
    str | None,
    typer.Argument(
        metavar="FUNC", help="Import path 'package.module:function'.", show_default=False
    ),
]
ArgsArg = Annotated[
    list[str] | None,
    typer.Argument(metavar="ARGS", help="Arguments (JSON or strings).", show_default=False),
]
KwargOpt = Annotated[
    list[str] | None,
    _opt("--kwarg", "-k", metavar="KEY=VALUE", help="Keyword argument (repeatable)."),
]
ArgsJsonOpt = Annotated[
    str | None, _opt("--args-json", metavar="JSON", help="Arguments as a JSON array (after ARGS).")
]
KwargsJsonOpt = Annotated[
    str | None, _opt("--kwargs-json", metavar="JSON", help="Keyword arguments as a JSON object.")
]
QueueOpt = Annotated[str | None, common.queue_option("Queue (default: default_queue).")]
DelayOpt = Annotated[
    float | None, _duration_opt(common.duration, "Run no sooner than this from now: 30s, 5m, 2h.")
]
AtOpt = Annotated[
    str | None,
    _opt("--at", metavar="TIME", help="Run no sooner than this ISO time (local time by default)."),
]
PriorityOpt = Annotated[int, typer.Option(metavar="N", help="Higher runs first.")]
RetriesOpt = Annotated[
    int | None, _opt(min=0, metavar="N", help="Retries after a failure (default: config).")
]
TimeoutOpt = Annotated[float | None, _duration_opt(positive_duration, "Time limit per attempt.")]
TtlOpt = Annotated[
    float | None, _duration_opt(positive_duration, "Expire unless started within this.")
]
KeyOpt = Annotated[
    str | None,
    _opt("--key", metavar="KEY", help="Unique key: print the unfinished task's id instead."),
]
WaitOpt = Annotated[
    bool, typer.Option("--wait", help="Wait for the outcome; exit 0 ok, 1 failed, 3 timed out.")
]
WaitTimeoutOpt = Annotated[
    float | None, _duration_opt(common.duration, "Stop waiting after this (implies --wait).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON objects.")]
FromFileOpt = Annotated[
    str | None,
    _opt("--from-file", metavar="PATH", help="Queue the tasks of a JSON-lines file ('-': stdin)."),
]
ShellOpt = Annotated[
    bool,
    typer.Option(
        "--shell", help="FUNC ARGS... is a command to run (needs a worker --allow-shell)."
    ),
]
ShOpt = Annotated[
    str | None,
    _opt("--sh", metavar="COMMAND", help="A command string for /bin/sh (needs --allow-shell)."),
]
NoCheckOpt = Annotated[
    bool, typer.Option("--no-check", help="Do not import FUNC's module to check that it exists.")
]


def enqueue(
    func: FuncArg = None,
    args: ArgsArg = None,
    kwarg: KwargOpt = None,
    args_json: ArgsJsonOpt = None,
    kwargs_json: KwargsJsonOpt = None,
    queue: QueueOpt = None,
    delay: DelayOpt = None,
    at: AtOpt = None,
    priority: PriorityOpt = 0,
    retries: RetriesOpt = None,
    timeout: TimeoutOpt = None,
    ttl: TtlOpt = None,
    key: KeyOpt = None,
    wait: WaitOpt = False,
    wait_timeout: WaitTimeoutOpt = None,
    as_json: JsonOpt = False,
    from_file: FromFileOpt = None,
    shell: ShellOpt = False,
    sh: ShOpt = None,
    no_check: NoCheckOpt = False,
) -> None:
    options = task_options(queue, delay, at, priority, retries, timeout, ttl, key)
    if from_file is not None:
        single = (func, args, kwarg, args_json, kwargs_json, key, sh)
        if any(value is not None for value in single) or wait or wait_timeout or shell:
            raise ValueError(
                "--from-file takes the tasks from the file: give no FUNC, ARGS, -k, --args-json, "
                "--kwargs-json, --key, --wait, --shell or --sh with it"
            )
        specs = read_specs(from_file, options)
        check_specs(specs, no_check)
        common.run_async(_enqueue_all(common.load_config(), specs, as_json))
        return
    spec = one_spec(func, args or [], kwarg or [], args_json, kwargs_json, shell, sh, options)
    check_specs([spec], no_check)
    waiting = wait or wait_timeout is not None
    config = common.load_config()
    raise typer.Exit(common.run_async(_enqueue_one(config, spec, as_json, waiting, wait_timeout)))


def task_options(
    queue: str | None,
    delay: float | None,
    at: str | None,
    priority: int,
    retries: int | None,
    timeout: float | None,
    ttl: float | None,
    key: str | None,
) -> dict[str, Any]:
    """TaskOptions fields from the options the user gave (the rest stay config defaults)."""
    if delay is not None and at is not None:
        raise ValueError("give --delay or --at, not both")
    given = {
        "queue": queue,
        "delay": delay,
        "eta": parse_at(at) if at is not None else None,
        "priority": priority or None,
        "retries": retries,
        "timeout": timeout,
        "ttl": ttl,
        "unique_key": key,
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
    for func in sorted({s.func for s in specs if not s.shell}):
        check_importable(func)


def register(app: typer.Typer, name: str | None = None) -> None:
    """Add this module's command to `app`."""
    common.command(app, "enqueue", help=HELP, epilog=EPILOG)(enqueue)
