"""The wheel installs into a fresh venv and the public API imports from outside the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHECK = r"""
import importlib.util, sys
import omniq
from omniq import OmniQ, AsyncOmniQ, OmniQConfig
from omniq.results import MemoryResultStorage, SQLiteResultStorage, FileResultStorage
from omniq.events import MemoryEventStorage, SQLiteEventStorage, TaskEvent
from omniq.config import OmniQConfig
import omniq.backends.memory, omniq.cli
assert "site-packages" in omniq.__file__, omniq.__file__
assert importlib.util.find_spec("backends") is None, "a bare 'backends' package was installed"
assert importlib.util.find_spec("omniq_core") is None
for driver in ("redis", "psycopg", "nats", "fsspec", "prometheus_client", "aiohttp"):
    assert driver not in sys.modules, driver + " imported by the public API"
with OmniQ(OmniQConfig(task_queue_type="memory", result_storage_type="memory",
                       event_storage_type="memory")) as q:
    print(q.get_result(q.enqueue("omniq.examples:add", 20, 22), timeout=10))
"""


@pytest.mark.slow
def test_wheel_installs_into_fresh_venv(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True, timeout=300,
    )
    (wheel,) = wheels.glob("omniq-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMNIQ_", "PYTHON"))}
    env["OMNIQ_HOME"] = str(tmp_path / "home")
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        check=True, timeout=600, env=env,
    )
    out = subprocess.run(
        [str(py), "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "42"
    helped = subprocess.run(
        [str(env_dir / "bin" / "omniq"), "--help"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=60,
    )
    assert helped.returncode == 0, helped.stderr
    assert "enqueue" in helped.stdout
