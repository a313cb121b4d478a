"""`omniq worker`: the daemon that runs tasks (and prints its own systemd unit)."""

from __future__ import annotations

import os
import shutil
import sys
from typing import TYPE_CHECKING, Any

import click

from omniq.cli import common, console

if TYPE_CHECKING:
    from omniq.config import OmniQConfig

POOLS = ("thread", "process", "async")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")

EPILOG = common.examples(
    "omniq worker                                 # queue 'default', 4 threads",
    "omniq worker -q high -q default -c 8         # 'high' first, then 'default'",
    "omniq worker --burst                         # run what is queued, then exit (cron)",
    "omniq worker --pool process                  # hard timeouts, crash isolation",
    "omniq worker --task-modules 'myapp.tasks,myapp.jobs.*'",
    "omniq worker --metrics-port 9464             # Prometheus scrapes :9464/metrics",
    "omniq worker --systemd-unit > /etc/systemd/system/omniq-worker.service",
    "omniq worker --burst --systemd-unit > /etc/systemd/system/omniq-worker.service",
    "omniq worker --burst --systemd-timer --every 10m > /etc/systemd/system/omniq-worker.timer",
) + (
    "\n\nThe unit runs this same omniq with these options, config file, OMNIQ_* variables\n"
    "(secrets withheld), working directory and user, sandboxed (read-only system, the data\n"
    "dir writable). With --burst it is a oneshot service that the --systemd-timer unit\n"
    "starts every --every DURATION."
    "\n\n\b\n"
    "\n\nSIGTERM or Ctrl-C: stop taking tasks, let running ones finish within"
    "\n--shutdown-timeout, hand the rest back to the queue, exit 0. A second"
    "\nsignal hands them back at once (exit 128 + signal number)."
)


@common.command("worker", epilog=EPILOG)
@click.option(
    "--queue",
    "-q",
    "queue",
    metavar="NAME",
    type=common.QUEUE,
    multiple=True,
    help="Queue to consume; repeat for several, consumed in the order given "
    "[config worker_queues; default: default].",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    metavar="N",
    help="Tasks run at once [default: 4].",
)
@click.option(
    "--pool",
    type=click.Choice(POOLS, case_sensitive=False),
    help="thread: sync tasks in threads; async: for async tasks (sync ones still use "
    "threads); process: each task in a child process, killed at its timeout "
    "[default: thread].",
)
@click.option("--burst", is_flag=True, help="Exit 0 once the queues are empty (for cron).")
@click.option("--max-tasks", type=click.IntRange(min=1), metavar="N", help="Exit 0 after N tasks.")
@click.option(
    "--shutdown-timeout",
    type=common.DURATION,
    metavar="DURATION",
    help="On SIGTERM, how long running tasks may take to finish before they are "
    "handed back to the queue, e.g. 30s, 2m [default: 30s].",
)
@click.option(
    "--cancel-grace",
    type=common.DURATION,
    metavar="DURATION",
    help="How long a --pool process task asked to stop by `omniq cancel` may run on "
    "before its process is killed (`omniq cancel --kill`: at once) [default: 10s].",
)
@click.option(
    "--task-modules",
    metavar="GLOBS",
    multiple=True,
    help="Modules whose callables this worker may run (comma-separated or repeated "
    "globs, e.g. 'myapp.*'; a name covers its submodules; omniq.examples is always "
    "allowed). '*' runs anything anyone can enqueue: unsafe on a shared broker.",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Exit 78 instead of warning when a --task-modules module cannot be imported.",
)
@click.option(
    "--allow-shell/--no-allow-shell",
    default=None,
    help="Run shell-command tasks (omniq enqueue --shell) [default: no].",
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    help="[default: INFO]",
)
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS, case_sensitive=False),
    help="text, or json (one object per line) [default: text].",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    metavar="PORT",
    help="Serve Prometheus metrics on PORT at /metrics, on every interface (needs "
    "omniq[web]) [config metrics_port; default: none].",
)
@click.option(
    "--systemd-unit",
    is_flag=True,
    help="Print a systemd service unit that runs this worker with these options, and exit "
    "(Type=notify with a watchdog; with --burst a oneshot service for --systemd-timer).",
)
@click.option(
    "--systemd-timer",
    is_flag=True,
    help="With --burst: print the systemd .timer that starts the burst service, and exit.",
)
@click.option(
    "--every",
    type=common.DURATION,
    default="5m",
    metavar="DURATION",
    help="How often the --systemd-timer starts the burst worker [default: 5m].",
)
@click.option(
    "--unit-user",
    metavar="USER",
    help="User= of the unit [default: the user running this command].",
)
@click.option(
    "--unit-group",
    metavar="GROUP",
    help="Group= of the unit [default: the unit user's primary group].",
)
def worker(
    queue: tuple[str, ...],
    concurrency: int | None,
    pool: str | None,
    burst: bool,
    max_tasks: int | None,
    shutdown_timeout: float | None,
    cancel_grace: float | None,
    task_modules: tuple[str, ...],
    strict: bool,
    allow_shell: bool | None,
    log_level: str | None,
    log_format: str | None,
    metrics_port: int | None,
    systemd_unit: bool,
    systemd_timer: bool,
    every: float,
    unit_user: str | None,
    unit_group: str | None,
) -> int:
    """Run tasks from the queues until stopped; logs one line per task outcome to stderr."""
    flags: dict[str, Any] = {
        "worker_queues": list(queue) or None,
        "worker_concurrency": concurrency,
        "worker_pool": pool.lower() if pool else None,
        "worker_shutdown_timeout": shutdown_timeout,
        "task_modules": split_globs(list(task_modules)),
        "allow_shell": allow_shell,
        "log_level": log_level.upper() if log_level else None,
        "log_format": log_format.lower() if log_format else None,
        "metrics_port": metrics_port,
        "worker_cancel_grace": cancel_grace,
    }
    config = common.load_config(None, **flags)
    if systemd_timer:
        if not burst:
            raise ValueError("--systemd-timer is for a burst worker: add --burst")
        from omniq.systemd import timer_file

        console.line(timer_file(every).rstrip("\n"))
        return 0
    if systemd_unit:
        identity = unit_identity(unit_user, unit_group)
        console.line(unit_text(config, flags, burst, max_tasks, identity).rstrip("\n"))
        return 0
    check_task_modules(config.task_modules, strict)
    return run_worker(config, burst=burst, max_tasks=max_tasks)


def check_task_modules(patterns: list[str], strict: bool) -> None:
    """Say at start (not at the first task) that an allowed module cannot be imported."""
    problems = unimportable_modules(patterns)
    if problems and strict:
        from omniq.errors import ConfigError

        raise ConfigError("; ".join(f"task_modules: {text}" for text in problems.values()))
    for text in problems.values():
        console.warn(f"task_modules: {text} (tasks from it will fail; --strict exits 78)")


def unimportable_modules(patterns: list[str]) -> dict[str, str]:
    """pattern -> why its module cannot be imported here (the worker's import path: the
    current directory first). A glob is checked up to its first wildcard: 'myapp.*' needs
    'myapp'."""
    import importlib

    from omniq.daemon import make_importable_here

    make_importable_here()
    problems: dict[str, str] = {}
    for pattern in patterns:
        parts = pattern.split(".")
        fixed = [p for p in parts[: next((i for i, p in enumerate(parts) if _glob(p)), None)]]
        name = ".".join(fixed)
        if not name:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:  # what the worker would meet at its first task
            problems[pattern] = f"{name!r} cannot be imported: {type(exc).__name__}: {exc}"
    return problems


def _glob(part: str) -> bool:
    return any(c in part for c in "*?[")


def split_globs(values: list[str] | None) -> list[str] | None:
    """`--task-modules a,b --task-modules c` -> [a, b, c]; None when not given."""
    if not values:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def run_worker(config: OmniQConfig, *, burst: bool, max_tasks: int | None) -> int:
    """Configure logging, run the daemon, return its exit code."""
    import logging

    from omniq.daemon import exit_if_task_threads_linger, serve
    from omniq.logsetup import setup_logging
    from omniq.worker import settings_from_config

    settings = settings_from_config(config, burst=burst, max_tasks=max_tasks)
    level = "DEBUG" if common.STATE.verbose else config.log_level
    setup_logging(level, config.log_format)
    # -v gave the "omniq" logger a handler of its own; the root handler now covers it.
    logging.getLogger("omniq").handlers.clear()
    logging.getLogger("omniq").setLevel(logging.NOTSET)
    code = common.run_async(serve(config, settings))
    exit_if_task_threads_linger(code)
    return code


# --- the systemd unit ------------------------------------------------------------------------


def unit_text(
    config: OmniQConfig,
    flags: dict[str, Any],
    burst: bool,
    max_tasks: int | None,
    identity: tuple[str, str | None],
) -> str:
    """The service unit for this worker: same program, options, config file, data dir, user."""
    from omniq.systemd import UnitSpec, unit_file

    command = [*omniq_program()]
    config_file = common.STATE.config_path or config.config_file
    if config_file:
        command += ["--config", os.path.abspath(os.path.expanduser(config_file))]
    command += ["worker", *worker_args(flags, burst, max_tasks)]
    env, withheld = environment_for_unit(config)
    queues = ", ".join(config.worker_queues)
    writable = writable_paths(config)
    user, group = identity
    text = unit_file(
        UnitSpec(
            command=tuple(command),
            shutdown_timeout=config.worker_shutdown_timeout,
            working_directory=os.getcwd(),
            description=f"OmniQ worker (queues: {queues})",
            environment=tuple(env),
            user=user,
            group=group,
            writable=writable,
            readable=readable_paths(config_file),
            oneshot=burst,
            # --max-tasks exits 0 by design, to be started afresh: restart it always.
            restart="always" if max_tasks is not None else "on-failure",
        )
    )
    notes = [
        f"# {name} is set in your shell but holds a secret: move it to the EnvironmentFile"
        for name in withheld
    ]
    for path in writable:
        if not os.path.isdir(path):
            console.warn(f"{path} does not exist: create it (owned by {user}) before starting")
    if user == "root":
        console.warn("the unit runs the worker as root: give --unit-user, or generate it as "
                     "the user that should run the worker")  # fmt: skip
    return "\n".join(notes) + ("\n" if notes else "") + text


def unit_identity(user: str | None, group: str | None) -> tuple[str, str | None]:
    """User= and Group=: the given ones, else the user running this command (whose data dir
    and config the unit reproduces) and that user's primary group."""
    import grp
    import pwd

    if user is None:
        user = pwd.getpwuid(os.geteuid()).pw_name
    if group is None:
        try:
            group = grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
        except KeyError:  # a user of another machine: let systemd use its primary group
            group = None
    return user, group


def readable_paths(config_file: str | None) -> tuple[str, ...]:
    """What the worker reads: its interpreter and venv, omniq itself, its import path and
    config file (the sandbox must not hide them)."""
    import omniq

    found = [sys.executable, sys.prefix, sys.base_prefix, os.path.dirname(omniq.__file__)]
    found += [entry for entry in sys.path if entry and os.path.exists(entry)]
    if config_file:
        found.append(config_file)
    return tuple(sorted({os.path.realpath(path) for path in found}))


def writable_paths(config: OmniQConfig) -> tuple[str, ...]:
    """Directories the worker writes: the data dir and each local SQLite/file store's."""
    from omniq.config import STORES

    paths = [str(config.home_dir)]
    for prefix in STORES:
        kind, settings = config.store(prefix)
        if kind == "sqlite" and settings.get("path") not in (None, ":memory:"):
            paths.append(os.path.dirname(os.path.abspath(str(settings["path"]))))
        elif kind == "file" and "://" not in str(settings.get("base_dir", "://")):
            paths.append(os.path.abspath(str(settings["base_dir"])))
    kept: list[str] = []
    for path in sorted(set(paths), key=len):  # a dir inside another is covered by it
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return tuple(kept)


def omniq_program() -> list[str]:
    """How to start this same omniq: its script's absolute path, or python -m omniq.cli."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "omniq" and os.path.isfile(argv0):
        return [os.path.abspath(argv0)]
    if os.path.basename(argv0) != "__main__.py":
        found = shutil.which("omniq")
        if found:
            return [os.path.abspath(found)]
    return [sys.executable, "-m", "omniq.cli"]


def worker_args(flags: dict[str, Any], burst: bool, max_tasks: int | None) -> list[str]:
    """The options given on this command line, in a form the unit can repeat."""
    args: list[str] = []
    for name in flags.get("worker_queues") or ():
        args += ["-q", name]
    simple = (
        ("--concurrency", "worker_concurrency"),
        ("--pool", "worker_pool"),
        ("--shutdown-timeout", "worker_shutdown_timeout"),
        ("--cancel-grace", "worker_cancel_grace"),
        ("--log-level", "log_level"),
        ("--log-format", "log_format"),
        ("--metrics-port", "metrics_port"),
    )
    for option, key in simple:
        value = flags.get(key)
        if value is not None:
            args += [option, f"{value:g}" if isinstance(value, float) else str(value)]
    if flags.get("task_modules") is not None:
        args += ["--task-modules", ",".join(flags["task_modules"])]
    if flags.get("allow_shell") is not None:
        args.append("--allow-shell" if flags["allow_shell"] else "--no-allow-shell")
    if burst:
        args.append("--burst")
    if max_tasks is not None:
        args += ["--max-tasks", str(max_tasks)]
    return args


def environment_for_unit(config: OmniQConfig) -> tuple[list[tuple[str, str]], list[str]]:
    """OMNIQ_* variables of this shell for the unit (paths made absolute); secrets withheld."""
    from omniq.config import KEYS

    masked = config.as_dict(mask_secrets=True)
    plain = config.as_dict(mask_secrets=False)
    env: list[tuple[str, str]] = []
    withheld: list[str] = []
    for name, value in sorted(os.environ.items()):
        if not name.startswith("OMNIQ_"):
            continue
        key = name[len("OMNIQ_") :].lower()
        if key in KEYS and masked.get(key) != plain.get(key):
            withheld.append(name)
        elif name in ("OMNIQ_HOME", "OMNIQ_CONFIG"):
            env.append((name, os.path.abspath(os.path.expanduser(value))))
        elif key in KEYS:
            env.append((name, value))
    if not any(name == "OMNIQ_HOME" for name, _ in env):
        # The data dir this shell resolved (platformdirs follows $HOME and the user): the
        # service must open the same SQLite files whoever it runs as.
        env.append(("OMNIQ_HOME", str(config.home_dir)))
    return env, withheld


COMMANDS = {"worker": worker}
