"""`omniq dashboard` in headless Chromium (Debian's, driven by Playwright; no browser
download): every page, a task appearing live, a retry through the UI, and the refusals
(read-only, CSRF, Host, token). Screenshots go to the test's artifacts directory."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import servers
from tests.acceptance.conftest import run_omniq, start_omniq
from tests.acceptance.observing import (
    Place,
    artifacts,
    place,
    require_tool,
    sqlite_place,
    stop,
    wait_until,
)

__all__ = ["place", "sqlite_place"]  # fixtures, imported for the tests below

VIEWPORT = {"width": 1280, "height": 900}
TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = require_tool("chromium", "chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        servers.require(f"playwright is not installed ({exc})", "playwright")
        raise
    with sync_playwright() as driver:
        found = driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield found
        finally:
            found.close()


class Dashboard:
    """A running `omniq dashboard` subprocess and the URL it printed."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = start_omniq(["dashboard", "--port", "0", *args], env)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()  # "dashboard on URL (...)" once it listens
        found = re.search(r"dashboard on (http://\S+/)", line)
        if found is None:
            code, err = stop(self.proc)
            raise AssertionError(f"the dashboard did not start (exit {code}): {line}{err}")
        self.url = found.group(1).replace("0.0.0.0", "127.0.0.1")

    def close(self) -> None:
        code, err = stop(self.proc)
        assert code == 0, err


@pytest.fixture
def dashboards() -> Iterator[list[Dashboard]]:
    started: list[Dashboard] = []
    yield started
    for dashboard in started:
        dashboard.close()


def open_dashboard(started: list[Dashboard], env: dict[str, str], *args: str) -> Dashboard:
    dashboard = Dashboard(env, *args)
    started.append(dashboard)
    return dashboard


def failed_task(place: Place) -> str:
    task_id = place.api.enqueue("omniq.examples:fail", "as planned")
    code, _, err = run_omniq(["worker", "--burst"], place.env)
    assert code == 0, err
    return str(task_id)


def post(page: Any, path: str, csrf: str | None) -> dict[str, Any]:
    """A POST from the page itself (same origin, its cookies), as its script makes it."""
    headers = {} if csrf is None else {"X-CSRF-Token": csrf}
    result: dict[str, Any] = page.evaluate(
        """async ([path, headers]) => {
             const r = await fetch(path, {method: "POST", headers});
             const text = await r.text();
             let body = null;
             try { body = JSON.parse(text); } catch (e) { body = {error: text}; }
             return {status: r.status, body};
           }""",
        [path, headers],
    )
    return result


def csrf_of(page: Any) -> str:
    return str(page.locator('meta[name="omniq-csrf"]').get_attribute("content"))


def test_pages_live_task_and_retry(
    browser: Any, place: Place, dashboards: list[Dashboard], tmp_path: Path
) -> None:
    shots = artifacts(f"dashboard-{place.tech}", tmp_path)
    bad = failed_task(place)
    dashboard = open_dashboard(dashboards, place.env, "--allow-actions")
    # A worker whose two slots stay busy: it shows on the overview, and what is queued
    # below (a new task, the retried one) waits instead of running.
    worker = start_omniq(["worker", "-c", "2", "--shutdown-timeout", "0"], place.env)
    try:
        for _ in range(2):
            place.api.enqueue("omniq.examples:sleep", 60)
        pages_with_a_busy_worker(browser, place, dashboard, bad, shots)
    finally:
        code, err = stop(worker)
    assert code == 0, err


def pages_with_a_busy_worker(
    browser: Any, place: Place, dashboard: Dashboard, bad: str, shots: Path
) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport=VIEWPORT)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    page.goto(dashboard.url)
    expect(page.locator("#queues")).to_contain_text("default")
    expect(page.locator("#workers")).to_contain_text("2 / 2", timeout=30_000)  # a loaded CI
    expect(page.locator("#failures")).to_contain_text(bad)
    expect(page.locator("#live")).to_have_text("live")
    expect(page.locator("#mode")).to_have_text("actions enabled")
    # A task enqueued from the command line appears without a reload.
    code, out, err = run_omniq(["enqueue", "omniq.examples:add", "2", "3"], place.env)
    assert code == 0, err
    new = out.strip()
    expect(page.locator("#live-events")).to_contain_text(new, timeout=10_000)
    expect(page.locator("#total-ready")).to_have_text("1", timeout=10_000)
    page.screenshot(path=str(shots / "overview.png"), full_page=True)

    page.goto(f"{dashboard.url}tasks/{bad}")
    expect(page.locator("#task-status")).to_have_text("failed")
    expect(page.locator("#result")).to_contain_text("RuntimeError: as planned")
    expect(page.locator("#result .traceback")).to_contain_text("Traceback")
    expect(page.locator("#arguments")).to_contain_text("as planned")
    expect(page.locator("#events")).to_contain_text("failed")
    page.screenshot(path=str(shots / "task.png"), full_page=True)

    page.goto(f"{dashboard.url}failed")
    row = page.locator("#failed tr", has_text=bad)
    expect(row).to_have_count(1)
    expect(row).to_contain_text("RuntimeError: as planned")
    row.locator("button.retry").click()
    expect(page.locator("#flash")).to_contain_text("queued again")
    expect(page.locator("#failed tr", has_text=bad)).to_have_count(0, timeout=10_000)
    events = [e.event_type.value for e in place.api.get_events(bad)]
    assert events[-1] == "enqueued" and events.count("enqueued") == 2

    page.goto(f"{dashboard.url}schedules")
    expect(page.locator("#schedules")).to_contain_text("No schedules")

    page.goto(f"{dashboard.url}tasks/{bad}")  # the retried task waits again
    expect(page.locator("#task-status")).to_have_text("pending")
    assert errors == []


def test_failed_filters_bulk_retry_purge_and_schedules(
    browser: Any, place: Place, dashboards: list[Dashboard], tmp_path: Path
) -> None:
    """The failed list filtered (queue, age, function), retried and purged in bulk; the
    schedules with their next and last run, paused, resumed and run now."""
    from playwright.sync_api import expect

    from omniq.schedules import Schedule

    shots = artifacts(f"dashboard-{place.tech}", tmp_path)
    defaults = [place.api.enqueue("omniq.examples:fail", f"boom {i}") for i in range(2)]
    mail = place.api.options(queue="mail").enqueue("omniq.examples:fail", "mail boom")
    code, _, err = run_omniq(["worker", "--burst", "-q", "default", "-q", "mail"], place.env)
    assert code == 0, err
    place.api.add_schedule(Schedule(name="hourly", func="omniq.examples:add", args=(1, 2),
                                    every=3600))
    place.api.add_schedule(Schedule(name="morning", func="omniq.examples:echo",
                                    cron="0 7 * * *", timezone="Europe/Paris", paused=True))
    dashboard = open_dashboard(dashboards, place.env, "--allow-actions")
    page = browser.new_page(viewport=VIEWPORT)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: dialog.accept())  # the purge's confirmation

    page.goto(f"{dashboard.url}failed?queue=mail")
    expect(page.locator("#failed tbody tr")).to_have_count(1)
    expect(page.locator("#failed")).to_contain_text(mail)
    page.fill("#filter-queue", "")
    page.fill("#filter-func", "nothing_*")
    page.click("#failed-filters button[type=submit]")
    expect(page.locator("#failed")).to_contain_text("No failed tasks match")
    bad = post(page, "/api/failed/retry?since=soon", csrf_of(page))
    assert bad["status"] == 400 and "soon" in bad["body"]["error"]
    page.goto(f"{dashboard.url}failed?queue=default&since=1h&func=fai*")
    expect(page.locator("#failed tbody tr")).to_have_count(2)
    expect(page.locator("#failed-summary")).to_contain_text("3 failed tasks are kept")
    page.screenshot(path=str(shots / "failed.png"), full_page=True)
    page.click("#retry-all")
    expect(page.locator("#flash")).to_contain_text("2 failed task(s) queued again")
    expect(page.locator("#failed")).to_contain_text("No failed tasks match", timeout=10_000)
    for task_id in defaults:
        assert [e.event_type.value for e in place.api.get_events(task_id)][-1] == "enqueued"
    page.goto(f"{dashboard.url}failed")
    expect(page.locator("#failed tbody tr")).to_have_count(1)
    page.click("#purge-all")
    expect(page.locator("#flash")).to_contain_text("1 failed task(s) purged")
    expect(page.locator("#failed")).to_contain_text("No failed tasks", timeout=10_000)
    assert place.api.failed() == []

    page.goto(f"{dashboard.url}schedules")
    hourly = page.locator("#schedules tr", has_text="hourly")
    expect(hourly).to_contain_text("every 1h")
    expect(page.locator("#schedules tr", has_text="morning")).to_contain_text("paused")
    expect(page.locator("#schedules tr", has_text="morning")).to_contain_text("Europe/Paris")
    page.screenshot(path=str(shots / "schedules.png"), full_page=True)
    hourly.locator("button.pause").click()
    expect(page.locator("#flash")).to_contain_text("hourly: paused")
    expect(hourly.locator(".pill")).to_have_text("paused", timeout=10_000)
    assert _paused(place, "hourly")
    hourly.locator("button.resume").click()
    expect(hourly.locator(".pill")).to_have_text("active", timeout=10_000)
    hourly.locator("button.run-now").click()
    expect(page.locator("#flash")).to_contain_text("queued")
    task_id = re.search(r"task (\S+) queued", page.locator("#flash").inner_text())
    assert task_id and [e.event_type.value for e in place.api.get_events(task_id.group(1))] \
        == ["enqueued"]
    assert errors == []


def _paused(place: Place, name: str) -> bool:
    return bool(next(s for s in place.api.schedules() if s.name == name).paused)


def test_a_worker_that_starts_shows_without_any_task_event(
    browser: Any, sqlite_place: Place, dashboards: list[Dashboard]
) -> None:
    """The overview reloads on events, and every few seconds besides: a worker (its
    heartbeat, its running count) and wait ages change without any event."""
    from playwright.sync_api import expect

    dashboard = open_dashboard(dashboards, sqlite_place.env)
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(dashboard.url)
    expect(page.locator("#workers")).to_have_text("No live workers.")
    worker = start_omniq(["worker", "-c", "3"], sqlite_place.env)
    try:
        expect(page.locator("#workers")).to_contain_text("0 / 3", timeout=30_000)
    finally:
        code, err = stop(worker)
    assert code == 0, err


def test_read_only_refuses_actions(
    browser: Any, sqlite_place: Place, dashboards: list[Dashboard]
) -> None:
    from playwright.sync_api import expect

    bad = failed_task(sqlite_place)
    dashboard = open_dashboard(dashboards, sqlite_place.env)
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(f"{dashboard.url}failed")
    expect(page.locator("#failed")).to_contain_text(bad)
    expect(page.locator("#mode")).to_have_text("read-only")
    assert page.locator("button.retry").count() == 0  # no button that could only fail
    refused = post(page, f"/api/tasks/{bad}/retry", csrf_of(page))
    assert refused["status"] == 403 and "--allow-actions" in refused["body"]["error"]
    assert page.locator("#retry-all, #purge-all").count() == 0
    for path in ("/api/failed/retry", "/api/failed/purge", "/api/schedules/any/pause",
                 "/api/schedules/any/run-now"):
        refused = post(page, path, csrf_of(page))
        assert refused["status"] == 403 and "--allow-actions" in refused["body"]["error"], path
    page.goto(f"{dashboard.url}tasks/{bad}")
    expect(page.locator("#task-status")).to_have_text("failed")
    assert page.locator("button.retry").count() == 0
    assert [e.event_type.value for e in sqlite_place.api.get_events(bad)][-1] == "failed"


def test_csrf_and_host_checks(
    browser: Any, sqlite_place: Place, dashboards: list[Dashboard]
) -> None:
    bad = failed_task(sqlite_place)
    dashboard = open_dashboard(dashboards, sqlite_place.env, "--allow-actions")
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(dashboard.url)
    path = f"/api/tasks/{bad}/retry"
    for token in (None, "0" * 64, "é"):  # none, wrong, not even ASCII
        for where in (path, "/api/failed/purge", "/api/schedules/x/pause"):
            refused = post(page, where, token)
            assert refused["status"] == 403 and "CSRF" in refused["body"]["error"], refused
    # From another site: no cookie of ours, or an Origin that is not ours.
    assert http(dashboard.url + path[1:], method="POST")[0] == 403
    assert http(dashboard.url + path[1:], method="POST",
                headers={"Origin": "http://evil.example", "X-CSRF-Token": csrf_of(page)})[0] == 403
    # DNS rebinding: a page of another name that resolves to 127.0.0.1 is not served.
    assert http(dashboard.url + "api/overview", headers={"Host": "evil.example"})[0] == 421
    assert [e.event_type.value for e in sqlite_place.api.get_events(bad)][-1] == "failed"
    accepted = post(page, path, csrf_of(page))
    assert accepted["status"] == 200, accepted


def test_token_off_loopback_and_no_secret_on_any_page(
    browser: Any, sqlite_place: Place, dashboards: list[Dashboard], tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    code, _, err = run_omniq(["dashboard", "--host", "0.0.0.0", "--port", "0"], sqlite_place.env)
    assert code == 78 and "needs a token" in err
    with servers.private_redis(password="s3cret-redis-pw", persistent=False) as redis:
        env = {**sqlite_place.env, "OMNIQ_DASHBOARD_TOKEN": TOKEN}
        for role in ("TASK_QUEUE", "RESULT_STORAGE", "EVENT_STORAGE"):
            env[f"OMNIQ_{role}_TYPE"] = "redis"
            env[f"OMNIQ_{role}_URL"] = redis.url
        place = Place("redis", sqlite_place.home, env)
        try:
            bad = failed_task(place)
        finally:
            place.close()
        dashboard = open_dashboard(dashboards, env, "--host", "0.0.0.0", "--allow-actions")
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(dashboard.url)
        expect(page).to_have_url(re.compile(r"/login$"))
        page.fill("input[name=token]", "wrong-token-0123456789")
        page.click("button[type=submit]")
        expect(page.locator(".error")).to_contain_text("not the dashboard's token")
        page.screenshot(path=str(artifacts("dashboard-login", tmp_path) / "login.png"))
        page.fill("input[name=token]", TOKEN)
        page.click("button[type=submit]")
        expect(page.locator("#failures")).to_contain_text(bad)
        seen = [page.content()]
        for path in ("failed", f"tasks/{bad}", "schedules"):
            page.goto(dashboard.url + path)
            page.wait_for_selector("#content > *")
            seen.append(page.content())
        for path in ("api/overview", "api/failed", f"api/tasks/{bad}", "api/events",
                     "api/schedules"):
            seen.append(page.evaluate("async (p) => (await fetch(p)).text()", "/" + path))
        for text in seen:
            assert "s3cret-redis-pw" not in text and TOKEN not in text
        # Scripts: no cookie, no answer; the Bearer token is enough (and needs no CSRF).
        assert http(dashboard.url + "api/overview")[0] == 401
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        status, body = http(dashboard.url + "api/overview", headers=bearer)
        assert status == 200 and body["failed"] == 1
        status, body = http(dashboard.url + f"api/tasks/{bad}/retry", "POST", bearer)
        assert status == 200 and body["queued"] is True


def http(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_dashboard_stops_on_sigterm_with_a_page_open(
    browser: Any, sqlite_place: Place
) -> None:
    dashboard = Dashboard(sqlite_place.env)
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(dashboard.url)
    wait_until(lambda: page.locator("#live").inner_text() == "live", what="the event stream")
    try:
        dashboard.close()  # an open event stream must not hold the exit up
    except subprocess.TimeoutExpired:  # pragma: no cover - reported by the assert below
        pytest.fail("the dashboard did not stop on SIGTERM")
