"""What the issue-11 commands cost: store calls per command, and on Redis the commands the
server ran (INFO commandstats of a private redis-server, so nothing else is counted).

    python tests/benchmarks/cli_costs.py [--tasks 100000] [--failed 1000] [--techs sqlite,redis]

Each technology gets a fresh place with `--tasks` tasks, `--failed` of them dead letters
(half on queue default, half on queue mail; the rest wait on a queue no worker serves)
and 10 schedules. Each command then runs as a real `omniq` process whose stores count
the calls made on them (a proxy around each store; a fused call of the Backend counts
once, as "fused"). Opening the stores is not counted as a call; on Redis it is in the
server's count (the `status` row shows that baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.acceptance.conftest import CLI, clean_env
from tests.acceptance.test_server_backends import store_env

# Runs inside each measured `omniq`: counts calls on the stores it opens.
COUNTING = r"""
import atexit, collections, json, os, sys
from omniq import client

COUNTS = collections.Counter()
_PROXIES = {}


class Counted:
    def __init__(self, inner, role):
        self._inner, self._role = inner, role

    def __getattr__(self, name):
        value = getattr(self._inner, name)
        if name == "backend" and value is not None:
            return _proxy(value, "fused")
        if name.startswith("_") or name in ("open", "close") or not callable(value):
            return value

        def call(*args, **kwargs):
            COUNTS[f"{self._role}.{name}"] += 1
            return value(*args, **kwargs)

        return call


def _proxy(inner, role):
    found = _PROXIES.get(id(inner))
    if found is None:
        found = _PROXIES[id(inner)] = Counted(inner, role)
    return found


_build = client.AsyncOmniQ._build_store


async def _counted(self, role):
    return Counted(await _build(self, role), role)


client.AsyncOmniQ._build_store = _counted
atexit.register(lambda: open(os.environ["COUNTS_FILE"], "w").write(json.dumps(COUNTS)))
sys.argv = ["omniq", *sys.argv[1:]]
from omniq.cli.app import main
main()
"""


def seed(env: dict[str, str], tasks: int, failed: int) -> str:
    """The place's tasks, dead letters and schedules; the id of one waiting task."""
    from omniq import OmniQ
    from omniq.config import OmniQConfig
    from omniq.schedules import Schedule

    api = OmniQ(OmniQConfig.load(env=env, use_files=False, embedded_worker="off"))
    try:
        idle = api.options(queue="idle")
        waiting = ""
        for start in range(0, tasks - failed, 1000):
            count = min(1000, tasks - failed - start)
            waiting = idle.enqueue_many([("omniq.examples:add", (i, 1)) for i in range(count)])[0]
        for queue in ("default", "mail"):
            api.options(queue=queue).enqueue_many(
                [("omniq.examples:fail", (f"boom {i}",)) for i in range(failed // 2)])
        for i in range(10):
            api.add_schedule(Schedule(name=f"s{i}", func="omniq.examples:add", args=(i, 1),
                                      every=3600 + i))
    finally:
        api.close()
    proc = subprocess.run([*CLI, "worker", "--burst", "-q", "default", "-q", "mail", "-c", "16"],
                          env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr
    return waiting


def redis_calls(url: str) -> dict[str, int]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def measure(env: dict[str, str], args: list[str], redis_url: str | None) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        counts_file = handle.name
    before = redis_calls(redis_url) if redis_url else {}
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", COUNTING, *args], capture_output=True,
                          text=True, env={**env, "COUNTS_FILE": counts_file}, timeout=3600)
    elapsed = time.perf_counter() - began
    assert proc.returncode in (0, 5), (args, proc.stderr)
    after = redis_calls(redis_url) if redis_url else {}
    counts = json.loads(Path(counts_file).read_text() or "{}")
    os.unlink(counts_file)
    commands = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    commands.pop("info", None)
    return {"args": args, "store_calls": sum(counts.values()), "by_method": counts,
            "redis_commands": sum(commands.values()) if redis_url else None,
            "by_command": commands, "seconds": round(elapsed, 2)}


def commands(waiting: str) -> list[list[str]]:
    return [
        ["status"],
        ["failed"],
        ["failed", "-n", "1000", "--json"],
        ["failed", "--func", "nomatch_*"],
        ["retry", "--all-failed", "--dry-run"],
        ["purge", "--failed", "--dry-run"],
        ["schedule", "list"],
        ["schedule", "show", "s3"],
        ["schedule", "run-now", "s3"],
        ["schedule", "pause", "s3"],
        ["cancel", waiting],
        ["retry", "--all-failed", "-q", "default"],
        ["purge", "--failed", "-q", "mail", "--yes"],
    ]


def run_tech(tech: str, tasks: int, failed: int) -> list[dict[str, Any]]:
    from tests import servers

    home = Path(tempfile.mkdtemp(prefix=f"omniq-costs-{tech}-"))
    env = clean_env(home / "home")
    if tech == "sqlite":
        return _run(env, tasks, failed, None)
    with servers.private_redis(persistent=False) as redis:
        env.update(store_env(("redis",) * 3, "costs", home / "files",
                             {"redis": redis.url}))
        return _run(env, tasks, failed, redis.url)


def _run(env: dict[str, str], tasks: int, failed: int, redis_url: str | None
         ) -> list[dict[str, Any]]:
    began = time.perf_counter()
    waiting = seed(env, tasks, failed)
    print(f"  seeded in {time.perf_counter() - began:.0f}s", file=sys.stderr)
    return [measure(env, args, redis_url) for args in commands(waiting)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--failed", type=int, default=1000)
    parser.add_argument("--techs", default="sqlite,redis")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    report = {}
    for tech in options.techs.split(","):
        print(f"{tech}: {options.tasks} tasks, {options.failed} failed", file=sys.stderr)
        report[tech] = run_tech(tech, options.tasks, options.failed)
    if options.json:
        print(json.dumps(report, indent=2))
        return
    for tech, rows in report.items():
        print(f"\n{tech} ({options.tasks} tasks, {options.failed} failed)")
        print(f"{'command':<42} {'store calls':>11} {'redis cmds':>10} {'seconds':>8}")
        for row in rows:
            shown = " ".join(row["args"])[:42]
            cmds = "-" if row["redis_commands"] is None else str(row["redis_commands"])
            print(f"{shown:<42} {row['store_calls']:>11} {cmds:>10} {row['seconds']:>8}")


if __name__ == "__main__":
    main()
