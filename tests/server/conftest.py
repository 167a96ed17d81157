"""Fixtures of the server tests: live servers around the fake engine."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_engine import FakeEngine  # noqa: E402
from server_harness import REAL_NAME, LiveServer  # noqa: E402

from fuselm.errors import ModelNotFoundError  # noqa: E402
from fuselm.server.api import build_app  # noqa: E402


@pytest.fixture
def make_server() -> Iterator[Callable[..., LiveServer]]:
    """Factory: `make_server(engine=None, **build_app_kwargs)` -> a started LiveServer."""
    servers: list[LiveServer] = []

    def make(engine: Any = None, **kwargs: Any) -> LiveServer:
        server = LiveServer(build_app(engine or FakeEngine(), **kwargs)).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def fake_server() -> Iterator[LiveServer]:
    """One fake-engine server per test module."""
    with LiveServer(build_app(FakeEngine())) as server:
        yield server


@pytest.fixture(scope="session")
def real_server() -> Iterator[LiveServer]:
    """The default model behind a live server, served as "smollm2"; one per test session."""
    try:
        from fuselm.config import EngineConfig
        from fuselm.engine.async_engine import AsyncEngine
        from fuselm.runtime import build_engine
    except ImportError as exc:
        pytest.skip(f"the engine is not available: {exc}")
    try:
        # async scheduling on, as the engine runs on GPUs by default (off by default on CPUs)
        engine = AsyncEngine(build_engine(EngineConfig(async_scheduling=True)))
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    with LiveServer(build_app(engine, served_model_name=REAL_NAME)) as server:
        yield server
