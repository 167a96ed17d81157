"""Server test harness: a real uvicorn server on 127.0.0.1 (a free port picked at bind time) in a
background thread with its own event loop, plus helpers the server tests share (SSE parsing,
error-shape checks, metric scraping, the disconnect load)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

REAL_NAME = "smollm2"  # the served name of the default model in the real-engine tests
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi there"}]


class LiveServer:
    """uvicorn serving `app` in a thread; `url` is its base URL."""

    def __init__(self, app: Any, http: Any = "auto") -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=2, access_log=False, http=http)
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
        """Runs `fn()` on the server's loop, awaiting it if it returns an awaitable."""
        assert self.loop is not None

        async def call() -> Any:
            result = fn()
            return await result if inspect.isawaitable(result) else result

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


def parse_sse(raw: str) -> list[Any]:
    """Events of an exactly framed SSE body: `data: <json>\\n\\n` ... `data: [DONE]\\n\\n`."""
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    events = raw.split("\n\n")
    assert events[-1] == ""
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: ") and "\n" not in event, repr(event)
        body = event[len("data: "):]
        payloads.append(body if body == "[DONE]" else json.loads(body))
    assert payloads.count("[DONE]") == 1 and payloads[-1] == "[DONE]"
    return payloads[:-1]


def assert_error(r: httpx.Response, status: int, param: str | None = None,
                 code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def scrape(server: LiveServer) -> dict[str, float]:
    """{sample name: value} summed over labels, plus the set of family names under key ''."""
    with server.client() as client:
        text = client.get("/metrics").text
    samples: dict[str, Any] = {"": set()}
    for family in text_string_to_metric_families(text):
        samples[""].add(family.name)
        for sample in family.samples:
            samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
    return samples


async def stream_completion(client: httpx.AsyncClient, body: dict[str, Any],
                            disconnect_after: int | None = None) -> str | None:
    """The streamed text, or None after closing the connection at chunk `disconnect_after`."""
    async with client.stream("POST", CMPL, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        text, num_chunks = "", 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return text
            text += json.loads(line[len("data: "):])["choices"][0]["text"]
            num_chunks += 1
            if disconnect_after is not None and num_chunks >= disconnect_after:
                return None  # leaving the block closes the connection mid-stream
    raise AssertionError("stream ended without [DONE]")


async def disconnect_load(server: LiveServer, prompts: list[str], body: dict[str, Any],
                          check_after_disconnects: Any) -> list[tuple[str, str | None]]:
    """Streams every prompt at once (with `body`); every 4th client disconnects after 3 chunks.
    Once they all did, `check_after_disconnects()` runs (in a thread) while the others still
    stream. Returns (prompt, streamed text or None if disconnected)."""
    limits = httpx.Limits(max_connections=len(prompts) + 10)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
        tasks = [asyncio.create_task(stream_completion(
            client, {**body, "prompt": p}, 3 if i % 4 == 0 else None))
            for i, p in enumerate(prompts)]
        quitters = [t for i, t in enumerate(tasks) if i % 4 == 0]
        await asyncio.wait_for(asyncio.gather(*quitters), 60)
        await asyncio.to_thread(check_after_disconnects)
        texts = await asyncio.wait_for(asyncio.gather(*tasks), 90)
    return list(zip(prompts, texts, strict=True))
