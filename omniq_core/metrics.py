"""Prometheus metrics of one `omniq worker` (`--metrics-port`; needs `omniq[web]`).

Three sources, each as cheap as it can be on the worker's hot path:
- task counters and histograms, from the worker's observer (one call per lifecycle
  event; label children cached, so an event costs a dict lookup and an increment);
- store call latency and errors, from proxies around the three stores and, when one
  Backend holds them all, around its fused operations (`omniq.storage.fused_ops`);
- gauges read only when Prometheus scrapes: running tasks, free slots, heartbeat age,
  events held in the outage buffer, and queue depths (one `stats()` call, cached).

Labels stay bounded: queue, function (import path, never a task id), role, technology,
store method, error type. Every metric name is in METRIC_NAMES: the alert rules and the
Grafana dashboard in docs/ are checked against it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from omniq.errors import BackendUnavailable, ConfigError, MissingDependency
from omniq.models import EventType, QueueStats, Task, TaskEvent, TaskKind, utcnow
from omniq.storage import FusedOps

try:
    from prometheus_client import (
        CollectorRegistry,
        Counter,
        Histogram,
        disable_created_metrics,
        start_http_server,
    )
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
    from prometheus_client.process_collector import ProcessCollector
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise MissingDependency(
        "Prometheus metrics need the prometheus_client package: pip install 'omniq[web]'"
    ) from exc

if TYPE_CHECKING:
    from omniq.config import OmniQConfig
    from omniq.worker import Worker

log = logging.getLogger("omniq.metrics")

PREFIX = "omniq"
# Task run times span milliseconds to hours; store calls span sub-millisecond to seconds.
TASK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
QUEUE_STATS_MAX_AGE = 2.0  # seconds a scrape may reuse the last queue stats
QUEUE_STATS_TIMEOUT = 5.0  # seconds a scrape waits for them
QUEUE_STATES = ("queued", "scheduled", "running", "failed")
OUTCOMES = frozenset({EventType.COMPLETED, EventType.FAILED, EventType.TIMEOUT})

# name -> help text: the one list of what a worker exposes (counters without "_total",
# histograms without their _bucket/_sum/_count series, as Prometheus families name them).
METRIC_NAMES: dict[str, str] = {
    "omniq_tasks": "Task lifecycle events recorded by this worker, by queue, function and event "
    "(started, completed, failed, timeout, retried, released, expired)",
    "omniq_task_duration_seconds": "Run time of finished attempts (completed, failed, timeout)",
    "omniq_task_queue_wait_seconds": "Time from enqueue (or ETA) to the first start of a task",
    "omniq_worker_up": "1 while the worker takes tasks; 0 while it connects or stops",
    "omniq_worker_info": "The worker's id, host, pool and queues",
    "omniq_worker_running_tasks": "Tasks running now",
    "omniq_worker_free_slots": "Slots free for more tasks (concurrency minus running)",
    "omniq_worker_concurrency": "Tasks this worker runs at once at most",
    "omniq_worker_tasks_done": "Tasks this worker finished since it started",
    "omniq_worker_last_heartbeat_timestamp_seconds": "When the worker last registered itself "
    "in the queue store (Unix time)",
    "omniq_store_call_duration_seconds": "Store call latency by role, technology and method "
    "(dequeue and claim include waiting for a task)",
    "omniq_store_errors": "Store calls that raised, by role, technology, method and error type",
    "omniq_store_reachable": "0 while the last call to a store found it unreachable, else 1",
    "omniq_events_held": "Events held locally while the event store is unreachable",
    "omniq_events_dropped": "Events lost because the local event buffer was full",
    "omniq_queue_tasks": "Tasks in each queue by state (the queue store's view, all workers)",
    "omniq_queue_oldest_ready_age_seconds": "How long the oldest ready task of a queue has "
    "waited (0 when none is ready)",
}


def function_label(task: Task) -> str:
    """A bounded name for a task's callable: its import path, `shell` for commands, and
    a local callable without its per-process number."""
    if task.kind == TaskKind.SHELL:
        return "shell"
    return task.func.partition("#")[0]


class WorkerMetrics:
    """The registry of one worker process and the hooks that feed it."""

    def __init__(self, technologies: dict[str, str]) -> None:
        self.technologies = technologies  # role -> technology name
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.tasks = Counter(
            "omniq_tasks", METRIC_NAMES["omniq_tasks"], ("queue", "function", "event"),
            registry=r,
        )
        self.duration = Histogram(
            "omniq_task_duration_seconds", METRIC_NAMES["omniq_task_duration_seconds"],
            ("queue", "function"), buckets=TASK_BUCKETS, registry=r,
        )
        self.wait = Histogram(
            "omniq_task_queue_wait_seconds", METRIC_NAMES["omniq_task_queue_wait_seconds"],
            ("queue", "function"), buckets=TASK_BUCKETS, registry=r,
        )
        self.store_seconds = Histogram(
            "omniq_store_call_duration_seconds",
            METRIC_NAMES["omniq_store_call_duration_seconds"],
            ("role", "technology", "method"), buckets=STORE_BUCKETS, registry=r,
        )
        self.store_errors = Counter(
            "omniq_store_errors", METRIC_NAMES["omniq_store_errors"],
            ("role", "technology", "method", "error"), registry=r,
        )
        self.reachable: dict[tuple[str, str], int] = {}
        self.last_heartbeat: float | None = None  # Unix time of the last register_worker
        # Label children made once: `labels()` validates and locks on every call.
        self._children: dict[tuple[str, str, str], Any] = {}
        self._histogram_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._timed_backends: dict[int, TimedBackend] = {}
        self.state = ScrapeState(self)
        r.register(self.state)
        ProcessCollector(registry=r)  # CPU seconds, memory, open files of the process

    @classmethod
    def for_config(cls, config: OmniQConfig) -> WorkerMetrics:
        return cls(
            {
                "queue": config.task_queue_type,
                "results": config.result_storage_type,
                "events": config.event_storage_type,
            }
        )

    # --- the worker's observer ------------------------------------------------------------
    def observe(self, event: TaskEvent, task: Task) -> None:
        """Count one lifecycle event (called by the worker for each event it records)."""
        kind = event.event_type
        key = (task.queue, function_label(task), kind.value)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.tasks.labels(*key)
        child.inc()
        if kind in OUTCOMES:
            duration = event.details.get("duration")
            if isinstance(duration, int | float):
                self._histograms(key[0], key[1])[0].observe(duration)
        elif kind == EventType.STARTED and event.attempt == 1:
            ready = task.created_at if task.eta is None else max(task.created_at, task.eta)
            waited = (event.timestamp - ready).total_seconds()
            self._histograms(key[0], key[1])[1].observe(max(0.0, waited))

    def _histograms(self, queue: str, function: str) -> tuple[Any, Any]:
        """(duration, wait) children of one queue and function, made once."""
        found = self._histogram_children.get((queue, function))
        if found is None:
            found = (self.duration.labels(queue, function), self.wait.labels(queue, function))
            self._histogram_children[(queue, function)] = found
        return found

    # --- store proxies --------------------------------------------------------------------
    def wrap_stores(self, queue: Any, results: Any, events: Any) -> tuple[Any, Any, Any]:
        """The three stores behind timing proxies (the worker gets these)."""
        return (
            TimedStore(queue, "queue", self),
            TimedStore(results, "results", self),
            TimedStore(events, "events", self),
        )

    def timed_backend(self, backend: Any) -> Any:
        """One proxy per Backend, so `fused_ops` still sees one Backend behind all stores."""
        if backend is None or not isinstance(backend, FusedOps):
            return backend
        found = self._timed_backends.get(id(backend))
        if found is None:
            found = self._timed_backends[id(backend)] = TimedBackend(backend, self)
        return found

    def timer(
        self, role: str, method: str, call: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        """`call` timed into the store histogram (errors counted by type)."""
        technology = self.technologies.get(role, self.technologies["queue"])
        histogram = self.store_seconds.labels(role, technology, method)
        place = (role, technology)
        errors = self.store_errors
        reachable = self.reachable
        heartbeat = role == "queue" and method == "register_worker"

        async def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                value = await call(*args, **kwargs)
            except Exception as exc:
                histogram.observe(time.perf_counter() - began)
                errors.labels(role, technology, method, type(exc).__name__).inc()
                if isinstance(exc, BackendUnavailable):
                    reachable[place] = 0
                raise
            histogram.observe(time.perf_counter() - began)
            reachable[place] = 1
            if heartbeat:
                self.last_heartbeat = time.time()
            return value

        timed.__name__ = method
        return timed

    # --- serving ----------------------------------------------------------------------------
    def serve(self, port: int, host: str = "0.0.0.0") -> MetricsServer:
        """Serve /metrics on a thread of its own (prometheus_client's WSGI server)."""
        # No `_created` series: they double the text per counter and no rule reads them.
        # (A process-wide switch; this process is the worker daemon, ours.)
        disable_created_metrics()
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on port {port}: {exc.strerror}") from None
        log.info("metrics on http://%s:%d/metrics", _display_host(host), port)
        return MetricsServer(server, thread)

    def attach(self, worker: Worker, loop: asyncio.AbstractEventLoop) -> None:
        """From now on, scrapes read this worker (and its queue store's stats)."""
        self.state.worker = worker
        self.state.loop = loop


class MetricsServer:
    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _display_host(host: str) -> str:
    return socket.gethostname() if host in ("0.0.0.0", "::", "") else host


class TimedStore:
    """A store whose async methods are timed; everything else passes through."""

    def __init__(self, inner: Any, role: str, metrics: WorkerMetrics) -> None:
        self._inner = inner
        self._role = role
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if name == "backend":  # the same proxy for every store of one Backend
            return self._metrics.timed_backend(value)
        if inspect.iscoroutinefunction(value):
            timed = self._metrics.timer(self._role, name, value)
            self.__dict__[name] = timed  # found directly from the next call on
            return timed
        return value  # plain values (held, dropped) are read live

    def __repr__(self) -> str:
        return f"TimedStore({self._inner!r})"


class TimedBackend:
    """A Backend's fused operations, timed as role "fused". Defined as methods (not
    forwarded) because `isinstance(x, FusedOps)` looks them up statically."""

    def __init__(self, inner: FusedOps, metrics: WorkerMetrics) -> None:
        self._inner = inner
        self._submit = metrics.timer("fused", "submit", inner.submit)
        self._claim = metrics.timer("fused", "claim", inner.claim)
        self._finish = metrics.timer("fused", "finish", inner.finish)

    async def submit(self, task: Any, event: Any) -> str:
        value: str = await self._submit(task, event)
        return value

    async def claim(
        self, queues: Sequence[str], lease: float, timeout: float, limit: int, worker_id: str
    ) -> list[Any]:
        value: list[Any] = await self._claim(queues, lease, timeout, limit, worker_id)
        return value

    async def finish(self, delivery: Any, result: Any, event: Any, *, failed: bool) -> bool:
        value: bool = await self._finish(delivery, result, event, failed=failed)
        return value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class ScrapeState:
    """A custom collector: what a scrape reads from the worker at that moment."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics
        self.worker: Worker | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stats: list[QueueStats] | None = None
        self._stats_at = 0.0
        self._lock = threading.Lock()

    def describe(self) -> Iterator[Any]:
        return iter(())  # names vary with the worker's state: described at collect time

    def collect(self) -> Iterator[Any]:
        worker = self.worker
        up = worker is not None and not worker.stopping
        yield _gauge("omniq_worker_up", 1 if up else 0)
        for role, technology in self.metrics.technologies.items():
            value = self.metrics.reachable.get((role, technology), 1)
            yield _gauge("omniq_store_reachable", value, role=role, technology=technology)
        if worker is None:
            return
        yield from self._worker_metrics(worker)
        yield from self._queue_metrics(worker.settings.queues)

    def _worker_metrics(self, worker: Worker) -> Iterator[Any]:
        s = worker.settings
        running = len(worker.running)
        info = InfoMetricFamily("omniq_worker", METRIC_NAMES["omniq_worker_info"])
        info.add_metric(
            [],
            {"worker_id": worker.worker_id, "host": socket.gethostname(), "pool": s.pool,
             "queues": ",".join(s.queues)},
        )
        yield info
        yield _gauge("omniq_worker_running_tasks", running)
        yield _gauge("omniq_worker_free_slots", max(0, s.concurrency - running))
        yield _gauge("omniq_worker_concurrency", s.concurrency)
        yield _gauge("omniq_worker_tasks_done", worker.tasks_done)
        beat = self.metrics.last_heartbeat
        if beat is not None:
            yield _gauge("omniq_worker_last_heartbeat_timestamp_seconds", beat)
        events = worker.events
        yield _gauge("omniq_events_held", getattr(events, "held", 0))
        dropped = CounterMetricFamily("omniq_events_dropped", METRIC_NAMES["omniq_events_dropped"])
        dropped.add_metric([], getattr(events, "dropped", 0))
        yield dropped

    def _queue_metrics(self, worker_queues: Sequence[str]) -> Iterator[Any]:
        stats = self._queue_stats()
        if stats is None:
            return
        tasks = GaugeMetricFamily(
            "omniq_queue_tasks", METRIC_NAMES["omniq_queue_tasks"], labels=("queue", "state")
        )
        oldest = GaugeMetricFamily(
            "omniq_queue_oldest_ready_age_seconds",
            METRIC_NAMES["omniq_queue_oldest_ready_age_seconds"], labels=("queue",),
        )
        now = utcnow()
        listed = {s.queue for s in stats}
        # The worker's own queues are always there: an empty queue reads 0, not "absent".
        stats = stats + [QueueStats(queue=q) for q in worker_queues if q not in listed]
        for s in stats:
            for state in QUEUE_STATES:
                tasks.add_metric([s.queue, state], getattr(s, state))
            age = 0.0 if s.oldest_ready_at is None else (now - s.oldest_ready_at).total_seconds()
            oldest.add_metric([s.queue], max(0.0, age))
        yield tasks
        yield oldest

    def _queue_stats(self) -> list[QueueStats] | None:
        """The queue store's stats, asked on the worker's loop at most every few seconds."""
        worker, loop = self.worker, self.loop
        if worker is None or loop is None or loop.is_closed() or _on_loop(loop):
            return self._stats  # (on the loop itself, waiting for it would hang)
        with self._lock:
            if self._stats is None or time.monotonic() - self._stats_at > QUEUE_STATS_MAX_AGE:
                self._stats_at = time.monotonic()
                future = asyncio.run_coroutine_threadsafe(worker.queue.stats(), loop)
                try:
                    self._stats = future.result(QUEUE_STATS_TIMEOUT)
                except Exception as exc:  # an outage: the scrape still answers the rest
                    future.cancel()
                    log.debug("queue stats for metrics failed: %s", exc)
                    self._stats = None
            return self._stats


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _gauge(name: str, value: float, **labels: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, METRIC_NAMES[name], labels=tuple(labels))
    family.add_metric(list(labels.values()), value)
    return family
