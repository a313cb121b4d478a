"""The CLI main flow with every store on the file technology (issue: file backend)."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import clean_env, run_burst, run_omniq


def file_env(tmp_path: Path) -> dict[str, str]:
    return clean_env(
        tmp_path / "home",
        OMNIQ_TASK_QUEUE_TYPE="file",
        OMNIQ_RESULT_STORAGE_TYPE="file",
        OMNIQ_EVENT_STORAGE_TYPE="file",
    )


def test_enqueue_work_result_events_on_files(tmp_path: Path) -> None:
    env = file_env(tmp_path)
    code, out, err = run_omniq(["enqueue", "omniq.examples:add", "2", "3"], env)
    assert code == 0, err
    task_id = out.strip()
    code, out, err = run_omniq(["enqueue", "omniq.examples:fail", "nope"], env)
    failing = out.strip()
    run_burst(env)
    assert run_omniq(["result", task_id], env)[:2] == (0, "5\n")
    code, _, err = run_omniq(["result", failing], env)
    assert code == 1 and "nope" in err
    code, out, err = run_omniq(["events", task_id, "--json"], env)
    assert code == 0, err
    kinds = [json.loads(line)["event_type"] for line in out.splitlines()]
    assert kinds == ["enqueued", "started", "completed"]
    home = tmp_path / "home"
    assert (home / "queue").is_dir() and (home / "results").is_dir() and (home / "events").is_dir()


def test_file_queue_on_object_store_is_refused(tmp_path: Path) -> None:
    env = file_env(tmp_path)
    env["OMNIQ_TASK_QUEUE_BASE_DIR"] = "memory://somewhere"
    code, out, err = run_omniq(["enqueue", "omniq.examples:add", "2", "3"], env)
    assert code == 78, (code, out, err)
    assert "atomic rename" in err and "sqlite" in err
    assert "Traceback" not in err
