"""`omniq enqueue` as users run it: real processes on the SQLite default."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.acceptance.conftest import run_burst, run_omniq, start_omniq

TASK_ID_LEN = 36


def enqueue(env: dict[str, str], *args: str) -> str:
    code, out, err = run_omniq(["enqueue", *args], env)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1 and len(lines[0]) == TASK_ID_LEN, out  # the id alone on stdout
    return lines[0]


def result_json(env: dict[str, str], task_id: str) -> dict[str, object]:
    code, out, _err = run_omniq(["result", task_id, "--json"], env)
    record = json.loads(out)
    assert isinstance(record, dict), out
    record["exit_code"] = code
    return record


def test_arguments_and_at_times_run_by_a_burst_worker(cli_env: dict[str, str]) -> None:
    add = enqueue(cli_env, "omniq.examples:add", "2", "3")
    echo = enqueue(
        cli_env,
        "omniq.examples:echo",
        "1",
        "2.5",
        "true",
        "null",
        "hello",
        "[1, 2]",
        '{"a": 1}',
        "NaN",  # not JSON: stays a string
        "--args-json",
        '["tail"]',
        "--kwargs-json",
        '{"x": 1, "y": 2}',
        "-k",
        "x=3",
        "-k",
        "z=text",
    )
    # --at in the past runs at once; without an offset it is local time.
    at_utc = enqueue(cli_env, "omniq.examples:add", "1", "1", "--at", "2020-01-01T00:00:00Z")
    at_local = enqueue(cli_env, "omniq.examples:add", "2", "2", "--at", "2020-01-01T00:00")
    run_burst(cli_env)
    code, out, _ = run_omniq(["result", add], cli_env)
    assert (code, out) == (0, "5\n")
    assert result_json(cli_env, at_utc)["value"] == 2
    assert result_json(cli_env, at_local)["value"] == 4
    value = result_json(cli_env, echo)["value"]
    assert value == {
        "args": [1, 2.5, True, None, "hello", [1, 2], {"a": 1}, "NaN", "tail"],
        "kwargs": {"x": 3, "y": 2, "z": "text"},
    }


def test_json_output_and_options(cli_env: dict[str, str]) -> None:
    code, out, err = run_omniq(
        ["enqueue", "omniq.examples:add", "1", "2", "--json", "-q", "mail", "--delay", "1h",
         "--priority", "5", "--retries", "2", "--timeout", "30s", "--ttl", "2h"],
        cli_env,
    )  # fmt: skip
    assert code == 0, err
    record = json.loads(out)
    assert record["queue"] == "mail" and record["func"] == "omniq.examples:add"
    assert record["eta"].endswith("Z") and record["duplicate"] is False
    code, out, _ = run_omniq(["status", "--json"], cli_env)
    queues = {q["queue"]: q for q in json.loads(out)["queues"]}
    assert queues["mail"]["scheduled"] == 1 and queues["mail"]["queued"] == 0


def test_unique_key_prints_the_existing_id(cli_env: dict[str, str]) -> None:
    first = enqueue(cli_env, "omniq.examples:add", "1", "2", "--key", "nightly")
    code, out, err = run_omniq(
        ["enqueue", "omniq.examples:add", "1", "2", "--key", "nightly"], cli_env
    )
    assert code == 0 and out.strip() == first
    assert "already queued" in err


def test_wait_exits_with_the_task_outcome(cli_env: dict[str, str]) -> None:
    ok = start_omniq(["enqueue", "omniq.examples:add", "2", "3", "--wait"], cli_env)
    bad = start_omniq(["enqueue", "omniq.examples:fail", "boom", "--wait"], cli_env)
    try:
        # Each prints its id once queued: only then can a burst worker find both.
        ok_id, bad_id = ok.stdout.readline().strip(), bad.stdout.readline().strip()  # type: ignore[union-attr]
        assert len(ok_id) == len(bad_id) == TASK_ID_LEN
        run_burst(cli_env)
        ok_out, _ = ok.communicate(timeout=30)
        bad_out, bad_err = bad.communicate(timeout=30)
    finally:
        for proc in (ok, bad):
            if proc.poll() is None:
                proc.kill()
    assert ok.returncode == 0 and ok_out.strip() == "5"
    assert bad.returncode == 1 and bad_out == ""
    assert "RuntimeError: boom" in bad_err and "Remote traceback" in bad_err


def test_wait_timeout_exits_3(cli_env: dict[str, str]) -> None:
    code, out, err = run_omniq(
        ["enqueue", "omniq.examples:add", "1", "2", "--wait-timeout", "0.3s"], cli_env
    )
    assert code == 3, err
    assert len(out.strip()) == TASK_ID_LEN  # the id is printed before waiting
    assert "no result" in err


def test_from_file_and_stdin(cli_env: dict[str, str], tmp_path: Path) -> None:
    lines = [
        '{"func": "omniq.examples:add", "args": [1, 2]}',
        "",
        "# comments and blank lines are skipped",
        '{"func": "omniq.examples:echo", "kwargs": {"a": true}, "queue": "other", "priority": 3}',
        '{"func": "omniq.examples:add", "args": [5, 5], "delay": "1h"}',
    ]
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, out, err = run_omniq(["enqueue", "--from-file", str(path)], cli_env)
    assert code == 0, err
    ids = out.split()
    assert len(ids) == 3 and all(len(i) == TASK_ID_LEN for i in ids)
    code, out, err = run_omniq(
        ["enqueue", "--from-file", "-", "-q", "other"],
        cli_env,
        input='{"func": "omniq.examples:add", "args": [10, 20]}\n',
    )
    assert code == 0, err
    run_burst(cli_env, "-q", "default", "-q", "other")
    assert result_json(cli_env, ids[0])["value"] == 3
    assert result_json(cli_env, ids[1])["value"] == {"args": [], "kwargs": {"a": True}}
    assert result_json(cli_env, ids[2])["exit_code"] == 3  # scheduled in an hour
    assert result_json(cli_env, out.strip())["queue"] == "other"


def test_a_bad_line_is_reported_by_number_and_nothing_is_queued(
    cli_env: dict[str, str],
) -> None:
    text = '{"func": "omniq.examples:add", "args": [1, 2]}\n\n{"func": "add"}\n'
    code, out, err = run_omniq(["enqueue", "--from-file", "-"], cli_env, input=text)
    assert code == 2 and out == ""
    assert "stdin line 3" in err and "package.module:function" in err
    code, out, err = run_omniq(["enqueue", "--from-file", "-"], cli_env, input="[1]\n")
    assert code == 2 and "line 1" in err
    code, out, _ = run_omniq(["status", "--json"], cli_env)
    assert json.loads(out)["queues"] == [] or all(
        q["queued"] == 0 for q in json.loads(out)["queues"]
    )


def test_shell_tasks(cli_env: dict[str, str]) -> None:
    argv = enqueue(cli_env, "--shell", "--", "echo", "hello", "$HOME")
    sh = enqueue(cli_env, "--sh", "echo one; exit 3")
    run_burst(cli_env, "--allow-shell")
    value = result_json(cli_env, argv)["value"]
    assert isinstance(value, dict)
    assert value["exit_code"] == 0 and value["stdout"] == "hello $HOME\n"  # no interpolation
    failed = result_json(cli_env, sh)
    assert failed["exit_code"] == 1 and failed["status"] == "failed"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuchmodule_xyz:run"], "unknown module 'nosuchmodule_xyz'"),
        (["omniq.examples:nope"], "unknown function 'nope'"),
        (["omniq.examples.add"], "did you mean 'omniq.examples:add'"),
        (["omniq.examples:add", "--delay", "5 minutes"], "invalid duration"),
        (["omniq.examples:add", "-q", "bad/queue"], "invalid queue name"),
        (["omniq.examples:add", "--args-json", "[1,"], "--args-json is not valid JSON"),
        (["omniq.examples:add", "--kwargs-json", "[1]"], "must be an object in JSON"),
        (["omniq.examples:add", "--at", "tomorrow"], "ISO 8601"),
        (["omniq.examples:add", "--delay", "1m", "--at", "2030-01-01T00:00"], "not both"),
        (["--shell"], "needs a command"),
        (["--sh", "ls", "omniq.examples:add"], "no FUNC"),
        ([], "missing FUNC"),
        (["--from-file", "missing.jsonl"], "cannot read missing.jsonl"),
    ],
)
def test_user_mistakes_exit_2_without_traceback(
    cli_env: dict[str, str], args: list[str], message: str
) -> None:
    code, out, err = run_omniq(["enqueue", *args], cli_env)
    assert code == 2, err
    assert out == ""
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2


def test_no_check_queues_code_only_the_workers_have(cli_env: dict[str, str]) -> None:
    task_id = enqueue(cli_env, "--no-check", "nosuchmodule_xyz:run", "1")
    code, out, _ = run_omniq(["events", task_id, "--json"], cli_env)
    assert code == 0 and json.loads(out)["details"]["func"] == "nosuchmodule_xyz:run"


def test_modules_of_the_current_directory_are_checked(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "mytasks_cli.py").write_text("def job(x):\n    return x * 2\n")
    enqueue(cli_env, "mytasks_cli:job", "21")
    code, _, err = run_omniq(["enqueue", "mytasks_cli:other"], cli_env)
    assert code == 2 and "unknown function 'other'" in err


def test_bad_config_exits_78(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "OMNIQ_WORKER_CONCURRENCY": "abc"}
    code, out, err = run_omniq(["enqueue", "omniq.examples:add", "1", "2"], env)
    assert code == 78 and out == ""
    assert "OMNIQ_WORKER_CONCURRENCY" in err and "Traceback" not in err


def test_unreachable_backend_exits_69(cli_env: dict[str, str]) -> None:
    env = {
        **cli_env,
        "OMNIQ_TASK_QUEUE_TYPE": "redis",
        "OMNIQ_TASK_QUEUE_URL": "redis://127.0.0.1:1",
    }
    code, out, err = run_omniq(["enqueue", "omniq.examples:add", "1", "2"], env)
    assert code == 69 and out == ""
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2


def test_verbose_shows_the_traceback(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "OMNIQ_WORKER_CONCURRENCY": "abc"}
    code, _, err = run_omniq(["enqueue", "-v", "omniq.examples:add"], env)
    assert code == 78 and "Traceback" in err


def test_stdin_is_left_alone_without_from_file(cli_env: dict[str, str]) -> None:
    proc = start_omniq(["enqueue", "omniq.examples:add", "1", "2"], cli_env, stdin=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)  # stdin stays open until communicate closes it
    assert proc.returncode == 0, err
    assert len(out.strip()) == TASK_ID_LEN
