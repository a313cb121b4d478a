"""Entry point of the `omniq` command: a click group, one module per command group.

Command modules import only click and the standard library at import time; the
client, the backends and rich are imported inside the commands that use them.
Commands are loaded on demand (click's documented lazy-group pattern): a run
imports the one module it needs; only `omniq --help` imports them all.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

import click

from omniq.cli import common
from omniq.cli.exit_codes import SUMMARY

# command -> module that defines it (in its COMMANDS table)
OWNERS = {
    "worker": "worker_cmd",
    "enqueue": "enqueue_cmd",
    "result": "inspect_cmd",
    "events": "inspect_cmd",
    "tail": "inspect_cmd",
    "status": "ops_cmd",
    "cancel": "ops_cmd",
    "retry": "ops_cmd",
    "purge": "ops_cmd",
    "failed": "failed_cmd",
    "schedule": "schedule_cmd",
    "logs": "logs_cmd",
    "config": "config_cmd",
    "metrics": "observe_cmd",
    "top": "observe_cmd",
    "dashboard": "dashboard_cmd",
}

HELP = "OmniQ: run Python callables and shell commands as background tasks."
EPILOG = (
    common.examples(
        "omniq enqueue omniq.examples:add 2 3    # prints the task id",
        "omniq worker --burst                    # run queued tasks, then exit",
        "omniq result TASK_ID                    # 5",
        "omniq tail                              # live events of every task",
    )
    + "\n\n\b\n"
    + SUMMARY
)


class LazyGroup(click.Group):
    """The root group: a command's module is imported when that command is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(OWNERS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = OWNERS.get(cmd_name)
        if module is None:
            return None
        found: click.Command = importlib.import_module(f"omniq.cli.{module}").COMMANDS[cmd_name]
        return found


def build_app() -> click.Group:
    """The `omniq` group (commands load when used)."""
    return LazyGroup(
        name="omniq",
        help=HELP,
        epilog=EPILOG,
        no_args_is_help=True,
        context_settings=common.CONTEXT,
        params=[*common.global_options(), common.version_option()],
    )


def __getattr__(name: str) -> click.Group:
    # `omniq.cli.app.app`, the whole app (tests, docs tools), built only when asked for.
    if name == "app":
        return build_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: Sequence[str] | None = None) -> None:
    """Run one `omniq` command and exit with its code (errors via common.handle_errors)."""
    args = list(sys.argv[1:] if argv is None else argv)
    with common.handle_errors():
        code = build_app().main(args=args, prog_name="omniq", standalone_mode=False)
    sys.exit(code if isinstance(code, int) else 0)
