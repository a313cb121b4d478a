"""Example tasks that every worker may run, so a newcomer can try OmniQ in one line:

    omniq enqueue omniq.examples:add 2 3 && omniq worker --burst
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any


def add(a: Any, b: Any) -> Any:
    return a + b


def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"args": list(args), "kwargs": kwargs}


def sleep(seconds: float, value: Any = None) -> Any:
    time.sleep(float(seconds))
    return value


async def async_sleep(seconds: float, value: Any = None) -> Any:
    await asyncio.sleep(float(seconds))
    return value


def fail(message: str = "this task fails on purpose") -> None:
    raise RuntimeError(message)


def flaky(marker_path: str, failures: int = 1) -> int:
    """Fails `failures` times (counted in a marker file), then returns the attempt number."""
    count = 0
    if os.path.exists(marker_path):
        with open(marker_path) as f:
            count = int(f.read() or 0)
    count += 1
    with open(marker_path, "w") as f:
        f.write(str(count))
    if count <= failures:
        raise RuntimeError(f"flaky failure {count} of {failures}")
    return count


def crash(code: int = 13) -> None:
    """Ends the process at once (tests process isolation of `--pool process`)."""
    os._exit(code)
