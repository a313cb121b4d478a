"""Conformance-suite plumbing: every `tech_*.py` beside this file plugs in one technology.

A tech module defines:
    NAME: str                      # id shown in test names, e.g. "sqlite"
    ROLES: tuple[str, ...]         # which of "queue", "results", "events" it provides
    def unavailable() -> str | None        # None when usable, else why (server down)
    async def make(role, tmp_path, namespace) -> store   # a new, unopened store
    async def make_backend(tmp_path, namespace) -> Backend   # optional: the three roles
                                           # on one Backend (backend.queue() etc.), with
                                           # its fused operations (omniq.storage.FusedOps)
Stores made with the same (tmp_path, namespace) must see the same data, like two
processes would; different namespaces must be isolated from each other.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


def _load_techs() -> dict[str, ModuleType]:
    techs: dict[str, ModuleType] = {}
    for path in sorted(Path(__file__).parent.glob("tech_*.py")):
        spec = importlib.util.spec_from_file_location(f"omniq_conformance_{path.stem}", path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        techs[module.NAME] = module
    return techs


TECHS = _load_techs()


class Harness:
    """Makes stores of one role on one technology and runs async test bodies."""

    def __init__(self, tech: ModuleType, role: str, tmp_path: Path) -> None:
        self.tech = tech
        self.role = role
        self.tmp_path = tmp_path
        self.namespace = "t" + uuid.uuid4().hex[:10]
        self._opened: list[Any] = []

    @property
    def name(self) -> str:
        return str(self.tech.NAME)

    async def another(self) -> Any:
        """A second handle on the same store, as another process would have (for the
        "backend" role: a Backend whose three stores are open)."""
        if self.role == "backend":
            backend = await self.tech.make_backend(self.tmp_path, self.namespace)
            for store in (backend.queue(), backend.results(), backend.events()):
                await store.open()
                self._opened.append(store)
            return backend
        store = await self.tech.make(self.role, self.tmp_path, self.namespace)
        await store.open()
        self._opened.append(store)
        return store

    def run(self, body: Callable[[Any], Awaitable[None]], timeout: float = 60) -> None:
        async def main() -> None:
            store = await self.another()
            try:
                await asyncio.wait_for(body(store), timeout)
            finally:
                for s in reversed(self._opened):
                    await s.close()
                self._opened.clear()

        asyncio.run(main())


def _harness(request: pytest.FixtureRequest, tmp_path: Path, role: str) -> Harness:
    tech = TECHS[request.param]
    reason = tech.unavailable()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{tech.NAME} is required in CI but unavailable: {reason}")
        pytest.skip(f"{tech.NAME} unavailable: {reason}")
    return Harness(tech, role, tmp_path)


def _ids(role: str) -> list[str]:
    return [name for name, t in TECHS.items() if role in t.ROLES]


@pytest.fixture(params=_ids("queue"))
def queue_h(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    return _harness(request, tmp_path, "queue")


@pytest.fixture(params=_ids("results"))
def results_h(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    return _harness(request, tmp_path, "results")


@pytest.fixture(params=_ids("events"))
def events_h(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    return _harness(request, tmp_path, "events")


@pytest.fixture(params=[name for name, t in TECHS.items() if hasattr(t, "make_backend")])
def backend_h(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    """A harness whose `run(body)` gets a Backend holding all three roles."""
    return _harness(request, tmp_path, "backend")
