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
    assert f"duplicate of {first}: key 'nightly' is held while it is unfinished" in err
    code, out, err = run_omniq(
        ["enqueue", "omniq.examples:add", "1", "2", "--key", "nightly", "--json"], cli_env
    )
    assert code == 0 and json.loads(out) == {**json.loads(out), "id": first, "duplicate": True}
    code, _, err = run_omniq(["enqueue", "omniq.examples:add", "--key-ttl", "1d"], cli_env)
    assert code == 2 and "--key-ttl needs --key" in err


def test_a_key_stays_held_after_its_task_finished(cli_env: dict[str, str]) -> None:
    # The cron case: a key per day runs once a day, however often cron enqueues it.
    daily = enqueue(cli_env, "omniq.examples:add", "1", "2", "--key", "report-2030-01-31")
    brief = enqueue(cli_env, "omniq.examples:add", "1", "2", "--key", "k", "--key-ttl", "0")
    run_burst(cli_env)
    code, out, err = run_omniq(
        ["enqueue", "omniq.examples:add", "1", "2", "--key", "report-2030-01-31"], cli_env
    )
    assert code == 0 and out.strip() == daily
    assert f"duplicate of {daily}: key 'report-2030-01-31' is held until 20" in err
    again = enqueue(cli_env, "omniq.examples:add", "1", "2", "--key", "k", "--key-ttl", "0")
    assert again != brief  # --key-ttl 0: held only while unfinished


def test_wait_exits_with_the_task_outcome(cli_env: dict[str, str]) -> None:
    ok = start_omniq(["enqueue", "omniq.examples:add", "2", "3", "--wait"], cli_env)
    bad = start_omniq(["enqueue", "omniq.examples:fail", "boom", "--wait"], cli_env)
    try:
        # Each prints its id on stderr once queued: only then can a burst worker find both.
        ok_id, bad_id = ok.stderr.readline().strip(), bad.stderr.readline().strip()  # type: ignore[union-attr]
        assert len(ok_id) == len(bad_id) == TASK_ID_LEN
        run_burst(cli_env)
        ok_out, _ = ok.communicate(timeout=30)
        bad_out, bad_err = bad.communicate(timeout=30)
    finally:
        for proc in (ok, bad):
            if proc.poll() is None:
                proc.kill()
    assert ok.returncode == 0 and ok_out == "5\n"  # x=$(omniq enqueue ... --wait) is the value
    assert bad.returncode == 1 and bad_out == ""
    assert "RuntimeError: boom" in bad_err and "Remote traceback" in bad_err


def test_wait_timeout_exits_3(cli_env: dict[str, str]) -> None:
    code, out, err = run_omniq(
        ["enqueue", "omniq.examples:add", "1", "2", "--wait-timeout", "0.3s"], cli_env
    )
    assert code == 3, err
    assert out == "" and len(err.splitlines()[0]) == TASK_ID_LEN  # the id, before waiting
    assert "no result" in err


def test_wait_json_is_one_record_with_id_and_result(cli_env: dict[str, str]) -> None:
    worker = start_omniq(["worker"], cli_env)
    try:
        code, out, err = run_omniq(
            ["enqueue", "omniq.examples:add", "2", "3", "--wait", "--json"], cli_env
        )
    finally:
        worker.terminate()
        worker.communicate(timeout=60)
    assert code == 0, err
    (record,) = [json.loads(text) for text in out.splitlines()]
    assert len(record["id"]) == TASK_ID_LEN and record["duplicate"] is False
    assert record["result"]["value"] == 5 and record["result"]["task_id"] == record["id"]


def test_waiting_with_no_worker_for_the_queue_says_so_once(cli_env: dict[str, str]) -> None:
    worker = start_omniq(["worker", "-q", "other"], cli_env)  # alive, but not for 'lonely'
    try:
        code, out, err = run_omniq(
            ["enqueue", "omniq.examples:add", "1", "2", "-q", "lonely", "--wait-timeout", "5s"],
            cli_env,
        )
        task_id = err.splitlines()[0]
        rcode, _, rerr = run_omniq(["result", task_id, "--timeout", "4s"], cli_env)
    finally:
        worker.terminate()
        worker.communicate(timeout=60)
    hint = "no live worker serves queue 'lonely'; start one with: omniq worker -q lonely"
    assert code == 3 and out == "" and err.count(hint) == 1, err
    assert rcode == 3 and rerr.count(hint) == 1, rerr
    served = start_omniq(["worker", "-q", "busy"], cli_env)
    try:
        code, _, err = run_omniq(
            ["enqueue", "omniq.examples:sleep", "5", "-q", "busy", "--wait-timeout", "4s"],
            cli_env,
        )
    finally:
        served.terminate()
        served.communicate(timeout=60)
    assert code == 3 and "no live worker" not in err, err


def test_from_file_and_stdin(cli_env: dict[str, str], tmp_path: Path) -> None:
    lines = [
        '{"func": "omniq.examples:add", "args": [1, 2]}',
        "",
        "# comments and blank lines are skipped",
        '{"func": "omniq.examples:echo", "kwargs": {"a": true}, "queue": "other", "priority": 3}',
        '{"func": "omniq.examples:add", "args": [5, 5], "delay": "1h"}',
        # Every option of the Python API is a field (result_ttl and retry_delay included).
        '{"func": "omniq.examples:add", "args": [2, 2], "result_ttl": "1h", "retry_delay": 5,'
        ' "retries": 1, "timeout": "10s", "ttl": "1h", "unique_key": "u", "unique_ttl": "1m"}',
    ]
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, out, err = run_omniq(["enqueue", "--from-file", str(path)], cli_env)
    assert code == 0, err
    ids = out.split()
    assert len(ids) == 4 and all(len(i) == TASK_ID_LEN for i in ids)
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
    kept = result_json(cli_env, ids[3])
    assert kept["value"] == 4 and isinstance(kept["expires_at"], str)
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
    # Errors found after parsing (imports, arguments) name the line too, once.
    text = '{"func": "omniq.examples:add"}\n{"func": "nosuchmodule_xyz:f"}\n'
    code, out, err = run_omniq(["enqueue", "--from-file", "-"], cli_env, input=text)
    assert code == 2 and err.count("stdin line 2: unknown module 'nosuchmodule_xyz'") == 1, err
    text = '{"func": "omniq.examples:echo", "kwargs": {"x": 1}}\n' * 2 + '{"func": "m:f", "x": 1}\n'
    code, out, err = run_omniq(["enqueue", "--from-file", "-"], cli_env, input=text)
    assert code == 2 and err.count("line 3") == 1 and "unknown field(s) 'x'" in err, err
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
    assert failed["exit_code"] == 3 and failed["status"] == "failed"  # the command's status
    assert isinstance(failed["value"], dict) and failed["value"]["stdout"] == "one\n"


def test_shell_results_are_the_command_s_streams_and_status(cli_env: dict[str, str]) -> None:
    worker = start_omniq(["worker", "--allow-shell"], cli_env)
    try:
        code, out, err = run_omniq(
            ["enqueue", "--sh", "echo partial; echo oops >&2; exit 7", "--wait"], cli_env
        )
        ok_code, ok_out, _ = run_omniq(
            ["enqueue", "--shell", "--wait", "--", "echo", "hi"], cli_env
        )
    finally:
        worker.terminate()
        worker.communicate(timeout=60)
    assert (code, out) == (7, "partial\n"), err
    task_id, *rest = err.splitlines()
    assert rest == ["oops"]  # the command's stderr; no traceback, no ShellFailed
    assert (ok_code, ok_out) == (0, "hi\n")
    assert run_omniq(["result", task_id], cli_env)[:2] == (7, "partial\n")
    code, out, _ = run_omniq(["result", task_id, "--json"], cli_env)
    record = json.loads(out)
    assert code == 7 and record["status"] == "failed" and record["value"]["exit_code"] == 7


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuchmodule_xyz:run"], "unknown module 'nosuchmodule_xyz'"),
        (["omniq.examples:nope"], "unknown function 'nope'"),
        (["omniq.examples.add"], "did you mean 'omniq.examples:add'"),
        (["omniq.examples", "1"], "give 'omniq.examples:<function>'; its functions: add,"),
        (["omniq.examples:add", "1", '{"a":'], "ARG 2 '{\"a\":' looks like JSON but is not"),
        (["omniq.examples:add", "[1,"], "looks like JSON but is not valid JSON"),
        (["omniq.examples:echo", "-k", "x=[1,"], "-k x '[1,' looks like JSON"),
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
