"""Every Python snippet of the public storage document runs as written and prints what it says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "storage.md"
SHARED_SEED = Path(__file__).resolve().parents[3] / "shared" / "seeds" / "storage.md"


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def run_snippet(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIQ_")}
    env["OMNIQ_HOME"] = str(tmp_path / "home")
    script = tmp_path / "snippet.py"
    script.write_text(textwrap_dedent(code))
    return subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=60,
    )


def textwrap_dedent(code: str) -> str:
    import textwrap

    return textwrap.dedent(code)


def test_doc_is_the_seed() -> None:
    if not SHARED_SEED.exists():
        pytest.skip("shared seed not beside this checkout")
    assert DOC.read_text() == SHARED_SEED.read_text()


def test_there_are_nine_snippets() -> None:
    assert len(snippets()) == 9


@pytest.mark.parametrize("index", range(6))
def test_storage_constructors_run(index: int, tmp_path: Path) -> None:
    proc = run_snippet(snippets()[index], tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_configuring_storage_prints_hello(tmp_path: Path) -> None:
    proc = run_snippet(snippets()[6], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Task result: hello\n"
    assert (tmp_path / "my_app_results.db").exists()
    assert (tmp_path / "app_events").is_dir()


def test_retrieving_results_prints_sum(tmp_path: Path) -> None:
    proc = run_snippet(snippets()[7], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Calculation result: 30\n"


def test_event_logging_prints_events(tmp_path: Path) -> None:
    proc = run_snippet(snippets()[8], tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines, "no events printed"
    first = lines[0]
    assert re.match(r"^Event: enqueued for task [0-9a-f-]{36} at \d{4}-\d\d-\d\d ", first), first
    kinds = [line.split()[1] for line in lines]
    assert kinds == ["enqueued", "started", "completed"][: len(kinds)]


def test_issue_example_with_events(tmp_path: Path) -> None:
    code = '''
from omniq import OmniQ

def calculate_sum(a, b):
    return a + b

with OmniQ() as omniq:
    task_id = omniq.enqueue(calculate_sum, 10, 20)
    print(omniq.get_result(task_id, timeout=10))
    for e in omniq.get_events(task_id):
        print(e.event_type, e.task_id == task_id, e.timestamp.tzinfo is not None)
'''
    proc = run_snippet(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "30", "enqueued True True", "started True True", "completed True True"
    ]
    home = tmp_path / "home"
    assert {p.name for p in home.iterdir()} >= {"queue.db", "results.db", "events.db"}


def test_script_that_never_closes_exits_promptly(tmp_path: Path) -> None:
    code = '''
from omniq import OmniQ
q = OmniQ()
q.options(delay=3600).enqueue("omniq.examples:add", 1, 2)   # waits for a worker, none here
print(q.get_result(q.enqueue(lambda: "local"), timeout=10))
'''
    proc = run_snippet(code, tmp_path)  # the helper's own timeout (60 s) bounds the exit
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "local\n"
    assert "Traceback" not in proc.stderr
