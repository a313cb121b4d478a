"""`omniq dashboard`: serve the web UI over the configured stores (needs omniq[web])."""

from __future__ import annotations

import contextlib

import click

from omniq.cli import common, console
from omniq.cli.exit_codes import ExitCode

EPILOG = common.examples(
    "omniq dashboard                               # http://127.0.0.1:8777/, read-only",
    "omniq dashboard --allow-actions               # with retry buttons",
    "OMNIQ_DASHBOARD_TOKEN=$(cat token) omniq dashboard --host 0.0.0.0",
) + (
    "\n\nBound to any address but a loopback one it needs a token (OMNIQ_DASHBOARD_TOKEN,"
    "\nbetter than --token, which other users can see in the process list); browsers log"
    "\nin once with it, scripts send 'Authorization: Bearer TOKEN'. SIGTERM or Ctrl-C stops it."
)


@common.command("dashboard", epilog=EPILOG)
@click.option("--host", metavar="ADDRESS", help="Address to listen on [default: 127.0.0.1].")
@click.option(
    "--port", type=click.IntRange(0, 65535), metavar="PORT",
    help="Port to listen on; 0 picks a free one [default: 8777].",
)
@click.option(
    "--token", metavar="TOKEN",
    help="Token to log in with (prefer OMNIQ_DASHBOARD_TOKEN); required off loopback.",
)
@click.option(
    "--allow-actions/--read-only", "allow_actions", default=None,
    help="Allow retrying tasks from the page [default: read-only].",
)
def dashboard(
    host: str | None, port: int | None, token: str | None, allow_actions: bool | None
) -> int:
    """Serve the web dashboard: queues, workers, failures and tasks, live."""
    config = common.load_config(
        None,
        dashboard_host=host,
        dashboard_port=port or None,
        dashboard_token=token,
        dashboard_allow_actions=allow_actions,
    )
    try:
        from omniq.web.app import serve  # aiohttp: only for this command
    except ImportError as exc:
        from omniq.errors import MissingDependency

        raise MissingDependency(
            f"the dashboard needs the web extra ({exc.name} is missing): pip install 'omniq[web]'"
        ) from exc

    def ready(url: str) -> None:
        mode = "actions allowed" if config.dashboard_allow_actions else "read-only"
        console.info(f"dashboard on {url} ({mode}); Ctrl-C stops it")

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: a normal way to stop it
        common.run_async(
            serve(
                config,
                host=config.dashboard_host,
                port=0 if port == 0 else config.dashboard_port,
                token=config.dashboard_token,
                allow_actions=config.dashboard_allow_actions,
                ready=ready,
            )
        )
    return ExitCode.OK


COMMANDS = {"dashboard": dashboard}
