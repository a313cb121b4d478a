"""`omniq schedule add|list|show|pause|resume|remove|run-now`: periodic tasks, fired by
the ordinary workers (no second daemon); stored beside the queue, so every worker and
every `omniq` command sees the same ones."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from omniq.cli import common, console, enqueue_cmd

if TYPE_CHECKING:
    from omniq.client import AsyncOmniQ
    from omniq.config import OmniQConfig
    from omniq.schedules import Schedule

CATCH_UP = ("latest", "all", "none")  # the values of omniq.schedules.CATCH_UP

GROUP_EPILOG = common.examples(
    "omniq schedule add report myapp.tasks:report --cron '0 7 * * 1-5' --timezone Europe/Paris",
    "omniq schedule add ping omniq.examples:add 1 1 --every 30s -q low --retries 2",
    "omniq schedule list                        # with the next and the last run",
    "omniq schedule pause report && omniq schedule resume report",
    "omniq schedule run-now report              # one run now, outside the schedule",
) + (
    "\n\nEvery `omniq worker` (daemon, or --burst at its start) fires the schedules that are"
    "\ndue; each slot is enqueued once however many workers run (a unique key per slot)."
    "\nSchedules can also be declared in omniq.yaml under `schedules:`."
)
ADD_EPILOG = common.examples(
    "omniq schedule add nightly myapp.tasks:backup --cron '30 2 * * *' --timezone Europe/Paris",
    "omniq schedule add tick omniq.examples:add 1 1 --every 1m",
    "omniq schedule add mail myapp.tasks:digest -k since='\"1d\"' --every 1d -q mail "
    "--timeout 10m",
    "omniq schedule add sync myapp.tasks:sync --every 5m --catch-up all --catch-up-limit 12",
) + (
    "\n\nARGS and -k are parsed as in `omniq enqueue`. Cron expressions have five fields"
    "\n(minute hour day month weekday) and run in --timezone (default UTC), DST included:"
    "\na local time skipped by a spring-forward runs at the first minute after the gap."
    "\n--every slots sit on a grid from the moment the schedule was added."
    "\n\n\b\nSlots missed while no worker ran (--catch-up):"
    "\n  latest  run the most recent missed slot once (default)"
    "\n  all     run each missed slot, at most --catch-up-limit of them"
    "\n  none    skip them; wait for the next slot"
)


@click.group("schedule", epilog=GROUP_EPILOG, context_settings=common.CONTEXT)
def schedule() -> None:
    """Periodic tasks: add, list, show, pause, resume, remove, run-now."""


schedule.params.extend(common.global_options())


def _sub(name: str, **kwargs: Any) -> Any:
    """A subcommand of `omniq schedule`, with the global options."""

    def register(func: Any) -> click.Command:
        cmd = common.command(name, **kwargs)(func)
        schedule.add_command(cmd)
        return cmd

    return register


def _name_argument() -> Any:
    return click.argument("name", metavar="NAME")


# --- add --------------------------------------------------------------------------------------


@_sub("add", epilog=ADD_EPILOG)
@_name_argument()
@click.argument("func", metavar="FUNC")
@click.argument("args", metavar="[ARGS]...", nargs=-1)
@click.option("--kwarg", "-k", metavar="KEY=VALUE", multiple=True,
              help="Keyword argument (repeatable).")
@click.option("--args-json", metavar="JSON", help="Arguments as a JSON array (after ARGS).")
@click.option("--kwargs-json", metavar="JSON", help="Keyword arguments as a JSON object.")
@click.option("--cron", metavar="EXPR", help="When, as a cron expression: '*/5 * * * *'.")
@click.option("--timezone", "--tz", "timezone", metavar="ZONE", default="UTC",
              show_default=True, help="The cron expression's timezone (Europe/Paris).")
@click.option("--every", type=common.DURATION, metavar="DURATION",
              help="When, as an interval (at least 1s): 30s, 5m, 1h.")
@common.queue_option("Queue of its tasks [default: default].")
@click.option("--priority", type=int, metavar="N", help="Task priority; higher runs first.")
@click.option("--retries", type=click.IntRange(min=0), metavar="N",
              help="Retries after a failure.")
@enqueue_cmd.duration_option("--retry-delay", "First retry's delay.")
@enqueue_cmd.duration_option("--timeout", "Time limit per attempt.", positive=True)
@enqueue_cmd.duration_option("--ttl", "Expire unless a worker starts it within this.",
                             positive=True)
@enqueue_cmd.duration_option("--result-ttl", "Keep each result this long.", positive=True)
@click.option("--catch-up", type=click.Choice(CATCH_UP), default="latest", show_default=True,
              help="Slots missed while no worker ran: see below.")
@click.option("--catch-up-limit", type=click.IntRange(min=1), default=100, show_default=True,
              metavar="N", help="With --catch-up all: at most N missed slots.")
@click.option("--paused", is_flag=True, help="Add it paused (resume starts it).")
@click.option("--replace", is_flag=True, help="Replace a schedule of the same name.")
@click.option("--no-check", is_flag=True, help="Do not import FUNC's module to check it.")
@common.json_option("Print the schedule as one JSON object.")
def add(name: str, func: str, args: tuple[str, ...], kwarg: tuple[str, ...],
        args_json: str | None, kwargs_json: str | None, replace: bool, no_check: bool,
        as_json: bool, **given: Any) -> None:
    """Add a schedule NAME that enqueues FUNC(ARGS...) on a cron expression or an interval."""
    spec = enqueue_cmd.python_spec(func, args, kwarg, args_json, kwargs_json, {})
    enqueue_cmd.check_specs([spec], no_check)
    made = build_schedule(name, spec.func, spec.args, spec.kwargs, **given)
    config = common.load_config()
    added = common.run_async(_call(config, "add", made, replace))
    if as_json:
        console.json_line(_record(added))
    else:
        console.line(f"added schedule {name}: {_describe(added)}")


def build_schedule(name: str, func: str, args: tuple[Any, ...], kwargs: dict[str, Any], *,
                   cron: str | None, timezone: str, every: float | None, queue: str | None,
                   catch_up: str, catch_up_limit: int, paused: bool,
                   **options: Any) -> Schedule:
    """A Schedule from the command line; ScheduleError (a usage error) names what is wrong."""
    from omniq.schedules import Schedule

    if cron is None and every is None:
        raise ValueError("say when: --cron EXPR (with --timezone) or --every DURATION")
    if every is not None and timezone != "UTC":
        raise ValueError("--timezone goes with --cron (an --every interval has no timezone)")
    return Schedule(
        name=name, func=func, args=args, kwargs=kwargs, queue=queue or "default",
        options={k: v for k, v in options.items() if v is not None},
        cron=cron, timezone=timezone, every=every, catch_up=catch_up,
        catch_up_limit=catch_up_limit, paused=paused,
    )


# --- list and show ----------------------------------------------------------------------------


@_sub("list", epilog=common.examples("omniq schedule list",
                                     "omniq schedule list --json | jq -r .next_slot"))
@common.json_option("One JSON object per schedule (JSON lines).")
def list_(as_json: bool) -> None:
    """List the schedules with their next and last run, soonest first."""
    config = common.load_config()
    found = common.run_async(_call(config, "list"))
    records = [_record(s) for s in found]
    records.sort(key=lambda r: (r["next_slot"] is None, r["next_slot"] or "", r["name"]))
    if as_json:
        for item in records:
            console.json_line(item)
        return
    tty = console.stdout_is_tty()
    if tty and not records:
        console.line("no schedules (add one: omniq schedule add --help)")
        return
    rows = [_list_row(r, tty) for r in records]
    console.table(["NAME", "STATE", "WHEN", "FUNCTION", "QUEUE", "NEXT RUN", "LAST RUN"], rows,
                  title="Schedules")


def _list_row(item: dict[str, Any], tty: bool) -> list[str]:
    state = "paused" if item["paused"] else "active"
    if item["source"] == "config":
        state += " (config)"
    return [item["name"], state, item["when"], item["func"], item["queue"],
            _when(item["next_slot"], tty, future=True), _when(item["last_slot"], tty)]


def _when(text: str | None, tty: bool, future: bool = False) -> str:
    if text is None:
        return "-"
    from datetime import datetime

    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    shown = console.iso(moment)
    if not tty:
        return shown
    return f"{shown} ({_until(moment)})" if future else f"{shown} ({console.ago(moment)})"


def _until(moment: Any) -> str:
    from datetime import UTC, datetime

    seconds = max(0.0, (moment - datetime.now(UTC)).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"in {int(seconds // size)}{unit}"
    return f"in {int(seconds)}s"


@_sub("show", epilog=common.examples("omniq schedule show report",
                                     "omniq schedule show report --json"))
@_name_argument()
@common.json_option("Print the schedule as one JSON object.")
def show(name: str, as_json: bool) -> None:
    """Show one schedule: what it runs, when, its options and its next and last run."""
    config = common.load_config()
    found = common.run_async(_call(config, "show", name))
    item = _record(found)
    if as_json:
        console.json_line(item)
        return
    tty = console.stdout_is_tty()
    shown = {
        "name": item["name"], "state": "paused" if item["paused"] else "active",
        "when": item["when"], "func": item["func"],
        "args": console.to_json(item["args"]), "kwargs": console.to_json(item["kwargs"]),
        "queue": item["queue"], "options": console.to_json(item["options"]),
        "catch_up": item["catch_up"] + (f" (at most {item['catch_up_limit']})"
                                         if item["catch_up"] == "all" else ""),
        "source": item["source"], "created_at": _when(item["created_at"], tty),
        "next_run": _when(item["next_slot"], tty, future=True),
        "last_run": _when(item["last_slot"], tty),
    }
    width = max(map(len, shown))
    for key, value in shown.items():
        console.line(f"{key:<{width}}  {value}")


# --- pause, resume, remove, run-now -------------------------------------------------------------


def _simple(name: str, action: str, done: str, help_text: str, *examples: str) -> None:
    @_sub(name, help=help_text, epilog=common.examples(*examples))
    @_name_argument()
    def run(name: str) -> None:
        config = common.load_config()
        result = common.run_async(_call(config, action, name))
        console.line(done.format(name=name, result=result))


_simple("pause", "pause", "paused schedule {name}",
        "Stop firing a schedule (its definition and last run are kept).",
        "omniq schedule pause report")
_simple("resume", "resume", "resumed schedule {name}",
        "Fire a paused schedule again (missed slots follow its --catch-up).",
        "omniq schedule resume report")
_simple("remove", "remove", "removed schedule {name}",
        "Delete a schedule (one declared in omniq.yaml is removed there).",
        "omniq schedule remove report")
_simple("run-now", "run-now", "{result}",
        "Enqueue the schedule's task once now, outside its slots; prints the task id.",
        "id=$(omniq schedule run-now report) && omniq result $id --wait")


# --- the calls --------------------------------------------------------------------------------


async def _call(config: OmniQConfig, action: str, *args: Any) -> Any:
    async with common.open_client(config) as client:
        return await _act(client, action, *args)


async def _act(client: AsyncOmniQ, action: str, *args: Any) -> Any:
    if action == "add":
        return await _add(client, *args)
    calls: dict[str, Any] = {
        "list": client.schedules, "show": client.get_schedule,
        "pause": client.pause_schedule, "resume": client.resume_schedule,
        "remove": client.remove_schedule, "run-now": client.run_schedule_now,
    }
    return await calls[action](*args)


async def _add(client: AsyncOmniQ, made: Schedule, replace: bool) -> Schedule:
    from omniq.errors import TaskStateError

    try:
        await client.add_schedule(made, replace=replace)
    except TaskStateError as exc:
        if "configuration" in str(exc):
            raise
        raise common.Refused(f"a schedule named {made.name!r} exists: add --replace to "
                             "replace it") from None
    return await client.get_schedule(made.name)


def _record(found: Schedule) -> dict[str, Any]:
    from omniq.observe import schedule_record

    return schedule_record(found)


def _describe(found: Schedule) -> str:
    from omniq.observe import schedule_when

    item = _record(found)
    nxt = "paused" if found.paused else f"next run {_when(item['next_slot'], False)}"
    return f"{found.func} {schedule_when(found)} on queue {found.queue}, {nxt}"


COMMANDS = {"schedule": schedule}
