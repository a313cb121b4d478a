"""`omniq result`, `omniq events` and `omniq tail` against real worker processes."""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from omniq.models import EventType, TaskEvent, new_task_id, utcnow
from tests.acceptance.conftest import clean_env, run_burst, run_omniq, start_omniq

UNKNOWN_ID = "01900000-0000-7000-8000-000000000000"


def enqueue(env: dict[str, str], *args: str) -> str:
    code, out, err = run_omniq(["enqueue", *args], env)
    assert code == 0, err
    return out.strip()


class Lines:
    """Reads a process's stdout on a thread, so a test can wait for a line with a bound."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for text in self.proc.stdout:
            self._queue.put(text)
        self._queue.put(None)

    def wait_for(self, match: Callable[[str], bool], limit: float = 30.0) -> str:
        deadline = time.monotonic() + limit
        while (left := deadline - time.monotonic()) > 0:
            try:
                text = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if text is None:
                raise AssertionError(f"process ended; output so far: {self.seen}")
            self.seen.append(text)
            if match(text):
                return text
        raise AssertionError(f"no matching line within {limit:g}s; output so far: {self.seen}")

    def stop(self) -> tuple[int, str]:
        """Ctrl-C, as a user would; returns (exit code, stderr)."""
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return self.proc.returncode, err


def events_of(lines: list[str], task_id: str) -> list[str]:
    return [e["event_type"] for e in map(json.loads, lines) if e["task_id"] == task_id]


@pytest.fixture(scope="module")
def done_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A home shared by the tests below (one burst worker run for all of them)."""
    return clean_env(tmp_path_factory.mktemp("done") / "home")


@pytest.fixture(scope="module")
def finished(done_env: dict[str, str]) -> dict[str, str]:
    """One completed and one failed task, run by a burst worker."""
    ids = {
        "ok": enqueue(done_env, "omniq.examples:add", "2", "3"),
        "failed": enqueue(done_env, "omniq.examples:fail", "kaboom"),
    }
    run_burst(done_env)
    return ids


# --- result -----------------------------------------------------------------------------------


def test_result_prints_the_value_or_the_remote_error(
    done_env: dict[str, str], finished: dict[str, str]
) -> None:
    assert run_omniq(["result", finished["ok"]], done_env)[:2] == (0, "5\n")
    code, out, err = run_omniq(["result", finished["failed"]], done_env)
    assert code == 1 and out == ""
    assert "RuntimeError: kaboom" in err
    assert "Remote traceback" in err and 'examples.py", line' in err
    code, out, _ = run_omniq(["result", finished["failed"], "--json"], done_env)
    record = json.loads(out)
    assert code == 1 and record["status"] == "failed" and record["error_type"] == "RuntimeError"
    assert record["finished_at"].endswith("Z")


def test_result_of_a_pending_task_exits_3(cli_env: dict[str, str]) -> None:
    task_id = enqueue(cli_env, "omniq.examples:add", "1", "2")
    code, out, err = run_omniq(["result", task_id], cli_env)
    assert code == 3 and out == "" and "no result yet" in err and "--wait" in err
    code, out, _ = run_omniq(["result", task_id, "--json"], cli_env)
    assert code == 3 and json.loads(out) == {"task_id": task_id, "status": "pending"}
    code, _, err = run_omniq(["result", task_id, "--timeout", "0.3s"], cli_env)
    assert code == 3 and "after waiting 0.3s" in err


def test_result_wait_returns_once_a_worker_ran_it(cli_env: dict[str, str]) -> None:
    task_id = enqueue(cli_env, "omniq.examples:add", "20", "22")
    waiting = start_omniq(["result", task_id, "--wait"], cli_env)
    try:
        run_burst(cli_env)
        out, err = waiting.communicate(timeout=30)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, err
    assert out == "42\n"


@pytest.mark.parametrize("command", ["result", "events"])
def test_unknown_and_malformed_ids(cli_env: dict[str, str], command: str) -> None:
    code, out, err = run_omniq([command, UNKNOWN_ID], cli_env)
    assert (code, out) == (4, "") and "no task with id" in err
    code, out, err = run_omniq([command, "not-an-id"], cli_env)
    assert (code, out) == (2, "") and "is not a task id" in err
    assert "Traceback" not in err


# --- events -----------------------------------------------------------------------------------


def test_events_plain_and_json(done_env: dict[str, str], finished: dict[str, str]) -> None:
    code, out, err = run_omniq(["events", finished["ok"]], done_env)
    assert code == 0, err
    rows = [line.split("\t") for line in out.splitlines()]
    assert [r[1] for r in rows] == ["enqueued", "started", "completed"]
    assert rows[0][0].endswith("Z") and rows[1][2] == "1" and rows[1][3] != "-"
    assert "func=omniq.examples:add" in rows[0][4]
    assert "\x1b[" not in out  # no colour when not a terminal
    code, out, _ = run_omniq(["events", finished["failed"], "--json"], done_env)
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["event_type"] for r in records] == ["enqueued", "started", "failed"]
    assert records[-1]["task_id"] == finished["failed"] and records[-1]["attempt"] == 1


# --- tail -------------------------------------------------------------------------------------


def test_tail_follows_tasks_run_by_another_process(cli_env: dict[str, str]) -> None:
    before = enqueue(cli_env, "omniq.examples:add", "1", "1")
    tail = Lines(start_omniq(["tail", "--json"], cli_env))
    try:
        # Tail follows from "now": queue probes until one shows, then it is surely live.
        for _ in range(20):
            probe = enqueue(cli_env, "omniq.examples:add", "0", "0")
            try:
                tail.wait_for(lambda text, p=probe: p in text, limit=3)
                break
            except AssertionError:
                continue
        task_id = enqueue(cli_env, "omniq.examples:add", "2", "2")
        run_burst(cli_env)
        tail.wait_for(lambda text: task_id in text and '"completed"' in text)
    finally:
        code, err = tail.stop()
    assert code == 0 and "Traceback" not in err
    assert events_of(tail.seen, task_id) == ["enqueued", "started", "completed"]
    assert events_of(tail.seen, before)[0] == "started"  # its enqueue came before tail started
    assert all(json.loads(line)["cursor"] for line in tail.seen)


def test_tail_backlog_filters_and_ctrl_c(
    done_env: dict[str, str], finished: dict[str, str]
) -> None:
    failed = finished["failed"]
    tail = Lines(start_omniq(["tail", "-n", "2", "--task", failed, "--json"], done_env))
    try:
        tail.wait_for(lambda text: True)
        tail.wait_for(lambda text: True)
    finally:
        code, err = tail.stop()
    assert (code, err) == (0, "")
    assert [json.loads(t)["event_type"] for t in tail.seen] == ["started", "failed"]

    tail = Lines(start_omniq(["tail", "--since", "1h", "--type", "COMPLETED"], done_env))
    try:
        line = tail.wait_for(lambda text: True)
        follow_up = enqueue(done_env, "omniq.examples:add", "1", "1")
        run_burst(done_env)
        tail.wait_for(lambda text: follow_up in text)
    finally:
        code, _ = tail.stop()
    assert code == 0
    fields = line.rstrip("\n").split("\t")
    assert fields[1:4] == [finished["ok"], "completed", "1"]
    assert all("\tcompleted\t" in text for text in tail.seen)

    tail = Lines(start_omniq(["tail", "--since", "1h", "--task", finished["failed"]], done_env))
    try:
        tail.wait_for(lambda text: "\tfailed\t" in text)
    finally:
        tail.stop()
    assert all(finished["failed"] in text for text in tail.seen) and len(tail.seen) == 3


def append_events(env: dict[str, str], events: list[TaskEvent]) -> None:
    """Write events straight into the event store the `omniq` command of `env` uses."""
    from omniq import registry
    from omniq.config import OmniQConfig

    kind, settings = OmniQConfig.load(env=env, use_files=False).store("event_storage")

    async def main() -> None:
        store = registry.create(kind, "events", settings)
        await store.open()
        try:
            await store.append_many(events)
        finally:
            await store.close()

    asyncio.run(main())


def logged(count: int, kind: EventType = EventType.ENQUEUED, age: float = 0) -> list[TaskEvent]:
    stamp = utcnow() - timedelta(seconds=age)
    return [TaskEvent(new_task_id(), kind, timestamp=stamp, queue="q") for _ in range(count)]


def tail_json(
    env: dict[str, str], args: list[str], expect: int
) -> tuple[Lines, list[dict[str, Any]]]:
    """Start `omniq tail --json ARGS` and read its first `expect` lines."""
    tail = Lines(start_omniq(["tail", "--json", *args], env))
    try:
        for _ in range(expect):
            tail.wait_for(lambda text: True)
    except BaseException:
        tail.stop()
        raise
    return tail, [json.loads(line) for line in tail.seen]


def test_tail_last_n_shows_the_newest_then_follows(cli_env: dict[str, str]) -> None:
    backlog = logged(1200)  # more than one backward page
    append_events(cli_env, backlog)
    tail, shown = tail_json(cli_env, ["-n", "3"], 3)
    try:
        later = logged(2, EventType.STARTED)
        append_events(cli_env, later)
        tail.wait_for(lambda text: later[-1].task_id in text)
    finally:
        code, err = tail.stop()
    assert (code, err) == (0, "")
    records = [json.loads(line) for line in tail.seen]
    assert [r["task_id"] for r in records] == [e.task_id for e in backlog[-3:] + later]
    cursors = [r["cursor"] for r in records]
    assert cursors == sorted(set(cursors))  # in log order, none twice
    assert shown == records[:3]


def test_tail_last_n_with_filters_pages_back_to_old_matches(cli_env: dict[str, str]) -> None:
    failures = logged(3, EventType.FAILED)
    append_events(cli_env, [*failures, *logged(1100)])
    tail, shown = tail_json(cli_env, ["-n", "2", "--type", "failed"], 2)
    tail.stop()
    assert [r["task_id"] for r in shown] == [e.task_id for e in failures[1:]]

    tail, shown = tail_json(cli_env, ["-n", "10", "--type", "failed"], 3)  # only 3 exist
    try:
        follow_up = logged(1, EventType.FAILED)
        append_events(cli_env, [*logged(2), *follow_up])
        tail.wait_for(lambda text: follow_up[0].task_id in text)
    finally:
        code, _ = tail.stop()
    assert code == 0
    ids = [e.task_id for e in [*failures, *follow_up]]
    assert [json.loads(line)["task_id"] for line in tail.seen] == ids


def test_tail_since_pages_back_to_the_cutoff(cli_env: dict[str, str]) -> None:
    recent = logged(700)  # more than one backward page inside the window
    append_events(cli_env, [*logged(600, age=7200), *recent])
    tail, shown = tail_json(cli_env, ["--since", "10m"], 700)
    try:
        follow_up = logged(1, EventType.COMPLETED)
        append_events(cli_env, follow_up)
        tail.wait_for(lambda text: follow_up[0].task_id in text)
    finally:
        code, _ = tail.stop()
    assert code == 0
    ids = [json.loads(line)["task_id"] for line in tail.seen]
    assert ids == [e.task_id for e in [*recent, *follow_up]]

    tail, shown = tail_json(cli_env, ["--since", "10m", "-n", "2"], 2)
    tail.stop()
    assert [r["task_id"] for r in shown] == [recent[-1].task_id, follow_up[0].task_id]


def test_tail_backlog_of_an_empty_log_then_follows(cli_env: dict[str, str]) -> None:
    tail = Lines(start_omniq(["tail", "-n", "5", "--json"], cli_env))
    try:
        first = logged(1)
        append_events(cli_env, first)
        tail.wait_for(lambda text: first[0].task_id in text)
    finally:
        code, _ = tail.stop()
    assert code == 0 and len(tail.seen) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--type", "finished"], "unknown event type 'finished'"),
        (["--since", "yesterday"], "invalid duration"),
        (["--task", "nope"], "is not a task id"),
        (["--queue", "no spaces"], "invalid queue name"),
    ],
)
def test_tail_mistakes(cli_env: dict[str, str], args: list[str], message: str) -> None:
    code, out, err = run_omniq(["tail", *args], cli_env)
    assert code == 2 and out == "" and message in err


def test_commands_give_help_with_examples(cli_env: dict[str, str]) -> None:
    commands: list[Any] = [
        [], ["enqueue"], ["result"], ["events"], ["tail"], ["status"], ["cancel"], ["retry"],
        ["purge"], ["config"], ["config", "show"], ["config", "check"], ["worker"],
    ]  # fmt: skip
    for command in commands:
        code, out, err = run_omniq([*command, "--help"], cli_env)
        assert code == 0, err
        assert "Examples:" in out, command
        if command != ["config"]:  # the group only lists its commands
            assert "--config" in out and "--verbose" in out, command


def test_help_has_no_type_artefacts_and_result_json_has_its_own_text(
    cli_env: dict[str, str],
) -> None:
    texts = {}
    for command in ("enqueue", "result", "events", "tail", "status", "cancel", "retry",
                    "purge", "worker"):  # fmt: skip
        code, out, err = run_omniq([command, "--help"], cli_env)
        assert code == 0, err
        texts[command] = out
        for artefact in ("{TASK_ID}", "<str>", "<list", "<int>", "Value error"):
            assert artefact not in out, (command, artefact)
    json_help = [line for line in texts["result"].splitlines() if "--json" in line]
    assert json_help and "events" not in json_help[0]  # not the events' "JSON lines" text
    code, _, err = run_omniq(["worker", "-c", "x"], cli_env)
    assert code == 2 and "Value error" not in err and "'x'" in err
