"""`omniq worker --metrics-port` scraped over HTTP, and `omniq metrics` with thresholds,
on SQLite and the shared Redis."""

from __future__ import annotations

import json
import socket
import time

from tests.acceptance.conftest import run_omniq, start_omniq
from tests.acceptance.observing import (
    Place,
    place,
    sample,
    scrape,
    sqlite_place,
    stop,
    wait_until,
)
from tests.servers import free_port

__all__ = ["place", "sqlite_place"]  # fixtures, imported for the tests below

ADD = {"queue": "default", "function": "omniq.examples:add"}
FAIL = {"queue": "default", "function": "omniq.examples:fail"}


def test_worker_metrics_over_http(place: Place) -> None:
    port = free_port()
    for i in range(3):
        place.api.enqueue("omniq.examples:add", i, 1)
    place.api.enqueue("omniq.examples:fail")
    worker = start_omniq(["worker", "--metrics-port", str(port)], place.env)
    try:
        found = wait_until(
            lambda: (m := scrape(port))
            and sample(m, "omniq_tasks_total", event="completed", **ADD) == 3
            and sample(m, "omniq_tasks_total", event="failed", **FAIL) == 1
            # (queue stats are cached for a couple of seconds between scrapes)
            and sample(m, "omniq_queue_tasks", queue="default", state="failed") == 1
            and m,
            what="the worker's counters",
        )
        assert sample(found, "omniq_tasks_total", event="started", **ADD) == 3
        assert sample(found, "omniq_task_duration_seconds_count", **ADD) == 3
        assert sample(found, "omniq_task_queue_wait_seconds_count", **ADD) == 3
        assert sample(found, "omniq_worker_up") == 1
        assert sample(found, "omniq_worker_concurrency") == 4
        assert sample(found, "omniq_worker_free_slots") == 4
        assert sample(found, "omniq_worker_running_tasks") == 0
        assert sample(found, "omniq_queue_tasks", queue="default", state="queued") == 0
        assert sample(found, "omniq_queue_tasks", queue="default", state="failed") == 1
        for role in ("queue", "results", "events"):
            assert sample(found, "omniq_store_reachable", role=role, technology=place.tech) == 1
        timed = {labels for name, labels in found
                 if name == "omniq_store_call_duration_seconds_count"}
        assert {dict(labels)["technology"] for labels in timed} == {place.tech}
        assert {dict(labels)["role"] for labels in timed} >= {"queue"}
        beat = sample(found, "omniq_worker_last_heartbeat_timestamp_seconds")
        assert beat is not None and abs(beat - time.time()) < 30
        assert not any("task_id" in dict(labels) for _, labels in found)
    finally:
        code, err = stop(worker)
    assert code == 0, err


def test_process_pool_children_are_counted(sqlite_place: Place) -> None:
    place = sqlite_place
    port = free_port()
    ids = [place.api.enqueue("omniq.examples:add", i, i) for i in range(3)]
    worker = start_omniq(
        ["worker", "--pool", "process", "-c", "2", "--metrics-port", str(port)], place.env
    )
    try:
        found = wait_until(
            lambda: (m := scrape(port))
            and sample(m, "omniq_tasks_total", event="completed", **ADD) == 3 and m,
            what="the children's tasks in the parent's counters",
        )
        assert sample(found, "omniq_task_duration_seconds_count", **ADD) == 3
        assert [place.api.get_result(i, timeout=5) for i in ids] == [0, 2, 4]
    finally:
        code, err = stop(worker)
    assert code == 0, err


def test_metrics_port_in_use_is_a_config_error(sqlite_place: Place) -> None:
    place = sqlite_place
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_omniq(["worker", "--burst", "--metrics-port", str(port)], place.env)
    assert code == 78, err
    assert f"cannot serve metrics on port {port}" in err


def test_metrics_command_and_thresholds(place: Place) -> None:
    ok = [place.api.enqueue("omniq.examples:add", 1, 2) for _ in range(2)]
    code, out, err = run_omniq(["metrics"], place.env)
    assert code == 0, err
    assert "queue default queued=2 scheduled=0 running=0 failed=0" in out
    assert "workers live=0" in out
    code, out, err = run_omniq(["metrics", "--max-depth", "1", "--min-workers", "1"], place.env)
    assert code == 6, err
    assert "alert: 2 tasks ready to run (more than 1)" in err
    assert "alert: 0 live workers (fewer than 1)" in err
    code, out, err = run_omniq(["metrics", "--max-depth", "2", "--max-age", "1h"], place.env)
    assert code == 0, err
    place.api.enqueue("omniq.examples:fail")
    code, _, err = run_omniq(["worker", "--burst"], place.env)
    assert code == 0, err
    code, out, err = run_omniq(["metrics", "--json", "--max-failed", "0"], place.env)
    assert code == 6, err
    data = json.loads(out)
    assert data["failed"] == 1 and data["depth"] == 0 and data["live_workers"] == 0
    assert data["alerts"] == ["1 failed tasks kept (more than 0)"]
    (queue,) = data["queues"]
    assert queue["queue"] == "default" and queue["rate_in"] > 0 and queue["rate_out"] > 0
    assert [place.api.get_result(i, timeout=5) for i in ok] == [3, 3]
    code, _, err = run_omniq(["metrics", "--max-age", "soon"], place.env)
    assert code == 2 and "--max-age" in err
