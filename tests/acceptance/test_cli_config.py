"""`omniq config show|check`, the global options and what `omniq --help` imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.acceptance.conftest import clean_env, run_omniq

UNREACHABLE_REDIS = {
    "OMNIQ_RESULT_STORAGE_TYPE": "redis",
    "OMNIQ_RESULT_STORAGE_URL": "redis://127.0.0.1:1",
}


def test_show_masks_secrets_and_names_sources(cli_env: dict[str, str]) -> None:
    env = {
        **cli_env,
        "OMNIQ_RESULT_STORAGE_TYPE": "postgres",
        "OMNIQ_RESULT_STORAGE_DSN": "postgresql://omniq:s3cr3t-pw@db.example:5432/omniq",
        "OMNIQ_EVENT_STORAGE_TYPE": "redis",  # (SQLite takes no password: refused)
        "OMNIQ_EVENT_STORAGE_PASSWORD": "another-s3cr3t",
    }
    code, out, err = run_omniq(["config", "show"], env)
    assert code == 0, err
    assert "s3cr3t" not in out + err
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in out.splitlines()}
    assert rows["result_storage_dsn"] == [
        "postgresql://omniq:***@db.example:5432/omniq",
        "env OMNIQ_RESULT_STORAGE_DSN",
    ]
    assert rows["event_storage_password"] == ["***", "env OMNIQ_EVENT_STORAGE_PASSWORD"]
    assert rows["worker_concurrency"] == ["4", "default"]
    assert rows["home"][0] == env["OMNIQ_HOME"]
    code, out, _ = run_omniq(["config", "show", "--json", "--all"], env)
    shown = json.loads(out)
    assert "s3cr3t" not in out and shown["config_file"] is None
    assert shown["values"]["result_storage_type"] == {
        "value": "postgres",
        "source": "env OMNIQ_RESULT_STORAGE_TYPE",
    }
    assert shown["values"]["task_queue_url"]["value"] is None  # --all lists unset options


def test_config_file_from_the_option_in_either_position(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "custom.yaml"
    path.write_text("worker:\n  concurrency: 9\ndefault_queue: jobs\n")
    for args in (
        ["--config", str(path), "config", "show"],
        ["config", "show", "--config", str(path)],
    ):
        code, out, err = run_omniq(args, cli_env)
        assert code == 0, err
        rows = {line.split("\t")[0]: line.split("\t")[1:] for line in out.splitlines()}
        assert rows["worker_concurrency"] == ["9", f"file {path.resolve()}:2"]
    code, out, err = run_omniq(
        ["--config", str(path), "enqueue", "omniq.examples:add", "1"], cli_env
    )
    assert code == 0, err
    code, out, _ = run_omniq(["--config", str(path), "events", out.strip(), "--json"], cli_env)
    assert json.loads(out)["queue"] == "jobs"


def test_bad_configuration_exits_78(cli_env: dict[str, str], tmp_path: Path) -> None:
    bad_env = {**cli_env, "OMNIQ_WORKER_CONCURRENCY": "abc"}
    for args in (["config", "show"], ["config", "check"], ["status"], ["tail"]):
        code, _out, err = run_omniq(args, bad_env)
        assert code == 78, (args, err)
        assert "OMNIQ_WORKER_CONCURRENCY" in err and "Traceback" not in err
    code, _, err = run_omniq(["--config", str(tmp_path / "missing.yaml"), "status"], cli_env)
    assert code == 78 and "does not exist" in err
    (tmp_path / "omniq.yaml").write_text("worker:\n  concurency: 2\n")  # found in the cwd
    code, _, err = run_omniq(["config", "check"], cli_env)
    assert code == 78 and "line 2" in err and "did you mean" in err


def test_check_reaches_every_store(cli_env: dict[str, str]) -> None:
    code, out, err = run_omniq(["config", "check"], cli_env)
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["task_queue", "result_storage", "event_storage"]
    assert all(line.endswith("ok") and " sqlite " in line for line in lines)


def test_check_and_commands_exit_69_when_a_store_is_unreachable(cli_env: dict[str, str]) -> None:
    env = {**cli_env, **UNREACHABLE_REDIS}
    code, out, err = run_omniq(["config", "check", "--json"], env)
    assert code == 69, err
    rows = {row["store"]: row for row in map(json.loads, out.splitlines())}
    assert rows["task_queue"]["ok"] and rows["event_storage"]["ok"]
    assert not rows["result_storage"]["ok"] and rows["result_storage"]["error"]
    assert rows["result_storage"]["where"] == "redis://127.0.0.1:1"
    code, out, err = run_omniq(["result", "01900000-0000-7000-8000-000000000000"], env)
    assert code == 69 and out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2


def test_version_and_no_command(cli_env: dict[str, str]) -> None:
    code, out, _ = run_omniq(["--version"], cli_env)
    assert code == 0 and out.startswith("omniq ")
    code, out, _ = run_omniq([], cli_env)
    assert code == 2 and "Usage:" in out and "enqueue" in out
    code, out, err = run_omniq(["nosuchcommand"], cli_env)
    assert code == 2 and out == "" and "No such command" in err


def test_help_imports_no_backend_driver_nor_rich(cli_env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "omniq.cli", "--help"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(cli_env["OMNIQ_HOME"]).parent,
    )
    assert proc.returncode == 0, proc.stderr
    modules = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    heavy = {"redis", "psycopg", "nats", "fsspec", "rich", "omniq.backends", "omniq.client",
             "prometheus_client", "aiohttp"}
    assert not heavy & modules, heavy & modules
    assert "asyncio" not in modules and "sqlite3" not in modules


def test_check_reports_a_bad_store_setting_as_configuration_error(tmp_path: Path) -> None:
    env = clean_env(
        tmp_path / "home",
        OMNIQ_RESULT_STORAGE_TYPE="redis",
        OMNIQ_RESULT_STORAGE_PREFIX="bad prefix!",
    )
    code, out, err = run_omniq(["config", "check"], env)
    assert code == 78, (code, out, err)
    assert "prefix" in err and "Traceback" not in err


def test_a_store_without_its_dsn_is_a_configuration_error_for_show_too(
    cli_env: dict[str, str],
) -> None:
    env = {**cli_env, "OMNIQ_TASK_QUEUE_TYPE": "postgres"}
    for args in (["config", "show"], ["config", "show", "--json"], ["status"]):
        code, out, err = run_omniq(args, env)
        assert code == 78, (args, out, err)
        assert "needs a DSN" in err and "Traceback" not in err


def test_task_modules_that_cannot_be_imported_are_reported(tmp_path: Path) -> None:
    (tmp_path / "goodmod.py").write_text("def f():\n    return 1\n")
    env = clean_env(tmp_path / "home", OMNIQ_TASK_MODULES="goodmod,myapp.tasks,nopkg.*")
    code, out, err = run_omniq(["config", "check"], env, cwd=tmp_path)
    assert code == 78, (out, err)
    lines = [line.split() for line in out.splitlines() if line.startswith("task_modules")]
    assert [(words[2], words[3]) for words in lines] == [
        ("goodmod", "ok"),
        ("myapp.tasks", "FAILED:"),
        ("nopkg.*", "FAILED:"),
    ]
    assert "No module named 'myapp'" in out
    code, out, _ = run_omniq(["config", "check", "--json"], env, cwd=tmp_path)
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["ok"] for r in rows if r["store"] == "task_modules"] == [True, False, False]
    # The worker warns at start (and runs), or exits 78 with --strict.
    env = clean_env(tmp_path / "home")
    code, _, err = run_omniq(["worker", "--burst", "--task-modules", "myapp.tasks"], env)
    assert code == 0 and "task_modules: 'myapp.tasks' cannot be imported" in err
    code, _, err = run_omniq(
        ["worker", "--burst", "--task-modules", "myapp.tasks", "--strict"], env
    )
    assert code == 78 and "'myapp.tasks' cannot be imported" in err
    code, _, err = run_omniq(["worker", "--burst", "--task-modules", "goodmod"], env, cwd=tmp_path)
    assert code == 0 and "cannot be imported" not in err
