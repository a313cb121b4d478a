"""What `--metrics-port` costs the worker: CPU seconds per task with and without it.

    python tests/benchmarks/metrics_cost.py [--tasks 3000] [--rounds 3] [--json]

Each round queues the same tasks (omniq.examples:add on SQLite, a fresh OMNIQ_HOME) and
runs `omniq worker --burst` three ways, in turn so drift hits them alike: without
metrics, with the endpoint idle, and with it scraped every second (the scrape runs in
the worker's process too). CPU is the worker process's user+system time (os.wait4).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.acceptance.conftest import CLI, clean_env
from tests.servers import free_port

MODES = ("off", "idle", "scraped")


def queue_tasks(env: dict[str, str], n: int) -> None:
    from omniq import OmniQ
    from omniq.config import OmniQConfig

    with OmniQ(OmniQConfig.load(env=env, use_files=False, embedded_worker="off")) as q:
        for start in range(0, n, 500):
            batch = range(start, min(n, start + 500))
            q.enqueue_many([("omniq.examples:add", (i, 1)) for i in batch])


def run(mode: str, n: int) -> float:
    home = Path(tempfile.mkdtemp(prefix="omniq-bench-")) / "home"
    env = clean_env(home)
    queue_tasks(env, n)
    args = [*CLI, "worker", "--burst", "--log-level", "WARNING"]
    port = free_port()
    if mode != "off":
        args += ["--metrics-port", str(port)]
    proc = subprocess.Popen(args, env=env, cwd=home.parent, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    stop = threading.Event()
    if mode == "scraped":
        threading.Thread(target=scrape_every_second, args=(port, stop), daemon=True).start()
    _, status, usage = os.wait4(proc.pid, 0)
    stop.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return (usage.ru_utime + usage.ru_stime) / n


def scrape_every_second(port: int, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args()
    per_task: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(opts.rounds):
        for mode in MODES:
            per_task[mode].append(run(mode, opts.tasks))
    summary = {mode: statistics.median(values) * 1e6 for mode, values in per_task.items()}
    if opts.json:
        print(json.dumps({"tasks": opts.tasks, "rounds": opts.rounds,
                          "cpu_us_per_task_median": summary,
                          "cpu_us_per_task_all": {m: [v * 1e6 for v in vs]
                                                  for m, vs in per_task.items()}}))
        return
    print(f"worker CPU per task, median of {opts.rounds} rounds of {opts.tasks} tasks (SQLite):")
    for mode in MODES:
        extra = summary[mode] - summary["off"]
        print(f"  {mode:8} {summary[mode]:8.1f} µs   ({extra:+.1f} µs vs off)  "
              f"all: {', '.join(f'{v * 1e6:.0f}' for v in per_task[mode])}")


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
