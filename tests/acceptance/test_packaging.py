"""The wheel installs into a fresh venv and the public API imports from outside the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
import venv
import zipfile
from pathlib import Path

import pytest

from tests.servers import drop_namespace, shared_unavailable

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

# The Redis backend's Lua scripts are package data: one task on Redis proves they
# were installed (run when the shared Redis is there, as in CI).
REDIS_CHECK = r"""
import sys
from omniq import OmniQ, OmniQConfig
prefix = sys.argv[1]
stores = {f"{s}_{k}": v for s in ("task_queue", "result_storage", "event_storage")
          for k, v in (("type", "redis"), ("url", "redis://127.0.0.1:6379/0"),
                       ("prefix", prefix))}
with OmniQ(OmniQConfig(**stores)) as q:
    print(q.get_result(q.enqueue("omniq.examples:add", 40, 2), timeout=20))
"""


@pytest.mark.slow
def test_wheel_installs_into_fresh_venv(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True, timeout=300,
    )
    (wheel,) = wheels.glob("omniq-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert "omniq/backends/redis/scripts/claim.lua" in archive.namelist()
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMNIQ_", "PYTHON"))}
    env["OMNIQ_HOME"] = str(tmp_path / "home")
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         f"{wheel}[redis]"],
        check=True, timeout=600, env=env,
    )
    out = subprocess.run(
        [str(py), "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "42"
    if shared_unavailable("redis") is None:
        prefix = "pk" + uuid.uuid4().hex[:10]
        try:
            on_redis = subprocess.run(
                [str(py), "-c", REDIS_CHECK, prefix], cwd=tmp_path, env=env,
                capture_output=True, text=True, timeout=120,
            )
        finally:
            drop_namespace("redis", prefix)
        assert on_redis.returncode == 0, on_redis.stderr
        assert on_redis.stdout.strip() == "42"
    helped = subprocess.run(
        [str(env_dir / "bin" / "omniq"), "--help"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=60,
    )
    assert helped.returncode == 0, helped.stderr
    assert "enqueue" in helped.stdout
