"""Entry point of the `omniq` command: the typer app, one module per command group.

Command modules import only typer and the standard library at import time; the
client, the backends and rich are imported inside the commands that use them.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, get_args, get_origin

import typer

from omniq.cli import common

# command -> module that registers it; modules are imported only for the commands built
OWNERS = {
    "worker": "worker",
    "enqueue": "enqueue_cmd",
    "result": "inspect_cmd",
    "events": "inspect_cmd",
    "tail": "inspect_cmd",
    "status": "ops_cmd",
    "cancel": "ops_cmd",
    "retry": "ops_cmd",
    "purge": "ops_cmd",
    "config": "config_cmd",
}


def build_app(only: str | None = None) -> typer.Typer:
    """The app with every command, or with just `only` (what one run needs: faster start)."""
    app = typer.Typer(
        name="omniq",
        help="OmniQ: run Python callables and shell commands as background tasks.",
        epilog=common.examples(
            "omniq enqueue omniq.examples:add 2 3    # prints the task id",
            "omniq worker --burst                    # run queued tasks, then exit",
            "omniq result TASK_ID                    # 5",
            "omniq tail                              # live events of every task",
        )
        + "\n\nExit codes: 0 ok, 1 task failed, 2 usage error, 3 timed out or pending,\n"
        "4 no such task, 69 backend unavailable, 78 configuration error.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,  # plain click help: fast, and no colour codes in pipes
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(common.root_callback)
    for name in OWNERS if only is None else (only,):
        if OWNERS[name] == "worker":
            from omniq.cli import worker_cmd

            common.command(app, "worker", epilog=worker_cmd.EPILOG)(worker_cmd.worker)
        else:
            importlib.import_module(f"omniq.cli.{OWNERS[name]}").register(app, name)
    return app


def command_named(argv: Sequence[str]) -> str | None:
    """The command a command line runs, skipping global options; None for help or a typo."""
    args = iter(argv)
    for arg in args:
        if arg == "--config":
            next(args, None)
        elif arg in ("-v", "--verbose") or arg.startswith("--config="):
            continue
        else:
            return arg if arg in OWNERS else None
    return None


# --- option values without pydantic ---------------------------------------------------------
# typer >= 0.2x converts every option value through a pydantic TypeAdapter. Importing
# pydantic and building one adapter per option costs about 100 ms on each `omniq` run,
# most of a short command's start-up. Our options are str, int, float or bool (or have a
# `parser`): those are converted here, with typer's own error type. Enums, paths and
# anything else, and typer versions without this hook, keep typer's coercion.


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return bool(value)
    text = str(value).strip().lower()
    if text in ("1", "true", "t", "yes", "y", "on"):
        return True
    if text in ("0", "false", "f", "no", "n", "off"):
        return False
    raise ValueError(f"{value!r} is not a valid boolean.")


_SCALARS: dict[Any, Callable[[Any], Any]] = {str: str, int: int, float: float, bool: _to_bool}
_SCALAR_NAMES = {str: "text", int: "integer", float: "number", bool: "boolean"}


def _leaf(annotation: Any) -> Any:
    return get_args(annotation)[0] if get_origin(annotation) is list else annotation


def _convert(value: Any, annotation: Any, info: Any) -> Any:
    kind = _leaf(annotation)
    try:
        converted = info.parser(value) if info.parser else _SCALARS[kind](value)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            str(exc) if info.parser else f"{value!r} is not a valid {_SCALAR_NAMES[kind]}."
        ) from None
    if not isinstance(converted, int | float):
        return converted
    low, high = getattr(info, "min", None), getattr(info, "max", None)
    if low is not None and converted < low:
        raise ValueError(f"{converted} is not in the range x>={low}.")
    if high is not None and converted > high:
        raise ValueError(f"{converted} is not in the range x<={high}.")
    return converted


def _plain_runtime_params(original: Callable[[Any], Any], base: type) -> Any:
    @dataclass(frozen=True)
    class PlainParam(base):
        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            try:
                if isinstance(value, list | tuple):
                    return [_convert(v, self.annotation, self.parameter_info) for v in value]
                return _convert(value, self.annotation, self.parameter_info)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), ctx=ctx, param=param) from None

    def build(descriptor: Any) -> Any:
        info = descriptor.parameter_info
        plain = info.parser is not None or _leaf(descriptor.annotation) in _SCALARS
        if not plain or descriptor.file_annotation is not None or getattr(info, "clamp", False):
            return original(descriptor)
        return PlainParam(parameter_info=info, annotation=descriptor.annotation)

    return build


def _light_coercion() -> None:
    try:
        from typer import _coercion, core

        original = core.build_runtime_param
        base = _coercion.RuntimeParam
    except (ImportError, AttributeError):  # another typer: its own coercion stays
        return
    core.build_runtime_param = _plain_runtime_params(original, base)


_light_coercion()


def __getattr__(name: str) -> typer.Typer:
    # `omniq.cli.app.app`, the whole app (tests, docs tools), built only when asked for.
    if name == "app":
        return build_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: Sequence[str] | None = None) -> None:
    """Run one `omniq` command and exit with its code (errors via common.handle_errors)."""
    args = list(sys.argv[1:] if argv is None else argv)
    # Only the command being run is built: the others' options are never parsed.
    command = typer.main.get_command(build_app(only=command_named(args)))
    with common.handle_errors():
        code = command.main(
            args=args,
            prog_name="omniq",
            standalone_mode=False,
        )
    sys.exit(code if isinstance(code, int) else 0)
