"""Server test harness: a real uvicorn server on 127.0.0.1 (a free port picked at bind time) in a
background thread with its own event loop, around a fake or real engine."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

sys.path.insert(0, str(Path(__file__).parent))

from fake_engine import FakeEngine  # noqa: E402

from fuselm.server.api import build_app  # noqa: E402


class LiveServer:
    """uvicorn serving `app` in a thread; `url` is its base URL."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=2, access_log=False)
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def state(self) -> Any:
        return self.app.state.server

    @property
    def engine(self) -> Any:
        return self.state.engine

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[self.sock])

        asyncio.run(main())

    def start(self, timeout: float = 120.0) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    def on_loop(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Runs `fn()` on the server's loop (thread-safe reads of engine state)."""
        assert self.loop is not None

        async def call() -> Any:
            return fn()

        future: concurrent.futures.Future = asyncio.run_coroutine_threadsafe(call(), self.loop)
        return future.result(timeout)

    def stats(self) -> dict[str, float]:
        return self.on_loop(self.engine.stats)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 30.0, **kwargs})

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Polls `predicate` until true or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


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
