"""SIGTERM mid-load on a server subprocess (fake engine, `serve_engine`): in-flight requests
finish, new ones get 503, the process exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
FAKE_SERVER_CODE = """
import sys
sys.path.insert(0, {tests!r})
from fake_engine import FakeEngine
from fuselm.server.launcher import serve_engine
serve_engine(FakeEngine(step_delay=0.02), port=0, shutdown_timeout={timeout},
             log_level="warning")
"""


def start_server(argv: list[str], timeout: float = 90.0) -> tuple[subprocess.Popen, str]:
    """Starts `python *argv` and waits for its "listening on" line; (process, base URL).
    The rest of its output is drained by a thread so that the pipe never fills."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                      env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    found: list[str] = []
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            if match and not found:
                found.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout) or not found:
        proc.kill()
        raise RuntimeError("server did not start:\n" + "".join(lines[-30:]))
    return proc, found[0]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


@pytest.fixture
def fake_process(request: Any) -> Iterator[tuple[subprocess.Popen, str]]:
    timeout = getattr(request, "param", 20)
    code = FAKE_SERVER_CODE.format(tests=str(Path(__file__).parent), timeout=timeout)
    proc, url = start_server(["-c", code])
    yield proc, url
    stop(proc)


BODY = {"prompt": "drain me", "max_tokens": 60, "temperature": 0, "ignore_eos": True}


async def stream_text(client: httpx.AsyncClient, started: asyncio.Event,
                      max_tokens: int = 60) -> str:
    body = {**BODY, "max_tokens": max_tokens, "stream": True}
    text = ""
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                return text
            if line.startswith("data: "):
                text += json.loads(line[6:])["choices"][0]["text"]
                started.set()
    raise AssertionError("stream cut before [DONE]")


async def drain_scenario(proc: subprocess.Popen, url: str, max_tokens: int = 60
                         ) -> tuple[list[str], list[int], str]:
    """Six streams and one plain request in flight, SIGTERM, then two new requests."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        started = [asyncio.Event() for _ in range(6)]
        streams = [asyncio.create_task(stream_text(client, e, max_tokens)) for e in started]
        plain = asyncio.create_task(client.post("/v1/completions",
                                                json={**BODY, "max_tokens": max_tokens}))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        async with httpx.AsyncClient(base_url=url, timeout=10) as fresh:  # new connections
            refused = [(await fresh.post("/v1/completions", json={"prompt": "x"})).status_code,
                       (await fresh.get("/health")).status_code]
        texts = await asyncio.wait_for(asyncio.gather(*streams), 30)
        plain_text = (await asyncio.wait_for(plain, 30)).json()["choices"][0]["text"]
    return texts, refused, plain_text


def test_sigterm_drains_then_exits_zero(fake_process: tuple[subprocess.Popen, str]) -> None:
    proc, url = fake_process
    texts, refused, plain_text = asyncio.run(drain_scenario(proc, url))
    assert refused == [503, 503]
    assert all(len(t) == 60 for t in texts) and len(plain_text) == 60
    assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize("fake_process", [0.5], indirect=True)
def test_sigterm_drain_timeout_still_exits_zero(fake_process: tuple[subprocess.Popen, str]
                                               ) -> None:
    proc, url = fake_process

    async def run() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            started = asyncio.Event()
            body = {**BODY, "max_tokens": 200}  # 4 s of tokens, far past the 0.5 s drain
            long = asyncio.create_task(client.post("/v1/completions", json={**body}))
            stream = asyncio.create_task(stream_text(client, started, 10))
            await asyncio.wait_for(started.wait(), 20)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 15) == 0
            assert time.monotonic() - start < 4.0
            r = await long
            assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
            await stream  # finished within the drain

    asyncio.run(run())


def test_fuselm_serve_cli_sigterm_real_engine() -> None:
    """`python -m fuselm serve` on the default model: SIGTERM mid-load drains, exits 0."""
    pytest.importorskip("fuselm.engine.async_engine")
    try:
        proc, url = start_server(["-m", "fuselm", "serve", "--port", "0", "--shutdown-timeout",
                                  "30", "--log-level", "warning"], timeout=120)
    except RuntimeError as exc:
        if "not installed" in str(exc) or "invalid choice: 'serve'" in str(exc):
            pytest.skip(str(exc))
        raise
    try:
        texts, refused, plain_text = asyncio.run(drain_scenario(proc, url, max_tokens=12))
        assert refused == [503, 503] and plain_text
        assert all(t for t in texts)
        assert proc.wait(timeout=60) == 0
    finally:
        stop(proc)


@pytest.mark.parametrize("fake_process", [30], indirect=True)
def test_second_signal_ends_requests_with_503_not_a_cut(
        fake_process: tuple[subprocess.Popen, str]) -> None:
    """A second signal during the drain stops the engine at once: the plain request in flight
    gets a 503 JSON body, the stream an error event and [DONE]; the process still exits 0."""
    proc, url = fake_process

    async def run() -> tuple[httpx.Response, str]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            body = {**BODY, "max_tokens": 200}  # 4 s of tokens, past the second signal
            plain = asyncio.create_task(client.post("/v1/completions", json=body))
            started = asyncio.Event()

            async def stream() -> str:
                raw = ""
                async with client.stream("POST", "/v1/completions",
                                         json={**body, "stream": True}) as r:
                    async for chunk in r.aiter_text():
                        raw += chunk
                        started.set()
                return raw

            streamed = asyncio.create_task(stream())
            await asyncio.wait_for(started.wait(), 20)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            return await asyncio.wait_for(plain, 20), await asyncio.wait_for(streamed, 20)

    plain, raw = asyncio.run(run())
    assert plain.status_code == 503 and plain.json()["error"]["type"] == "service_unavailable"
    events = raw.strip().split("\n\n")
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["error"]["type"] == "service_unavailable"
    assert proc.wait(timeout=15) == 0
