"""The `omniq dashboard` web server (aiohttp): a few pages, the JSON they read, and one
live event stream (server-sent events) that updates them without a reload.

Pages are static HTML shells from the package (no build step, no CDN); their script
fills them from /api/* with DOM text nodes only, never markup, so nothing a task
stored can run in the browser. What a page shows comes from `omniq.observe`, the
read model `omniq top` and `omniq metrics` use as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import importlib.resources
import json
import logging
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from omniq.errors import OmniQError, TaskNotFound, TaskStateError, redact
from omniq.models import check_queue_name, is_valid_id, utcnow
from omniq.observe import (
    Observer,
    event_record,
    failed_record,
    overview_record,
    record,
    schedule_record,
)
from omniq.web.security import AUTH_COOKIE, Guard, harden, refuse

if TYPE_CHECKING:
    from omniq.client import AsyncOmniQ
    from omniq.config import OmniQConfig

log = logging.getLogger("omniq.dashboard")

STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
PAGES = {"overview": "Overview", "failed": "Failed tasks", "schedules": "Schedules",
         "task": "Task"}
KEEPALIVE = 15.0  # seconds between comments on an idle event stream (proxies close silence)
SUBSCRIBER_BACKLOG = 1000  # events a slow page may fall behind before it is dropped
OVERVIEW_MAX_AGE = 0.5  # seconds an overview is shared between pages asking at once
FAILED_LIMIT = 100
RECENT_EVENTS = 30
FUNC_PATTERN_MAX = 200  # characters of a function filter
SCHEDULE_ACTIONS = ("pause", "resume", "run-now")


def _static(name: str) -> str:
    return (importlib.resources.files("omniq.web") / "static" / name).read_text("utf-8")


def fill(template: str, **values: str) -> str:
    """`{{name}}` placeholders replaced by HTML-escaped values."""
    for name, value in values.items():
        template = template.replace("{{" + name + "}}", html.escape(value, quote=True))
    return template


class EventHub:
    """One reader of the event log for every open page (not one per browser)."""

    def __init__(self, client: AsyncOmniQ) -> None:
        self.client = client
        self.subscribers: set[asyncio.Queue[tuple[str, str] | None]] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="omniq-dashboard-events")

    async def close(self) -> None:
        for queue in list(self.subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)  # the stream ends; the browser reconnects later
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def subscribe(self) -> asyncio.Queue[tuple[str, str] | None]:
        queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(SUBSCRIBER_BACKLOG)
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[tuple[str, str] | None]) -> None:
        self.subscribers.discard(queue)

    async def _follow(self) -> None:
        last: str | None = await self.client.event_cursor()
        while True:
            try:
                async for cursor, event in self.client.follow_events(last, idle_wait=0.5):
                    last = cursor
                    self._publish(event.task_id, json.dumps(event_record(event), default=str))
            except OmniQError as exc:  # an outage: go on from the last event seen
                log.warning("reading events failed, trying again: %s", redact(str(exc)))
                await asyncio.sleep(1.0)

    def _publish(self, task_id: str, data: str) -> None:
        for queue in list(self.subscribers):
            try:
                queue.put_nowait((task_id, data))
            except asyncio.QueueFull:  # too slow: drop it; its page reconnects and reloads
                self.subscribers.discard(queue)


class Dashboard:
    """Routes and handlers over one open client."""

    def __init__(self, client: AsyncOmniQ, guard: Guard, stores: dict[str, str]) -> None:
        self.client = client
        self.guard = guard
        self.stores = stores  # role -> technology: all a page says of the configuration
        self.observer = Observer(client)
        self.hub = EventHub(client)
        self._lock = asyncio.Lock()
        self._overview: tuple[float, dict[str, Any]] | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.guard.middleware, _store_errors])
        add = app.router
        for name, path in (("overview", "/"), ("failed", "/failed"),
                           ("schedules", "/schedules")):
            add.add_get(path, self._page_handler(name))
        add.add_get("/tasks/{task_id}", self.task_page)
        add.add_get("/login", self.login_page)
        add.add_post("/login", self.login)
        add.add_get("/static/{name}", self.static)
        add.add_get("/favicon.ico", _no_icon)
        add.add_get("/api/overview", self.api_overview)
        add.add_get("/api/failed", self.api_failed)
        add.add_post("/api/failed/retry", self.api_retry_failed)
        add.add_post("/api/failed/purge", self.api_purge_failed)
        add.add_get("/api/schedules", self.api_schedules)
        add.add_post("/api/schedules/{name}/{action}", self.api_schedule_action)
        add.add_get("/api/events", self.api_events)
        add.add_get("/api/tasks/{task_id}", self.api_task)
        add.add_post("/api/tasks/{task_id}/retry", self.api_retry)
        add.add_get("/api/stream", self.api_stream)
        app.on_startup.append(self._start)
        app.on_shutdown.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        self.hub.start()

    async def _stop(self, app: web.Application) -> None:
        await self.hub.close()

    # --- pages --------------------------------------------------------------------------------
    def _page(self, request: web.Request, page: str, task_id: str = "") -> web.Response:
        body = fill(
            _static("page.html"),
            page=page,
            title=PAGES[page],
            csrf=self.guard.csrf_token(self.guard.session_of(request)),
            actions="yes" if self.guard.allow_actions else "no",
            task_id=task_id,
        )
        return web.Response(text=body, content_type="text/html")

    def _page_handler(self, page: str) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            return self._page(request, page)

        return handler

    async def task_page(self, request: web.Request) -> web.Response:
        task_id = request.match_info["task_id"]
        if not is_valid_id(task_id):
            raise web.HTTPNotFound(text="not a task id")
        return self._page(request, "task", task_id)

    async def login_page(self, request: web.Request, error: str = "") -> web.Response:
        if self.guard.token is None:
            raise web.HTTPSeeOther("/")
        csrf = self.guard.csrf_token(self.guard.session_of(request))
        body = fill(_static("login.html"), csrf=csrf, error=error)
        return web.Response(text=body, content_type="text/html", status=401 if error else 200)

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        if not self.guard.token_matches(str(form.get("token", ""))):
            await asyncio.sleep(0.5)  # guessing stays slow
            return await self.login_page(request, "That is not the dashboard's token.")
        response = web.HTTPSeeOther("/")
        response.set_cookie(
            AUTH_COOKIE, self.guard.auth_value(), httponly=True, samesite="Strict", path="/"
        )
        raise response

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES:
            raise web.HTTPNotFound()
        return web.Response(text=_static(name), content_type=STATIC_FILES[name])

    # --- the JSON the pages read -----------------------------------------------------------
    async def api_overview(self, request: web.Request) -> web.Response:
        async with self._lock:  # one reader advances the observer's event cursor at a time
            cached = self._overview
            if cached is None or time.monotonic() - cached[0] > OVERVIEW_MAX_AGE:
                data = overview_record(await self.observer.overview(10))
                data["stores"] = self.stores
                data["actions"] = self.guard.allow_actions
                cached = self._overview = (time.monotonic(), data)
        return _json(cached[1])

    async def api_failed(self, request: web.Request) -> web.Response:
        """The dead letters, newest first, filtered by ?queue=, ?since= (30m, 1h) and
        ?func= (a glob over the import path or the function's name)."""
        queue, since, func = _failed_filters(request)
        failures, stats = await asyncio.gather(
            self.client.failed(queue, since, func, FAILED_LIMIT), self.client.stats()
        )
        return _json({
            "failures": [failed_record(f) for f in failures],
            "limit": FAILED_LIMIT,
            "dead_letters": sum(s.failed for s in stats),
            "queues": sorted(s.queue for s in stats if s.failed),
            "actions": self.guard.allow_actions,
        })

    async def api_retry_failed(self, request: web.Request) -> web.Response:
        """Queue every dead letter that matches the filters again."""
        if not self.guard.allow_actions:
            return refuse(403, "read-only dashboard: start it with --allow-actions to retry")
        queue, since, func = _failed_filters(request)
        ids = await self.client.retry_failed(queue, since, func)
        log.info("%d failed tasks queued again from the dashboard", len(ids))
        return _json({"count": len(ids)})

    async def api_purge_failed(self, request: web.Request) -> web.Response:
        """Delete every dead letter that matches the filters."""
        if not self.guard.allow_actions:
            return refuse(403, "read-only dashboard: start it with --allow-actions to purge")
        queue, since, func = _failed_filters(request)
        ids = await self.client.purge_failed(queue, since, func)
        log.info("%d failed tasks purged from the dashboard", len(ids))
        return _json({"count": len(ids)})

    async def api_schedules(self, request: web.Request) -> web.Response:
        now = utcnow()
        found = await self.client.schedules()
        return _json({"schedules": [schedule_record(s, now) for s in found],
                      "actions": self.guard.allow_actions})

    async def api_schedule_action(self, request: web.Request) -> web.Response:
        name, action = request.match_info["name"], request.match_info["action"]
        if action not in SCHEDULE_ACTIONS:
            raise web.HTTPNotFound()
        if not self.guard.allow_actions:
            return refuse(403, f"read-only dashboard: start it with --allow-actions to {action}")
        from omniq.operate import ScheduleNotFound

        calls = {"pause": self.client.pause_schedule, "resume": self.client.resume_schedule,
                 "run-now": self.client.run_schedule_now}
        try:
            done = await calls[action](name)
        except ScheduleNotFound as exc:
            return refuse(404, str(exc))
        log.info("schedule %s: %s from the dashboard", name, action)
        task_id = done if isinstance(done, str) else None
        return _json({"name": name, "action": action, "task_id": task_id})

    async def api_events(self, request: web.Request) -> web.Response:
        rows = await self.client.events.latest(RECENT_EVENTS)
        return _json({"events": [event_record(e) for _, e in rows]})  # oldest first

    async def api_task(self, request: web.Request) -> web.Response:
        view = await self.observer.task(request.match_info["task_id"])
        if view is None:
            return refuse(404, "no such task")
        data = record(view)
        data["actions"] = self.guard.allow_actions
        return _json(data)

    async def api_retry(self, request: web.Request) -> web.Response:
        if not self.guard.allow_actions:
            return refuse(403, "read-only dashboard: start it with --allow-actions to retry")
        task_id = request.match_info["task_id"]
        try:
            await self.client.retry(task_id)
        except TaskStateError as exc:
            return refuse(409, str(exc))
        except TaskNotFound as exc:
            return refuse(404, str(exc))
        log.info("task %s queued again from the dashboard", task_id)
        return _json({"task_id": task_id, "queued": True})

    async def api_stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: every event as it is stored (`?task=ID`: one task's)."""
        only = request.query.get("task")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "X-Accel-Buffering": "no"})
        harden(response.headers)
        await response.prepare(request)
        queue = self.hub.subscribe()
        try:
            await response.write(b"retry: 2000\n\n")
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), KEEPALIVE)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                if item is None:
                    break
                if only is None or item[0] == only:
                    await response.write(f"data: {item[1]}\n\n".encode())
        except ConnectionResetError:
            pass  # the page went away
        finally:
            self.hub.unsubscribe(queue)
        return response


@web.middleware
async def _store_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """A store that is down makes a page say so (503), never a stack trace."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except OmniQError as exc:
        return refuse(503, redact(str(exc)))


def _failed_filters(request: web.Request) -> tuple[str | None, Any, str | None]:
    """queue, since (an aware time) and func from the query string; 400 when one is bad."""
    from datetime import timedelta

    from omniq.config import parse_duration

    query = request.query
    queue = query.get("queue") or None
    func = query.get("func") or None
    try:
        if queue is not None:
            check_queue_name(queue)
        since = None
        if query.get("since"):
            seconds = parse_duration(query["since"])
            since = utcnow() - timedelta(seconds=max(0.0, seconds))
    except (ValueError, OverflowError) as exc:
        raise web.HTTPBadRequest(text=json.dumps({"error": str(exc)}),
                                 content_type="application/json") from None
    if func is not None and len(func) > FUNC_PATTERN_MAX:
        raise web.HTTPBadRequest(text=json.dumps({"error": "function filter too long"}),
                                 content_type="application/json")
    return queue, since, func


async def _no_icon(request: web.Request) -> web.Response:
    return web.Response(status=204)


def _json(data: Any) -> web.Response:
    return web.json_response(data, dumps=lambda value: json.dumps(value, default=str))


def store_types(config: OmniQConfig) -> dict[str, str]:
    return {
        "queue": config.task_queue_type,
        "results": config.result_storage_type,
        "events": config.event_storage_type,
    }


async def serve(
    config: OmniQConfig,
    *,
    host: str,
    port: int,
    token: str | None,
    allow_actions: bool,
    ready: Callable[[str], None],
) -> None:
    """Serve the dashboard until SIGTERM or Ctrl-C; `ready(url)` once it listens."""
    from omniq.client import AsyncOmniQ

    guard = Guard(host, token, allow_actions)  # a missing or weak token stops us here
    client = AsyncOmniQ(config)
    await client.open()
    runner = web.AppRunner(Dashboard(client, guard, store_types(config)).app(),
                           access_log=None, shutdown_timeout=2.0)
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise OmniQError(f"cannot serve the dashboard on {host}:{port}: {exc.strerror}") \
                from None
        bound = runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        ready(f"http://{shown}:{bound}/")
        await _until_stopped()
    finally:
        await runner.cleanup()
        await client.close(drain=False)


async def _until_stopped() -> None:
    """Wait for SIGTERM (the handler only sets the flag); Ctrl-C cancels us instead."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await stop.wait()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)

