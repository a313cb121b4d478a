"""`omniq worker` as users run it: real processes, SQLite under a temporary OMNIQ_HOME.

Also holds the small process helpers the other test_worker_* files import.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.conftest import CLI, clean_env


def wait_until(check: Callable[[], Any], limit: float = 30.0, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy (a bound on waiting, not a speed test)."""
    deadline = time.monotonic() + limit
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {limit:g}s")
        time.sleep(0.05)


class WorkerProcess:
    """A running `omniq worker`; its stderr goes to a file the test can read at any time."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log_path = log

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, limit: float = 30.0) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None and text not in self.log:
                raise AssertionError(f"worker exited ({self.proc.returncode}):\n{self.log}")
            return text in self.log

        wait_until(seen, limit, f"{text!r} in the worker log")

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, limit: float = 60.0) -> int:
        try:
            return self.proc.wait(limit)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"worker did not exit within {limit:g}s:\n{self.log}") from None


class Home:
    """One temporary OMNIQ_HOME with a clean environment; runs `omniq` in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.env = clean_env(path / "home", PYTHONUNBUFFERED="1")
        self._workers: list[WorkerProcess] = []
        self._api: Any = None

    def run(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        timeout: float = 90,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args],
            cwd=self.path,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )

    def enqueue(self, *args: str) -> str:
        """`omniq enqueue ARGS`; prints the task id."""
        proc = self.run("enqueue", *args)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    def submit(self, func: str, *args: Any, **options: Any) -> str:
        """Enqueue through the Python API: the same stores, without a process per task."""
        return str(self.api.options(**options).enqueue(func, *args))

    def burst(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = self.run("worker", "--burst", *args, env=env)
        assert proc.returncode == 0, proc.stderr
        return proc

    def start_worker(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        ready: bool = True,
        own_group: bool = False,
    ) -> WorkerProcess:
        """`own_group`: the worker leads a process group of its own, as under systemd
        or a shell's job control, so a test can signal the whole group."""
        log = self.path / f"worker-{len(self._workers) + 1}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [*CLI, "worker", *args],
                cwd=self.path,
                env={**self.env, **(env or {})},
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=own_group,
            )
        worker = WorkerProcess(proc, log)
        self._workers.append(worker)
        if ready:  # signal handlers are installed before this line is logged
            worker.wait_log(" started: ")
        return worker

    def result(self, task_id: str) -> dict[str, Any]:
        """The stored outcome, shaped like `omniq result --json` ({"status": "pending"} if none)."""
        from omniq.errors import ResultTimeout

        try:
            result = self.api.wait_result(task_id, timeout=0)
        except ResultTimeout:
            return {"task_id": task_id, "status": "pending"}
        return {
            "task_id": task_id,
            "status": result.status.value,
            "value": result.value,
            "error_type": result.error_type,
            "error_message": result.error_message,
            "traceback": result.traceback,
        }

    # Observing progress goes through the Python API: cheaper than a process per poll.
    @property
    def api(self) -> Any:
        if self._api is None:
            from omniq import OmniQ
            from omniq.config import OmniQConfig

            self._api = OmniQ(OmniQConfig.from_values(home=str(self.path / "home")))
        return self._api

    def events(self, task_id: str) -> list[str]:
        return [e.event_type.value for e in self.api.get_events(task_id)]

    def wait_started(self, task_id: str) -> None:
        wait_until(lambda: "started" in self.events(task_id), what=f"task {task_id} started")

    def close(self) -> None:
        for worker in self._workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()
        if self._api is not None:
            self._api.close()


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    h = Home(tmp_path)
    yield h
    h.close()


# --- the basics ---------------------------------------------------------------------------


def test_enqueue_then_burst_worker_then_result(home: Home) -> None:
    task_id = home.enqueue("omniq.examples:add", "2", "3")
    proc = home.burst()
    assert f"task {task_id} add@default completed" in proc.stderr
    assert "\x1b[" not in proc.stderr  # no colour when stderr is not a terminal
    result = home.run("result", task_id)
    assert (result.returncode, result.stdout.strip()) == (0, "5")
    assert home.events(task_id) == ["enqueued", "started", "completed"]


def test_status_shows_what_runs_now(home: Home) -> None:
    """Not what ran at the last heartbeat (every 10 s with the default 30 s lease)."""

    def running() -> list[str]:
        (info,) = json.loads(home.run("status", "--json").stdout)["workers"]
        return list(info["current_tasks"])

    worker = home.start_worker()
    time.sleep(1.5)  # past the first registration
    task_id = home.submit("omniq.examples:sleep", 4, "done")
    started = time.monotonic()
    wait_until(lambda: running() == [task_id], 10, "the task in `omniq status`")
    assert time.monotonic() - started < 4  # seen while it runs
    wait_until(lambda: running() == [], 15, "the finished task gone from `omniq status`")
    worker.send(signal.SIGTERM)
    assert worker.wait() == 0


def test_burst_with_nothing_queued_exits_zero(home: Home) -> None:
    proc = home.burst()
    assert "stopped: 0 tasks done" in proc.stderr


def test_queues_in_the_order_given_and_max_tasks(home: Home) -> None:
    first = home.submit("omniq.examples:add", 1, 1)
    urgent = home.submit("omniq.examples:add", 2, 2, queue="high")
    later = home.submit("omniq.examples:add", 3, 3)
    proc = home.run("worker", "-q", "high", "-q", "default", "-c", "1", "--max-tasks", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.index(f"task {urgent} add@high completed") < proc.stderr.index(
        f"task {first} add@default completed"
    )
    assert home.result(later)["status"] == "pending"


def test_json_logs_are_one_object_per_line(home: Home) -> None:
    task_id = home.submit("omniq.examples:fail", "nope")
    proc = home.burst("--log-format", "json")
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    failed = [r for r in records if task_id in r["message"]]
    assert (
        failed and failed[0]["level"] == "WARNING" and "RuntimeError: nope" in failed[0]["message"]
    )


def test_task_modules_next_to_the_worker_are_importable(home: Home) -> None:
    (home.path / "myapp_tasks.py").write_text("def double(x):\n    return 2 * x\n")
    task_id = home.submit("myapp_tasks:double", 21)
    home.burst("--task-modules", "myapp_tasks")
    assert home.result(task_id)["value"] == 42


# --- signals --------------------------------------------------------------------------------


def test_sigterm_lets_the_running_task_finish(home: Home) -> None:
    task_id = home.submit("omniq.examples:sleep", 3, "done")
    worker = home.start_worker()
    home.wait_started(task_id)
    worker.send(signal.SIGTERM)
    worker.wait_log("shutting down (1 running; send again to force)")
    assert worker.wait() == 0
    result = home.result(task_id)
    assert (result["status"], result["value"]) == ("completed", "done")


def test_sigterm_past_the_shutdown_timeout_releases_the_task(home: Home) -> None:
    task_id = home.submit("omniq.examples:sleep", 4, "late")
    worker = home.start_worker("--shutdown-timeout", "1")
    home.wait_started(task_id)
    worker.send(signal.SIGTERM)
    assert worker.wait() == 0
    assert f"task {task_id} sleep@default released back to its queue" in worker.log
    assert home.result(task_id)["status"] == "pending"  # neither lost nor failed
    home.burst()
    result = home.result(task_id)
    assert (result["status"], result["value"]) == ("completed", "late")
    assert home.events(task_id).count("started") == 2


def test_second_signal_forces_exit(home: Home) -> None:
    task_id = home.submit("omniq.examples:sleep", 60)
    worker = home.start_worker()  # default shutdown timeout: 30s
    home.wait_started(task_id)
    worker.send(signal.SIGINT)
    worker.wait_log("send again to force")
    worker.send(signal.SIGINT)
    assert worker.wait(20) == 128 + signal.SIGINT
    assert f"task {task_id} sleep@default released" in worker.log
    assert home.result(task_id)["status"] == "pending"
    stats = json.loads(home.run("status", "--json").stdout)
    assert [q["queued"] for q in stats["queues"] if q["queue"] == "default"] == [1]


# --- what the daemon refuses ------------------------------------------------------------------


def test_allow_list_refuses_other_modules_and_names_the_setting(home: Home) -> None:
    refused = home.submit("json:dumps", [1])
    home.burst()
    result = home.result(refused)
    assert result["status"] == "failed"
    assert "task_modules" in result["error_message"]
    assert "--task-modules 'json'" in result["error_message"]
    allowed = home.submit("json:dumps", [1])
    home.burst("--task-modules", "other.*", "--task-modules", "js*")
    assert home.result(allowed)["value"] == "[1]"


def test_shell_tasks_need_allow_shell(home: Home) -> None:
    refused = home.enqueue("--shell", "--", "echo", "hi")
    home.burst()
    result = home.result(refused)
    assert result["status"] == "failed" and "--allow-shell" in result["error_message"]
    allowed = home.enqueue("--shell", "--", "echo", "hi")
    home.burst("--allow-shell")
    result = home.result(allowed)
    assert result["status"] == "completed"
    assert result["value"] == {"exit_code": 0, "stdout": "hi\n", "stderr": ""}


# --- several workers ------------------------------------------------------------------------


def test_two_workers_drain_one_queue_each_task_once(home: Home) -> None:
    lines = [json.dumps({"func": "omniq.examples:sleep", "args": [0.01, i]}) for i in range(200)]
    proc = home.run("enqueue", "--from-file", "-", input="\n".join(lines) + "\n")
    assert proc.returncode == 0, proc.stderr
    ids = proc.stdout.split()
    assert len(ids) == 200
    workers = [home.start_worker("--burst", "-c", "4", ready=False) for _ in range(2)]
    assert [w.wait(120) for w in workers] == [0, 0]
    done = [line for w in workers for line in w.log.splitlines() if " completed" in line]
    assert len(done) == 200
    for task_id in ids:
        assert home.events(task_id).count("completed") == 1
    values = [home.api.get_result(task_id, timeout=0) for task_id in ids]
    assert values == list(range(200))


# --- errors users make ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [("--shutdown-timeout", "soon"), ("-q", "no spaces"), ("--pool", "fork"), ("-c", "0")],
)
def test_bad_options_are_usage_errors(home: Home, args: tuple[str, ...]) -> None:
    proc = home.run("worker", *args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2


def test_bad_configuration_exits_78(home: Home) -> None:
    proc = home.run("worker", env={"OMNIQ_WORKER_CONCURRENCY": "zero"})
    assert proc.returncode == 78
    assert "OMNIQ_WORKER_CONCURRENCY" in proc.stderr and "Traceback" not in proc.stderr


def test_unreachable_store_exits_69(home: Home) -> None:
    pytest.importorskip("redis")
    env = {"OMNIQ_TASK_QUEUE_TYPE": "redis", "OMNIQ_TASK_QUEUE_URL": "redis://127.0.0.1:1/0"}
    proc = home.run("worker", env=env)
    assert proc.returncode == 69
    assert "unavailable" in proc.stderr and "Traceback" not in proc.stderr
