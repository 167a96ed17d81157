"""Fixtures of the server tests: live servers around the fake engine."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_engine import FakeEngine  # noqa: E402
from server_harness import LiveServer  # noqa: E402

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
