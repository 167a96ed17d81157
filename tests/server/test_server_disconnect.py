"""Client disconnects abort their requests and free their KV blocks at once (fake engine)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from fake_engine import FakeEngine
from server_harness import CMPL, LiveServer, disconnect_load, wait_until

pytestmark = pytest.mark.timeout(120)

def test_200_streams_quarter_disconnect_fake_engine(make_server: Any) -> None:
    engine = FakeEngine(step_delay=0.03, max_model_len=512)
    server: LiveServer = make_server(engine)
    prompts = [f"request number {i}" for i in range(200)]
    num_survivors = 150

    def check() -> None:
        start = time.monotonic()

        def settled() -> bool:
            def probe() -> bool:
                stats = engine.stats()
                held = sum(r.num_blocks for r in engine.running)
                used = stats["num_total_blocks"] - stats["num_free_blocks"]
                return (stats["num_requests_running"] == num_survivors and used == held
                        and len(engine.aborted) >= 50
                        and not any(a in engine.requests for a in engine.aborted))
            return server.on_loop(probe)

        assert wait_until(settled, 2.0), server.stats()
        assert time.monotonic() - start < 2.0
        # the survivors still stream: nothing of theirs finished yet
        assert all(r.seqs[0].finish_reason is None for r in server.on_loop(
            lambda: list(engine.running)))

    body = {"max_tokens": 100, "temperature": 0}
    results = asyncio.run(disconnect_load(server, prompts, body, check))
    survivors = [(p, t) for p, t in results if t is not None]
    assert len(survivors) == num_survivors
    tok = engine.tokenizer
    for prompt, text in survivors:
        assert text == engine.expected_text(tok.encode(prompt), 100)
    engine.step_delay = 0.001
    with server.client() as client:  # run alone: same text
        for prompt, text in survivors[:3]:
            alone = client.post(CMPL, json={"prompt": prompt, "max_tokens": 100,
                                            "temperature": 0}).json()
            assert alone["choices"][0]["text"] == text
    stats = server.stats()
    assert stats["num_requests_running"] == 0 and stats["kv_cache_usage_perc"] == 0.0
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_non_streaming_disconnect_aborts(make_server: Any) -> None:
    engine = FakeEngine(step_delay=0.02)
    server = make_server(engine)
    with server.client(timeout=0.3) as client, pytest.raises(httpx.ReadTimeout):
        client.post(CMPL, json={"prompt": "a", "max_tokens": 200})
    assert wait_until(lambda: server.stats()["num_requests_running"] == 0, 2.0)
    assert len(engine.aborted) == 1 and server.stats()["kv_cache_usage_perc"] == 0.0


def test_disconnect_while_waiting_aborts(make_server: Any) -> None:
    engine = FakeEngine()
    engine.paused = True
    server = make_server(engine)
    for stream in (False, True):
        with server.client(timeout=0.3) as client, pytest.raises(httpx.ReadTimeout):
            client.post(CMPL, json={"prompt": "a", "stream": stream})
    assert wait_until(lambda: server.stats()["num_requests_waiting"] == 0, 2.0)
    assert len(engine.aborted) == 2
