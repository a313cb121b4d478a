"""Many processes on one store: 4 worker processes and 2 producers share the queue.

Every task completes exactly once: one result, one STARTED and one COMPLETED
event, and no process sees a lock error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

PRODUCER = r"""
import asyncio, json, sys
from omniq import AsyncOmniQ
from omniq.config import OmniQConfig

async def main(values, start, count, out):
    client = AsyncOmniQ(OmniQConfig.from_values(**values))
    await client.open()
    ids = [await client.enqueue("omniq.examples:add", i, 1) for i in range(start, start + count)]
    await client.close()
    open(out, "w").write(json.dumps(ids))

asyncio.run(main(json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
"""

WORKER = r"""
import asyncio, json, sys
from omniq import AsyncOmniQ
from omniq.config import OmniQConfig
from omniq.worker import Worker

async def main(values, flag):
    client = AsyncOmniQ(OmniQConfig.from_values(**values))
    await client.open()
    settings = client.worker_settings(concurrency=4, lease=60, allowed_modules=None,
                                      poll_interval=0.2)
    worker = Worker(client.queue, client.results, client.events, settings)
    runner = asyncio.create_task(worker.run())
    # Stop once the producers are done and nothing waits or runs anywhere.
    while True:
        await asyncio.sleep(0.5)
        if open(sys.argv[2]).read().strip() != "go":
            continue
        stats = await client.queue.stats()
        if sum(s.queued + s.running + s.scheduled for s in stats) == 0:
            break
    worker.request_stop()
    await runner
    await client.close()

asyncio.run(main(json.loads(sys.argv[1]), sys.argv[2]))
"""


def sqlite_values(home: Path) -> dict[str, Any]:
    return {"home": str(home)}


def run_fleet(values: dict[str, Any], tmp_path: Path, total: int = 2000) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIQ_")}
    flag = tmp_path / "producers-done"
    flag.write_text("")
    blob = json.dumps(values)
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, blob, str(flag)], env=env,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    half = total // 2
    outs = [tmp_path / f"ids{i}.json" for i in range(2)]
    producers = [
        subprocess.Popen([sys.executable, "-c", PRODUCER, blob, str(i * half), str(half),
                          str(outs[i])], env=env, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    for p in producers:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    flag.write_text("go")
    for w in workers:
        _, err = w.communicate(timeout=240)
        assert w.returncode == 0, err
        assert "locked" not in err.lower(), err
    return [i for out in outs for i in json.loads(out.read_text())]


def check_exactly_once(values: dict[str, Any], ids: list[str]) -> None:
    import asyncio

    from omniq import AsyncOmniQ
    from omniq.config import OmniQConfig

    async def inspect() -> tuple[list[Any], Counter[tuple[str, str]]]:
        client = AsyncOmniQ(OmniQConfig.from_values(**values))
        await client.open()
        results = [await client.results.get(i) for i in ids]
        counts: Counter[tuple[str, str]] = Counter()
        cursor = None
        while rows := await client.events.read(cursor, 1000):
            for _, event in rows:
                counts[(event.task_id, event.event_type.value)] += 1
            cursor = rows[-1][0]
        await client.close()
        return results, counts

    results, counts = asyncio.run(inspect())
    assert len(set(ids)) == len(ids)
    missing = [i for i, r in zip(ids, results, strict=True) if r is None]
    assert not missing, f"{len(missing)} tasks have no result"
    assert all(r.ok and r.attempts == 1 for r in results)
    for task_id in ids:
        assert counts[(task_id, "started")] == 1, task_id
        assert counts[(task_id, "completed")] == 1, task_id
    assert len({r.worker_id for r in results}) >= 2, "the work was not shared"


@pytest.mark.slow
def test_sqlite_four_workers_two_producers(tmp_path: Path) -> None:
    values = sqlite_values(tmp_path / "home")
    ids = run_fleet(values, tmp_path)
    check_exactly_once(values, ids)
