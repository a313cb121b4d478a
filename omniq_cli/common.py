"""Plumbing shared by every `omniq` command.

For command authors (the worker daemon included):

- `command(name, **click_kwargs)`: a decorator making a function a click command
  with `--config PATH` and `-v/--verbose` added, so they work both before and
  after the command name; their values are recorded in the shared `State`.
  The function returns its exit code (None = 0).
- `load_config(ctx_or_state=None, **overrides) -> OmniQConfig`: the effective
  configuration: defaults < YAML (`--config`, else the lookup) < environment <
  `overrides`. Pass only flags the user gave: None values are dropped.
  Raises ConfigError (exit 78 through the handler).
- `run_async(coro)`: run a coroutine to completion (`asyncio.run`); Ctrl-C cancels
  it, so its `finally` blocks close the stores, then KeyboardInterrupt propagates.
- `open_client(config)`: async context manager yielding an open `AsyncOmniQ`.
- `handle_errors()`: the single top-level error handler (context manager or
  decorator). It turns exceptions into one or two lines on stderr and an exit
  code (`SystemExit`): ConfigError 78; BackendUnavailable, BackendError and
  MissingDependency (with its install hint) 69; TaskNotFound and ScheduleNotFound 4;
  ResultTimeout 3; Refused and TaskStateError 5; TaskFailed and its kinds 1;
  SerializationError, ValueError and usage errors 2; Ctrl-C 130; any other error 1.
  Tracebacks only with `-v`. `main()` wraps every command in it, so commands just raise.
- Parameter types for click options: `DURATION`, `TASK_ID`, `QUEUE` (a bad value
  is a usage error naming the option), and `examples(...)` for help epilogs.

The CLI is plain click (public API only): each option value is converted by the
small types below, so a short command pays for nothing else. Nothing here imports
the client, a backend or rich at import time: `omniq --help` stays fast.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from click import exceptions as click_exceptions

from omniq.cli import console
from omniq.cli.exit_codes import ExitCode

if TYPE_CHECKING:
    from omniq.client import AsyncOmniQ
    from omniq.config import OmniQConfig

T = TypeVar("T")
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

# click >= 8.2 raises this for a group called without a command; older ones print and exit 0.
_NO_ARGS_IS_HELP: Any = getattr(click_exceptions, "NoArgsIsHelpError", ())
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Refused(Exception):
    """The task's state does not allow the operation, or the user declined it (exit 5)."""


# --- global options and state -------------------------------------------------------------


@dataclass
class State:
    """What the global options asked for; one per process (one command per process)."""

    config_path: str | None = None
    verbose: bool = False


STATE = State()


def remember(config_path: str | None, verbose: bool) -> None:
    """Record global options given at any position (`omniq -v cmd` or `omniq cmd -v`)."""
    if config_path is not None:
        STATE.config_path = config_path
    if verbose:
        STATE.verbose = True
        _debug_logging()


def _debug_logging() -> None:
    import logging

    logger = logging.getLogger("omniq")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


def _remember_config(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    remember(value, False)


def _remember_verbose(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    remember(None, value)


def global_options() -> list[click.Parameter]:
    """`--config PATH` and `-v/--verbose`, for the root and for every command."""
    return [
        click.Option(
            ["--config"],
            metavar="PATH",
            expose_value=False,
            callback=_remember_config,
            help="YAML config file (default: $OMNIQ_CONFIG, ./omniq.yaml, user config dir).",
        ),
        click.Option(
            ["-v", "--verbose"],
            is_flag=True,
            expose_value=False,
            callback=_remember_verbose,
            help="Debug logging and tracebacks on errors.",
        ),
    ]


def command(name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], click.Command]:
    """`@command("result", epilog=...)` over click option decorators: a command with the
    global options; the function's return value is the exit code."""

    def build(func: Callable[..., Any]) -> click.Command:
        kwargs.setdefault("context_settings", CONTEXT)
        cmd = click.command(name, **kwargs)(func)
        cmd.params.extend(global_options())
        return cmd

    return build


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        from omniq import __version__

        console.line(f"omniq {__version__}")
        ctx.exit(ExitCode.OK)


def version_option() -> click.Option:
    return click.Option(
        ["--version"],
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_print_version,
        help="Print the version and exit.",
    )


# --- configuration and the client ---------------------------------------------------------


def load_config(ctx_or_state: Any = None, **overrides: Any) -> OmniQConfig:
    """The effective configuration for this command; None overrides are dropped."""
    from omniq.config import OmniQConfig

    state = ctx_or_state if isinstance(ctx_or_state, State) else STATE
    values = {key: value for key, value in overrides.items() if value is not None}
    return OmniQConfig.load(state.config_path, **values)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    import asyncio

    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def open_client(config: OmniQConfig) -> AsyncIterator[AsyncOmniQ]:
    from omniq.client import AsyncOmniQ

    client = AsyncOmniQ(config)
    try:
        await client.open()
        yield client
    finally:
        await client.close(drain=False)


# --- argument parsers ---------------------------------------------------------------------


def duration(text: str) -> float:
    """Seconds from "30", "30s", "5m", "2h", "1h30m", "500ms"."""
    from omniq.config import parse_duration

    seconds = parse_duration(text)
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {text!r}")
    return seconds


def check_task_id(value: str) -> str:
    from omniq.models import is_task_id

    norm = value.strip().lower()
    if not is_task_id(norm):
        raise ValueError(
            f"{value!r} is not a task id (ids look like 0190a5c4-7b1e-7c3d-8a2b-1f2e3d4c5b6a)"
        )
    return norm


def check_queue(value: str) -> str:
    from omniq.models import check_queue_name

    return check_queue_name(value)


class Checked(click.ParamType):
    """A click type from a check function: its ValueError is a usage error (exit 2)."""

    def __init__(self, name: str, check: Callable[[str], Any]) -> None:
        self.name = name
        self.check = check

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value  # a default, or converted already
        try:
            return self.check(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Checked("duration", duration)
TASK_ID = Checked("task_id", check_task_id)
QUEUE = Checked("queue", check_queue)


def task_id_argument() -> Decorator:
    return click.argument("task_id", metavar="TASK_ID", type=TASK_ID)


def queue_option(help: str, multiple: bool = False) -> Decorator:
    """`-q/--queue NAME`, validated before it reaches any store."""
    return click.option("--queue", "-q", metavar="NAME", type=QUEUE, multiple=multiple, help=help)


def json_option(help: str = "Print JSON.") -> Decorator:
    return click.option("--json", "as_json", is_flag=True, help=help)


def examples(*lines: str) -> str:
    """A help epilog of example commands, kept as written (click's \\b: no rewrapping)."""
    return "\b\nExamples:\n" + "\n".join(f"  {text}" for text in lines)


# --- the top-level error handler ------------------------------------------------------------


def _exit_code_for(exc: BaseException) -> tuple[ExitCode, str]:
    from omniq import errors
    from omniq.operate import ScheduleNotFound

    table: tuple[tuple[type[BaseException], ExitCode], ...] = (
        (errors.ConfigError, ExitCode.CONFIG),
        (errors.BackendUnavailable, ExitCode.UNAVAILABLE),
        (errors.BackendError, ExitCode.UNAVAILABLE),
        (errors.MissingDependency, ExitCode.UNAVAILABLE),
        (errors.TaskNotFound, ExitCode.NOT_FOUND),
        (ScheduleNotFound, ExitCode.NOT_FOUND),
        (errors.ResultTimeout, ExitCode.PENDING),
        (errors.TaskFailed, ExitCode.TASK_FAILED),
        (errors.TaskStateError, ExitCode.REFUSED),
        (Refused, ExitCode.REFUSED),
        (errors.SerializationError, ExitCode.USAGE),
        (errors.OmniQError, ExitCode.TASK_FAILED),
        (ValueError, ExitCode.USAGE),
    )
    for kind, code in table:
        if isinstance(exc, kind):
            return code, errors.redact(str(exc)) or type(exc).__name__
    return ExitCode.TASK_FAILED, errors.redact(f"unexpected {type(exc).__name__}: {exc}")


def _usage_message(exc: Any) -> str:
    text = exc.format_message()
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        return f"{text}\n(see '{ctx.command_path} --help')"
    return str(text)


def fail(exc: BaseException) -> NoReturn:
    """Print `exc` the way users should see it and exit with its code."""
    if STATE.verbose:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, _NO_ARGS_IS_HELP):  # `omniq` or `omniq config` alone: show the help
        console.line(exc.format_message())
        raise SystemExit(ExitCode.USAGE)
    if isinstance(exc, click_exceptions.UsageError):
        console.error(_usage_message(exc))
        raise SystemExit(ExitCode.USAGE)
    if isinstance(exc, click_exceptions.ClickException):
        console.error(exc.format_message())
        raise SystemExit(exc.exit_code)
    if isinstance(exc, KeyboardInterrupt | click_exceptions.Abort):
        console.info("interrupted")
        raise SystemExit(ExitCode.INTERRUPTED)
    code, message = _exit_code_for(exc)
    if code == ExitCode.TASK_FAILED and not _is_omniq_error(exc) and not STATE.verbose:
        message += " (run with -v for the traceback)"
    console.error(message)
    raise SystemExit(code)


def _is_omniq_error(exc: BaseException) -> bool:
    from omniq.errors import OmniQError

    return isinstance(exc, OmniQError)


@contextlib.contextmanager
def handle_errors() -> Iterator[None]:
    """Map any exception raised inside to a message and an exit code (see module doc)."""
    try:
        yield
    except SystemExit:
        raise
    except BaseException as exc:  # the one place that renders every error
        fail(exc)
