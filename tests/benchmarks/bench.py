"""OmniQ benchmark (not a test): enqueue rate, one-process drain rate, round-trip latency.

    python tests/benchmarks/bench.py                   # every backend that is reachable
    python tests/benchmarks/bench.py sqlite redis      # some of them
    python tests/benchmarks/bench.py --json            # machine-readable

Workloads, per backend, with every event written:
- enqueue: N `omniq.examples:add` tasks enqueued one by one from one process (tasks/s);
- drain: one worker process drains N queued tasks (tasks/s);
- round trip: 300 sequential enqueue -> get_result, the worker in another process
  (in-process for memory, which cannot cross processes): p50 / p99 in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

SERVERS = {"redis": 6379, "postgres": 5432, "nats": 4222}
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def store_values(kind: str, prefix: str, home: Path, ns: str) -> dict[str, Any]:
    values: dict[str, Any] = {f"{prefix}_type": kind}
    if kind == "redis":
        values[f"{prefix}_url"] = "redis://127.0.0.1:6379/0"
        values[f"{prefix}_prefix"] = ns
    elif kind == "postgres":
        values[f"{prefix}_dsn"] = PG_DSN
        values[f"{prefix}_schema"] = ns
    elif kind == "nats":
        values[f"{prefix}_servers"] = ["nats://127.0.0.1:4222"]
        values[f"{prefix}_prefix"] = ns
    elif kind == "file":
        values[f"{prefix}_base_dir"] = str(home / prefix)
    elif kind == "sqlite":
        values[f"{prefix}_path"] = str(home / f"{prefix}.db")
    return values


SETUPS: dict[str, tuple[str, str, str]] = {
    "memory": ("memory", "memory", "memory"),
    "sqlite": ("sqlite", "sqlite", "sqlite"),
    "file": ("file", "file", "file"),
    "redis": ("redis", "redis", "redis"),
    "postgres": ("postgres", "postgres", "postgres"),
    "nats": ("nats", "nats", "nats"),
    "mixed": ("redis", "postgres", "nats"),
}


def config_values(setup: str, home: Path, ns: str) -> dict[str, Any]:
    values: dict[str, Any] = {"home": str(home), "result_ttl": 3600, "event_ttl": 3600}
    for kind, prefix in zip(SETUPS[setup], ("task_queue", "result_storage", "event_storage"),
                            strict=True):
        values.update(store_values(kind, prefix, home, ns))
    return values


def reachable(setup: str) -> bool:
    for kind in set(SETUPS[setup]):
        port = SERVERS.get(kind)
        if port is None:
            continue
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
    return True


async def bench_enqueue(values: dict[str, Any], n: int) -> float:
    from omniq import AsyncOmniQ
    from omniq.config import OmniQConfig

    client = AsyncOmniQ(OmniQConfig.from_values(**values))
    await client.open()
    start = time.perf_counter()
    for i in range(n):
        await client.enqueue("omniq.examples:add", i, i)
    elapsed = time.perf_counter() - start
    await client.close()
    return n / elapsed


async def bench_drain(values: dict[str, Any], n: int, concurrency: int) -> float:
    from omniq import AsyncOmniQ
    from omniq.config import OmniQConfig
    from omniq.worker import Worker

    client = AsyncOmniQ(OmniQConfig.from_values(**values))
    await client.open()
    if values["task_queue_type"] == "memory":  # bench_enqueue's queue died with its client
        for i in range(n):
            await client.enqueue("omniq.examples:add", i, i)
    settings = client.worker_settings(burst=True, concurrency=concurrency, register=False,
                                      allowed_modules=None, poll_interval=0.2)
    worker = Worker(client.queue, client.results, client.events, settings)
    start = time.perf_counter()
    done = await worker.run()
    elapsed = time.perf_counter() - start
    await client.close()
    if done < n:
        raise RuntimeError(f"drained only {done} of {n} tasks")
    return done / elapsed


async def bench_roundtrip(values: dict[str, Any], count: int, in_process: bool) -> list[float]:
    from omniq import AsyncOmniQ
    from omniq.config import OmniQConfig

    client = AsyncOmniQ(OmniQConfig.from_values(**values))
    await client.open()
    if in_process:
        await client.start_worker(concurrency=4)
    samples = []
    for i in range(count + 20):
        t0 = time.perf_counter()
        task_id = await client.enqueue("omniq.examples:add", i, 1)
        value = await client.get_result(task_id, timeout=30)
        if i >= 20:  # warm-up excluded
            samples.append((time.perf_counter() - t0) * 1000)
        assert value == i + 1
    await client.close()
    return samples


def start_worker_process(values: dict[str, Any]) -> subprocess.Popen[bytes]:
    code = (
        "import asyncio, json, sys\n"
        "from omniq import AsyncOmniQ\n"
        "from omniq.config import OmniQConfig\n"
        "from omniq.worker import Worker\n"
        "async def main():\n"
        "    c = AsyncOmniQ(OmniQConfig.from_values(**json.loads(sys.argv[1])))\n"
        "    await c.open()\n"
        "    s = c.worker_settings(concurrency=4, register=False, allowed_modules=None)\n"
        "    await Worker(c.queue, c.results, c.events, s).run()\n"
        "asyncio.run(main())\n"
    )
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(values)])


def run_setup(setup: str, n: int, rt: int, concurrency: int) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix=f"omniq-bench-{setup}-"))
    ns = "bench" + uuid.uuid4().hex[:8]
    try:
        values = config_values(setup, home, ns)
        row: dict[str, Any] = {"backend": setup, "tasks": n}
        # memory: a throwaway queue; the drain below fills its own (no sharing).
        row["enqueue_per_s"] = asyncio.run(bench_enqueue(values, n))
        row["drain_per_s"] = asyncio.run(bench_drain(values, n, concurrency))
        in_process = setup == "memory"
        proc = None if in_process else start_worker_process(values)
        try:
            samples = asyncio.run(bench_roundtrip(values, rt, in_process))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
        samples.sort()
        row["rt_p50_ms"] = statistics.median(samples)
        row["rt_p99_ms"] = samples[int(len(samples) * 0.99) - 1]
        return row
    finally:
        shutil.rmtree(home, ignore_errors=True)
        asyncio.run(drop_namespace(set(SETUPS[setup]), ns))


async def drop_namespace(kinds: set[str], ns: str) -> None:
    """Leave nothing behind on the shared servers."""
    if "redis" in kinds:
        import redis.asyncio as aioredis

        r = aioredis.from_url("redis://127.0.0.1:6379/0")
        async for key in r.scan_iter(match=f"{ns}*", count=1000):
            await r.delete(key)
        await r.aclose()
    if "postgres" in kinds:
        import psycopg

        async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{ns}" CASCADE')
    if "nats" in kinds:
        import nats

        nc = await nats.connect("nats://127.0.0.1:4222")
        js = nc.jetstream()
        for info in await js.streams_info():
            if ns in info.config.name:
                await js.delete_stream(info.config.name)
        await nc.close()


HEAD = f"{'backend':<10} {'enqueue/s':>10} {'drain/s':>10} {'rt p50 ms':>10} {'rt p99 ms':>10}"


def print_row(r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"{r['backend']:<10} error: {r['error']}", flush=True)
        return
    print(f"{r['backend']:<10} {r['enqueue_per_s']:>10.0f} {r['drain_per_s']:>10.0f} "
          f"{r['rt_p50_ms']:>10.2f} {r['rt_p99_ms']:>10.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("backends", nargs="*", help=f"any of {', '.join(SETUPS)} (default: all)")
    parser.add_argument("-n", type=int, default=5000, help="tasks to enqueue and drain")
    parser.add_argument("--roundtrips", type=int, default=300)
    parser.add_argument("-c", "--concurrency", type=int, default=8, help="worker concurrency")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    os.environ.pop("OMNIQ_CONFIG", None)
    rows = []
    if not args.json:
        print(HEAD)
        print("-" * len(HEAD))
    for setup in args.backends or list(SETUPS):
        if not reachable(setup):
            rows.append({"backend": setup, "error": "server not reachable"})
            continue
        try:
            rows.append(run_setup(setup, args.n, args.roundtrips, args.concurrency))
        except Exception as exc:  # a broken backend must not hide the others' numbers
            rows.append({"backend": setup, "error": f"{type(exc).__name__}: {exc}"})
        if not args.json:
            print_row(rows[-1])
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
