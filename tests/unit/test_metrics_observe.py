"""Worker metrics (observer, store proxies that keep fused ops) and the read model behind
`omniq metrics`, `omniq top` and the dashboard, in one process over memory stores."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from omniq.backends.memory import MemoryBackend
from omniq.client import AsyncOmniQ
from omniq.config import OmniQConfig
from omniq.metrics import METRIC_NAMES, TimedBackend, WorkerMetrics, function_label
from omniq.models import EventType, QueueStats, Task, TaskEvent, TaskKind, utcnow
from omniq.observe import (
    Observer,
    Overview,
    QueueView,
    RateWindow,
    Thresholds,
    WorkerView,
    human_seconds,
    overview_record,
)
from omniq.storage import fused_ops
from omniq.worker import Worker, WorkerSettings

MEMORY = {"task_queue_type": "memory", "result_storage_type": "memory",
          "event_storage_type": "memory", "event_policy": "strict"}


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(metrics: WorkerMetrics, text: str | None = None) -> Samples:
    """Every sample of the registry, parsed back from the exposition text."""
    text = text or generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def run_worker(
    metrics: WorkerMetrics, backend: MemoryBackend, n_ok: int, n_fail: int
) -> str:
    """Run a burst worker over the tasks; the scrape taken (from a thread, as the HTTP
    server's is) while its loop still runs."""
    stores = metrics.wrap_stores(backend.queue(), backend.results(), backend.events())
    client = AsyncOmniQ(OmniQConfig.from_values(**MEMORY), task_queue=backend.queue(),
                        result_storage=backend.results(), event_storage=backend.events())
    await client.open()
    for i in range(n_ok):
        await client.enqueue("omniq.examples:add", i, 1)
    for _ in range(n_fail):
        await client.enqueue("omniq.examples:fail")
    settings = WorkerSettings(burst=True, poll_interval=0.05, concurrency=2)
    worker = Worker(*stores, settings, observer=metrics.observe)
    assert fused_ops(*stores) is not None, "the proxies hid the Backend's fused operations"
    assert isinstance(fused_ops(*stores), TimedBackend)
    metrics.attach(worker, asyncio.get_running_loop())
    await worker.run()
    scraped = await asyncio.to_thread(generate_latest, metrics.registry)
    return scraped.decode()


def test_counters_histograms_and_fused_timing() -> None:
    metrics = WorkerMetrics({"queue": "memory", "results": "memory", "events": "memory"})
    found = samples(metrics, asyncio.run(run_worker(metrics, MemoryBackend(), 3, 1)))
    add = {"queue": "default", "function": "omniq.examples:add"}
    fail = {"queue": "default", "function": "omniq.examples:fail"}
    assert value(found, "omniq_tasks_total", event="started", **add) == 3
    assert value(found, "omniq_tasks_total", event="completed", **add) == 3
    assert value(found, "omniq_tasks_total", event="failed", **fail) == 1
    assert value(found, "omniq_task_duration_seconds_count", **add) == 3
    assert value(found, "omniq_task_queue_wait_seconds_count", **add) == 3
    # The fused claim and finish went through the proxy, and the plain store calls too.
    fused = {"role": "fused", "technology": "memory"}
    assert value(found, "omniq_store_call_duration_seconds_count", method="finish", **fused) == 4
    assert value(found, "omniq_store_call_duration_seconds_count", method="claim", **fused) >= 1
    assert value(found, "omniq_store_call_duration_seconds_count", role="queue",
                 technology="memory", method="register_worker") >= 1
    # Labels stay bounded: no task id anywhere.
    assert all("task" not in dict(labels) for _, labels in found)
    names = {name for name, _ in found}
    assert "omniq_worker_running_tasks" in names and "omniq_queue_tasks" in names
    assert value(found, "omniq_worker_free_slots") == 2
    assert value(found, "omniq_queue_tasks", queue="default", state="queued") == 0


def test_every_exposed_family_is_listed() -> None:
    metrics = WorkerMetrics({"queue": "memory", "results": "memory", "events": "memory"})
    text = asyncio.run(run_worker(metrics, MemoryBackend(), 1, 1))
    families = {f.name for f in text_string_to_metric_families(text)}
    # (`_created` series are off on the server: disable_created_metrics in serve())
    ours = {n for n in families if n.startswith("omniq_") and not n.endswith("_created")}
    assert ours <= set(METRIC_NAMES), ours - set(METRIC_NAMES)


def test_store_errors_and_reachability() -> None:
    from omniq.errors import BackendUnavailable

    class Down:
        async def stats(self) -> list[QueueStats]:
            raise BackendUnavailable("gone")

    metrics = WorkerMetrics({"queue": "redis", "results": "redis", "events": "redis"})
    queue, _, _ = metrics.wrap_stores(Down(), object(), object())
    with pytest.raises(BackendUnavailable):
        asyncio.run(queue.stats())
    found = samples(metrics)
    assert value(found, "omniq_store_errors_total", role="queue", technology="redis",
                 method="stats", error="BackendUnavailable") == 1
    assert value(found, "omniq_store_reachable", role="queue", technology="redis") == 0
    assert value(found, "omniq_worker_up") == 0  # no worker attached yet


def test_function_labels_are_bounded() -> None:
    assert function_label(Task(func="local:__main__.job#7")) == "local:__main__.job"
    assert function_label(Task(func="sh", kind=TaskKind.SHELL)) == "shell"
    assert function_label(Task(func="myapp.tasks:send")) == "myapp.tasks:send"


# --- the read model -----------------------------------------------------------------------------


def event(kind: EventType, seconds_ago: float, queue: str = "q") -> TaskEvent:
    return TaskEvent(task_id="t", event_type=kind, queue=queue,
                     timestamp=utcnow() - timedelta(seconds=seconds_ago))


def test_rates_cover_the_window_or_what_was_read() -> None:
    window = RateWindow(60)
    for ago in (1, 2, 3, 70):  # the one 70 s ago falls out of the window
        window.add(event(EventType.ENQUEUED, ago))
    window.add(event(EventType.COMPLETED, 1))
    window.add(event(EventType.STARTED, 1))  # neither in nor out
    span, rates = window.rates(utcnow().timestamp())
    assert span == pytest.approx(60, abs=0.5)
    assert rates["q"] == (pytest.approx(3 / 60, rel=0.02), pytest.approx(1 / 60, rel=0.02))
    window.covered_from(utcnow().timestamp() - 10)  # only the last 10 s were read
    span, rates = window.rates(utcnow().timestamp())
    assert span == pytest.approx(10, abs=0.5)
    assert rates["q"][0] == pytest.approx(0.3, rel=0.05)


def overview_of(queues: list[QueueView], workers: int = 1) -> Overview:
    now = utcnow()
    view = WorkerView("w", "h", 1, ("q",), 0, 4, 0, 1.0, now, (), 0, 0)
    return Overview(now, 60.0, queues, [view] * workers, [])


def test_thresholds() -> None:
    overview = overview_of([QueueView("a", 5, 0, 1, 3, 400.0, 0, 0),
                            QueueView("b", 7, 0, 0, 9, None, 0, 0)])
    assert Thresholds().crossed(overview) == []
    assert Thresholds(max_age=600, max_failed=12, max_depth=12, min_workers=1).crossed(
        overview) == []
    crossed = Thresholds(max_age=300, max_failed=11, max_depth=11, min_workers=2).crossed(
        overview)
    assert len(crossed) == 4
    assert "queue a" in crossed[0] and "6m40s" in crossed[0]
    assert overview_record(overview)["failed"] == 12
    assert human_seconds(0.25) == "0.2s" and human_seconds(3725) == "1h02m"


def test_observer_over_memory_stores() -> None:
    async def scenario() -> None:
        backend = MemoryBackend()
        config = OmniQConfig.from_values(**MEMORY)
        client = AsyncOmniQ(config, task_queue=backend.queue(), result_storage=backend.results(),
                            event_storage=backend.events())
        await client.open()
        ok = await client.enqueue("omniq.examples:add", 1, 2)
        bad = await client.enqueue("omniq.examples:fail", "the password=hunter2 leaked")
        observer = Observer(client)
        first = await observer.overview()
        assert [q.queued for q in first.queues] == [2]
        assert first.queues[0].rate_in > 0
        worker = Worker(backend.queue(), backend.results(), backend.events(),
                        WorkerSettings(burst=True, poll_interval=0.05))
        await worker.run()
        later = await observer.overview()
        assert later.failures[0].task_id == bad
        assert later.failures[0].func == "omniq.examples:fail"
        assert "hunter2" not in later.failures[0].error
        failed = await observer.failed_tasks()
        assert [f.task_id for f in failed] == [bad]
        task = await observer.task(bad)
        assert task is not None and task.status == "failed" and task.retryable
        assert [e["event_type"] for e in task.events] == ["enqueued", "started", "failed"]
        assert "hunter2" not in str(task.result)
        done = await observer.task(ok)
        assert done is not None and done.result is not None and done.result["value"] == 3
        assert await observer.task("no-such-task") is None
        await client.retry(bad)  # retried: no longer on the failed list
        assert await observer.failed_tasks() == []
        await client.close()

    asyncio.run(scenario())
