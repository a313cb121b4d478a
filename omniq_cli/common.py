"""Plumbing shared by every `omniq` command.

For command authors (the worker daemon included):

- `command(app, name, **typer_kwargs)`: register a command function on the app.
  It adds `--config PATH` and `-v/--verbose` to the command (unless the function
  declares parameters of those names), so they work both before and after the
  command name, and records them in the shared `State`.
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
  MissingDependency (with its install hint) 69; TaskNotFound 4; ResultTimeout 3;
  TaskFailed and its kinds 1; SerializationError, ValueError and usage errors 2;
  Ctrl-C 130; any other error 1. Tracebacks only with `-v`. `main()` wraps every
  command in it, so commands just raise.
- Parsers for typer options: `duration` (`parser=`), `validate_task_id`,
  `validate_queue` (`callback=`), and `examples(...)` for help epilogs.

Nothing here imports the client, a backend or rich at import time: `omniq --help`
stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from omniq.cli import console
from omniq.cli.exit_codes import ExitCode

if TYPE_CHECKING:
    from omniq.client import AsyncOmniQ
    from omniq.config import OmniQConfig

T = TypeVar("T")

try:  # typer >= 0.16 vendors click; older releases use the click package itself
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

# click >= 8.2 raises this for a group called without a command; older ones print and exit 0.
_NO_ARGS_IS_HELP: Any = getattr(click_exceptions, "NoArgsIsHelpError", ())


# --- global options and state -------------------------------------------------------------


@dataclass
class State:
    """What the global options asked for; one per process (one command per process)."""

    config_path: str | None = None
    verbose: bool = False


STATE = State()

ConfigOption = Annotated[
    str | None,
    typer.Option(
        "--config",
        metavar="PATH",
        help="YAML config file (default: $OMNIQ_CONFIG, ./omniq.yaml, user config dir).",
        show_default=False,
    ),
]
VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="Debug logging and tracebacks on errors.")
]


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


_GLOBAL_PARAMS = (
    ("config", ConfigOption, None),
    ("verbose", VerboseOption, False),
)


def command(app: typer.Typer, name: str, **typer_kwargs: Any) -> Callable[[T], T]:
    """Register `func` as command `name` with `--config` and `-v` added to its options."""

    def register(func: T) -> T:
        app.command(name, **typer_kwargs)(with_global_options(func))  # type: ignore[arg-type]
        return func

    return register


def with_global_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` with `--config`/`-v` appended to its signature (typer reads `__signature__`)."""
    signature = inspect.signature(func, eval_str=True)
    taken = set(signature.parameters)
    extra = {
        f"omniq_{name}": (name, annotation, default)
        for name, annotation, default in _GLOBAL_PARAMS
        if name not in taken
    }

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = {name: kwargs.pop(key) for key, (name, _, _) in extra.items()}
        remember(given.get("config"), bool(given.get("verbose")))
        return func(*args, **kwargs)

    added = [
        inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann)
        for key, (_, ann, default) in extra.items()
    ]
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), *added]
    )
    return wrapper


def _print_version(value: bool) -> None:
    if value:
        from omniq import __version__

        console.line(f"omniq {__version__}")
        raise typer.Exit(ExitCode.OK)


def root_callback(
    config: ConfigOption = None,
    verbose: VerboseOption = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", is_eager=True, callback=_print_version
        ),
    ] = False,
) -> None:
    """OmniQ: run Python callables and shell commands as background tasks."""
    remember(config, verbose)


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
    """Seconds from "30", "30s", "5m", "2h", "1h30m", "500ms" (typer `parser=`)."""
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


def validate_task_id(value: str | None) -> str | None:
    """typer callback: a bad id is a usage error before any store is touched."""
    return None if value is None else _as_parameter(check_task_id, value)


def queue_option(help: str) -> Any:
    """`-q/--queue NAME`, validated before it reaches any store."""
    return typer.Option(
        "--queue", "-q", metavar="NAME", callback=validate_queue, help=help, show_default=False
    )


def validate_queue(value: Any) -> Any:
    """typer callback for one queue name or a list of them."""
    if value is None:
        return None
    if isinstance(value, list | tuple):
        return [_as_parameter(check_queue, v) for v in value]
    return _as_parameter(check_queue, value)


def _as_parameter(check: Callable[[str], str], value: str) -> str:
    try:
        return check(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def examples(*lines: str) -> str:
    """A help epilog of example commands, kept as written (click's \\b: no rewrapping)."""
    return "\b\nExamples:\n" + "\n".join(f"  {text}" for text in lines)


# --- the top-level error handler ------------------------------------------------------------


def _exit_code_for(exc: BaseException) -> tuple[ExitCode, str]:
    from omniq import errors

    table: tuple[tuple[type[BaseException], ExitCode], ...] = (
        (errors.ConfigError, ExitCode.CONFIG),
        (errors.BackendUnavailable, ExitCode.UNAVAILABLE),
        (errors.BackendError, ExitCode.UNAVAILABLE),
        (errors.MissingDependency, ExitCode.UNAVAILABLE),
        (errors.TaskNotFound, ExitCode.NOT_FOUND),
        (errors.ResultTimeout, ExitCode.PENDING),
        (errors.TaskFailed, ExitCode.TASK_FAILED),
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
    if isinstance(exc, KeyboardInterrupt | typer.Abort):
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
