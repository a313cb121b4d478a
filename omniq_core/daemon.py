"""Runs a Worker as a daemon: opens the stores, handles signals, talks to systemd, drains.

First SIGTERM/SIGINT: stop taking tasks, let running ones finish within the shutdown
timeout, release the rest (the engine's drain). Second signal: release at once and exit
128 + signal number. The signal handlers only set flags; this module does the talking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from omniq.systemd import Notifier

if TYPE_CHECKING:
    from omniq.client import AsyncOmniQ
    from omniq.config import OmniQConfig
    from omniq.metrics import MetricsServer, WorkerMetrics
    from omniq.worker import Worker, WorkerSettings

log = logging.getLogger("omniq.daemon")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STATUS_EVERY = 5.0  # seconds between STATUS= updates to systemd (only when it changed)
SCHEDULE_EVERY = 1.0  # seconds between looks at the schedules
FORCE_GRACE = 10.0  # after a forced stop, how long releasing tasks may take at most


class StopRequests:
    """Counts stop signals: the first drains, any later one forces. Handlers only set flags."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.count = 0
        self.last_signal: int | None = None
        self.changed = asyncio.Event()
        self._saved: dict[int, Any] = {}

    def handle(self, signum: int) -> None:
        self.count += 1
        self.last_signal = signum
        self.worker.request_stop(force=self.count > 1)
        self.changed.set()

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequests]:
        """Install the handlers on the running loop; put the previous ones back afterwards."""
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            self._saved[sig] = signal.getsignal(sig)
            loop.add_signal_handler(sig, self.handle, sig)
        try:
            yield self
        finally:
            for signum, previous in self._saved.items():
                loop.remove_signal_handler(signum)
                signal.signal(signum, previous)
            self._saved.clear()

    @property
    def forced(self) -> bool:
        return self.count > 1


def status_line(worker: Worker) -> str:
    queues = ",".join(worker.settings.queues)
    state = "stopping" if worker.stopping else "working"
    return f"{state}: {len(worker.running)} running, {worker.tasks_done} done (queues {queues})"


def make_importable_here() -> None:
    """Task modules next to where the worker was started import, as with rq and celery."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


class Daemon:
    """One `omniq worker` process: stores, worker engine, signals, systemd notifications."""

    def __init__(
        self,
        config: OmniQConfig,
        settings: WorkerSettings,
        *,
        notifier: Notifier | None = None,
        status_every: float = STATUS_EVERY,
    ) -> None:
        self.config = config
        self.settings = settings
        self.notifier = notifier if notifier is not None else Notifier.from_environ()
        self.status_every = status_every
        self.client: AsyncOmniQ | None = None  # set while running
        self.worker: Worker | None = None  # set once the stores are reachable
        self.metrics: WorkerMetrics | None = None  # set when metrics_port is
        self._stopping_sent = False

    async def run(self) -> int:
        """Work until stopped; the process exit code (0 after a clean drain)."""
        from omniq.client import AsyncOmniQ

        make_importable_here()
        client = self.client = AsyncOmniQ(self.config)
        runner = None
        # Served from the start, so a scrape tells "connecting" (omniq_worker_up 0) apart
        # from a worker that is not there at all.
        server = self._serve_metrics()
        try:
            await client.open()
            await check_stores(client)
            sweep = getattr(client.events, "start_sweeping", None)
            if sweep is not None:  # events held by processes that exited: write them
                sweep()
            runner = self._make_runner()
            self.worker = self._make_worker(client, runner)
            if self.metrics is not None:
                self.metrics.attach(self.worker, asyncio.get_running_loop())
            return await self._serve(self.worker)
        finally:
            if server is not None:
                server.close()
            if runner is not None:
                runner.close()
            await client.close()
            self.notifier.close()

    def _serve_metrics(self) -> MetricsServer | None:
        port = self.config.metrics_port
        if port is None:
            return None
        from omniq.metrics import WorkerMetrics

        self.metrics = WorkerMetrics.for_config(self.config)
        return self.metrics.serve(port)

    def _make_runner(self) -> Any:
        if self.settings.pool != "process":
            return None
        from omniq.pool import ProcessRunner

        return ProcessRunner(self.settings.concurrency)

    def _make_worker(self, client: AsyncOmniQ, runner: Any) -> Worker:
        from omniq.worker import Worker

        stores = (client.queue, client.results, client.events)
        if self.metrics is None:
            return Worker(*stores, self.settings, runner=runner)
        # Timing proxies; with --pool process this parent records every event, so the
        # children's tasks are counted here too.
        return Worker(
            *self.metrics.wrap_stores(*stores), self.settings, runner=runner,
            observer=self.metrics.observe,
        )

    async def _serve(self, worker: Worker) -> int:
        with StopRequests(worker).installed() as stops:
            if self.settings.burst:  # a cron-run worker fires what is due, then works
                await self._fire_schedules()
            run = asyncio.create_task(worker.run(), name="omniq-worker")
            duties = [
                asyncio.create_task(self._watch_stops(worker, stops, run)),
                asyncio.create_task(self._watchdog_loop()),
                asyncio.create_task(self._status_loop(worker)),
                asyncio.create_task(self._schedule_loop()),
            ]
            self.notifier.ready(status_line(worker))
            log.info("%s", _describe_start(worker))
            try:
                await _await_run(run, stops)
            finally:
                for duty in duties:
                    duty.cancel()
                await asyncio.gather(*duties, return_exceptions=True)
            return self._stopped(worker, stops)

    def _stopped(self, worker: Worker, stops: StopRequests) -> int:
        """Say goodbye; the exit code: 0, or 128 + signal after a forced stop."""
        self._send_stopping(worker)
        done = worker.tasks_done
        noun = "task" if done == 1 else "tasks"
        log.info("worker %s stopped: %d %s done", worker.worker_id, done, noun)
        if stops.forced and stops.last_signal is not None:
            return 128 + stops.last_signal
        return 0

    async def _watch_stops(
        self, worker: Worker, stops: StopRequests, run: asyncio.Task[int]
    ) -> None:
        seen = 0
        while True:
            await stops.changed.wait()
            stops.changed.clear()
            if stops.count == seen:
                continue
            seen = stops.count
            if seen == 1:
                log.info("shutting down (%d running; send again to force)", len(worker.running))
                self._send_stopping(worker)
            else:
                log.warning("forced shutdown: releasing %d running tasks", len(worker.running))
                asyncio.get_running_loop().call_later(FORCE_GRACE, run.cancel)

    def _send_stopping(self, worker: Worker) -> None:
        if not self._stopping_sent:
            self._stopping_sent = True
            self.notifier.stopping(status_line(worker))

    async def _schedule_loop(self) -> None:
        """Every worker fires due schedule slots; the queue store's unique keys make
        each slot run once however many workers do (omniq.schedules)."""
        while True:
            await asyncio.sleep(SCHEDULE_EVERY)
            await self._fire_schedules()

    async def _fire_schedules(self) -> None:
        from omniq.errors import OmniQError

        client = self.client
        if client is None:
            return
        try:
            fired = await client.fire_schedules()
        except OmniQError as exc:  # an outage (the worker reports it) or a bad schedule
            log.debug("schedules not fired: %s", exc)
            return
        for task_id in fired:
            log.info("schedule fired: task %s", task_id)

    async def _watchdog_loop(self) -> None:
        # Runs on the main loop on purpose: if the loop wedges, the pings stop and
        # systemd restarts the service.
        every = self.notifier.watchdog
        if every is None:
            return
        while True:
            self.notifier.ping()
            await asyncio.sleep(every)

    async def _status_loop(self, worker: Worker) -> None:
        if not self.notifier.enabled:
            return
        last = status_line(worker)
        while True:
            await asyncio.sleep(self.status_every)
            line = status_line(worker)
            if line != last:
                self.notifier.status(line)
                last = line


async def _await_run(run: asyncio.Task[int], stops: StopRequests) -> None:
    try:
        await run
    except asyncio.CancelledError:
        # Cancelled by the forced-stop timer (not by our own caller): a forced exit.
        current = asyncio.current_task()
        if not (stops.forced and run.cancelled() and current and not current.cancelling()):
            raise
        log.warning("gave up waiting for running tasks to be released")


def exit_if_task_threads_linger(code: int) -> None:
    """End the process now with `code` if sync task threads are still running.

    A thread cannot be killed: a sync task still running after the drain (its task was
    released back to the queue) would keep the interpreter from exiting until it ends.
    """
    from omniq import threads

    # Idle threads hold no work; busy ones get a moment to finish their job.
    busy = threads.lingering(grace=0.3)
    if not busy:
        return
    log.warning("exiting without waiting for %d task threads (their tasks were released)", busy)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


async def check_stores(client: AsyncOmniQ) -> None:
    """One cheap call per store, so READY=1 means reachable, not merely configured."""
    from omniq.models import new_task_id

    await client.queue.stats()
    await client.results.get(new_task_id())
    await client.events.last_cursor()


def _describe_start(worker: Worker) -> str:
    s = worker.settings
    modules = (
        "any" if s.allowed_modules is None else ", ".join(("omniq.examples", *s.allowed_modules))
    )
    return (
        f"worker {worker.worker_id} started: queues {', '.join(s.queues)}; "
        f"pool {s.pool} x{s.concurrency}; task modules: {modules}; "
        f"shell tasks {'allowed' if s.allow_shell else 'refused'}" + ("; burst" if s.burst else "")
    )


async def serve(config: OmniQConfig, settings: WorkerSettings) -> int:
    """Run `omniq worker` until stopped; returns the process exit code."""
    return await Daemon(config, settings).run()
