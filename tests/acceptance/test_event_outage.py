"""event_policy: buffer with real servers: an event-store outage does not stop the work.

Queue and results stay on SQLite; events go to a private Redis, NATS or PostgreSQL that
the test stops and starts again (never the shared servers).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests import servers
from tests.acceptance.test_server_backends import SERVER_TECHS, Deploy, ServerHome
from tests.acceptance.test_server_backends import deploy as deploy  # the fixture

HELD = "event store unavailable, holding events locally"
BACK = "event store reachable again"


def done(home: ServerHome, task_ids: list[str]) -> int:
    """How many of the tasks have a stored result (read from SQLite: always up)."""
    from omniq.errors import ResultTimeout

    count = 0
    for task_id in task_ids:
        try:
            home.api.wait_result(task_id, timeout=0)
            count += 1
        except ResultTimeout:
            pass
    return count


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.parametrize("tech", SERVER_TECHS)
def test_an_event_store_outage_does_not_stop_the_work(tech: str, deploy: Deploy) -> None:
    with servers.private_server(tech) as server:
        home = deploy(("sqlite", "sqlite", tech), where={tech: server.url})
        worker = home.start_worker("-c", "8")
        first = home.submit("omniq.examples:add", 1, 1)
        home.poll(lambda: home.events(first) == ["enqueued", "started", "completed"], 30,
                  "the first task's events")
        server.stop()
        try:
            cli = home.run("enqueue", "omniq.examples:add", "2", "2")  # the queue is up
            assert cli.returncode == 0, cli.stderr
            during = [cli.stdout.strip()]
            during += [home.submit("omniq.examples:add", i, 1) for i in range(300)]
            started = time.monotonic()
            home.poll(lambda: done(home, during) == len(during), 60, "every task done")
            took = time.monotonic() - started
        finally:
            server.start()
        # Every held event reaches the store once it is back. The CLI's (its process had
        # exited: a worker writes its spill file before its own) in order; the others
        # were held by two live processes, each writing its own when the store returned.
        cli_id, *api_ids = during
        home.poll(lambda: home.events(cli_id) == ["enqueued", "started", "completed"], 60,
                  "the events of the task enqueued by the CLI")
        for task_id in api_ids[:: len(api_ids) // 10]:
            home.poll(lambda t=task_id: sorted(home.events(t)) == [
                "completed", "enqueued", "started"], 60, f"the events of {task_id}")
        worker.send(2)  # SIGINT: drain and stop
        assert worker.wait() == 0
        log = worker.log
        assert log.count(HELD) == 1 and log.count(BACK) == 1, log
        assert "Traceback" not in log
        assert took < 45, f"{len(during)} tasks took {took:.0f}s during the outage"


@pytest.mark.slow
def test_a_worker_stays_bounded_through_a_long_outage(deploy: Deploy, tmp_path: Path) -> None:
    """60 s without the event store under steady load: memory stays bounded (events
    beyond the buffer spill to disk, then are dropped and counted), work goes on."""
    with servers.private_server("redis") as server:
        home = deploy(
            ("sqlite", "sqlite", "redis"), where={"redis": server.url},
            OMNIQ_EVENT_BUFFER_SIZE="2000", OMNIQ_EVENT_SPILL_MAX_MB="1",
        )
        worker = home.start_worker("-c", "8")
        warm = [home.submit("omniq.examples:add", i, 1) for i in range(200)]
        home.poll(lambda: done(home, warm) == len(warm), 60, "the warm-up tasks")
        baseline = rss_mb(worker.proc.pid)
        server.stop()
        stop = threading.Event()
        fed: list[str] = []

        def feed() -> None:
            while not stop.is_set():
                fed.extend(home.api.enqueue_many([("omniq.examples:add", (i, 1))
                                                  for i in range(100)]))
                time.sleep(0.1)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        samples = []
        try:
            for _ in range(12):  # 60 s
                time.sleep(5)
                samples.append(rss_mb(worker.proc.pid))
        finally:
            stop.set()
            feeder.join(30)
            server.start()
        assert len(fed) > 5000  # steady load through the outage
        home.poll(lambda: done(home, fed) == len(fed), 120, "every task done")
        growth = max(samples) - baseline
        assert growth < 40, f"RSS grew {growth:.1f} MB ({baseline:.1f} -> {samples})"
        status = json.loads(home.run("status", "--json").stdout)
        (info,) = status["workers"]
        assert info["events_dropped"] > 0  # the bound was hit, and it says so
        assert "dropping events: the event buffer is full" in worker.log
        home.poll(lambda: json.loads(home.run("status", "--json").stdout)["workers"][0][
            "events_buffered"] == 0, 120, "held events written")
        worker.send(2)
        assert worker.wait() == 0
