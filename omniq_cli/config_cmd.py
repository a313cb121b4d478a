"""`omniq config show` / `omniq config check`: the effective settings; do the stores answer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from omniq.cli import common, console
from omniq.cli.exit_codes import ExitCode

if TYPE_CHECKING:
    from omniq.config import OmniQConfig
    from omniq.registry import Role

# Config key prefix of each store, in the order of omniq.registry.ROLES.
STORES: tuple[tuple[Role, str], ...] = (
    ("queue", "task_queue"), ("results", "result_storage"), ("events", "event_storage")
)

SHOW_EPILOG = (
    common.examples(
        "omniq config show",
        "omniq config show --all --json | jq '.values.result_storage_type'",
        "omniq --config /etc/omniq/omniq.yaml config show",
    )
    + "\n\nPasswords, tokens and credentials inside URLs and DSNs are masked."
)
CHECK_EPILOG = (
    common.examples(
        "omniq config check",
        "OMNIQ_RESULT_STORAGE_TYPE=redis omniq config check",
    )
    + "\n\nIt also imports each task_modules module, as a worker started here would."
    "\n\n\b\nExit codes: 0 every store answered and every task module imports; 69 a store"
    "\nis unreachable; 78 bad config, or a task module that cannot be imported."
)


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else console.to_json(value)


@common.command("show", epilog=SHOW_EPILOG)
@common.json_option("Print one JSON object: the file and each value with its source.")
@click.option("--all", "show_all", is_flag=True, help="Also list unset options.")
def show(as_json: bool, show_all: bool) -> None:
    """Print the effective configuration and where each value came from."""
    config = common.load_config()
    values = config.as_dict(mask_secrets=True)
    keys = [k for k, v in values.items() if show_all or v is not None]
    if as_json:
        console.json_line(
            {
                "config_file": config.config_file,
                "values": {k: {"value": values[k], "source": config.source_of(k)} for k in keys},
            }
        )
        _check_store_settings(config)
        return
    rows = [[k, _shown(values[k]), config.source_of(k)] for k in keys]
    title = f"config file: {config.config_file or 'none'}"
    console.table(["KEY", "VALUE", "SOURCE"], rows, title=title)
    _check_store_settings(config)


def _check_store_settings(config: OmniQConfig) -> None:
    """Shown, but not usable: a store whose settings are incomplete is a configuration
    error (exit 78) here as for every other command."""
    import contextlib

    from omniq import registry
    from omniq.errors import MissingDependency

    for role, prefix in STORES:
        kind, settings = config.store(prefix)
        # A driver not installed is `config check`'s business (exit 69).
        with contextlib.suppress(MissingDependency):
            registry.create(kind, role, settings)  # builds it; nothing connects


@common.command("check", epilog=CHECK_EPILOG)
@common.json_option("Print one JSON object per line checked.")
def check(as_json: bool) -> int:
    """Validate the configuration and try to reach every configured store."""
    config = common.load_config()
    report = common.run_async(_check(config))
    rows = []
    for role, prefix in STORES:
        error = report.get(role)
        kind = getattr(config, f"{prefix}_type")
        rows.append(
            {
                "store": prefix,
                "type": kind,
                "where": location(config, prefix),
                "ok": error is None,
                "error": error,
            }
        )
    modules = module_rows(config)
    for row in [*rows, *modules]:
        if as_json:
            console.json_line(row)
        else:
            failed = "UNREACHABLE" if row["type"] != "module" else "FAILED"
            state = "ok" if row["ok"] else f"{failed}: {row['error']}"
            console.line(f"{row['store']:<15} {row['type']:<8} {row['where']}  {state}")
    if any(not row["ok"] for row in rows):
        return ExitCode.UNAVAILABLE
    if any(not row["ok"] for row in modules):
        return ExitCode.CONFIG
    return ExitCode.OK


def module_rows(config: OmniQConfig) -> list[dict[str, Any]]:
    """One line per task_modules pattern: does its module import here."""
    from omniq.cli.worker_cmd import unimportable_modules

    problems = unimportable_modules(config.task_modules)
    return [
        {
            "store": "task_modules",
            "type": "module",
            "where": pattern,
            "ok": pattern not in problems,
            "error": problems.get(pattern),
        }
        for pattern in config.task_modules
    ]


def location(config: OmniQConfig, prefix: str) -> str:
    """Where a store lives, secrets masked: a path, URL, DSN or host."""
    values = config.as_dict(mask_secrets=True)
    for option in ("path", "base_dir", "url", "dsn", "servers", "host"):
        value = values.get(f"{prefix}_{option}")
        if value:
            if option == "host" and values.get(f"{prefix}_port"):
                return f"{value}:{values[f'{prefix}_port']}"
            return ",".join(value) if isinstance(value, list) else str(value)
    return "-"


async def _check(config: OmniQConfig) -> dict[str, str | None]:
    from omniq.client import AsyncOmniQ
    from omniq.errors import redact

    report = await AsyncOmniQ(config).check()
    # Driver messages may quote a URL: never print its password.
    return {role: None if error is None else redact(error) for role, error in report.items()}


config = click.Group(
    "config",
    help="Show the effective configuration or check that the stores answer.",
    epilog=common.examples("omniq config show", "omniq config check"),
    no_args_is_help=True,
    context_settings=common.CONTEXT,
    commands=[show, check],
)
COMMANDS = {"config": config}
