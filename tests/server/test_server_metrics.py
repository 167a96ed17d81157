"""/metrics: vLLM's names (`vllm:*`), token counters equal to the summed usage."""

from __future__ import annotations

from typing import Any

import pytest
from fake_engine import FakeEngine
from server_harness import MESSAGES, LiveServer, parse_sse, scrape

pytestmark = pytest.mark.timeout(60)

EXPECTED_NAMES = {
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds",
    "vllm:num_preemptions", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits",
    "vllm:request_success",
}


def test_token_counters_equal_summed_usage(make_server: Any) -> None:
    server: LiveServer = make_server(FakeEngine(eos_after=5))
    requests = [
        ("/v1/completions", {"prompt": "hello", "max_tokens": 3}),
        ("/v1/completions", {"prompt": ["ab", "cde"], "max_tokens": 4, "n": 2}),
        ("/v1/completions", {"prompt": "xyz", "max_tokens": 9}),  # stops at EOS after 5
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 7, "n": 3}),
        ("/v1/completions", {"prompt": "s", "max_tokens": 6, "stream": True,
                             "stream_options": {"include_usage": True}}),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "stream": True,
                                  "stream_options": {"include_usage": True}}),
    ]
    prompt_total = completion_total = 0
    with server.client() as client:
        for route, body in requests:
            r = client.post(route, json=body)
            assert r.status_code == 200
            usage = parse_sse(r.text)[-1]["usage"] if body.get("stream") else r.json()["usage"]
            prompt_total += usage["prompt_tokens"]
            completion_total += usage["completion_tokens"]
    samples = scrape(server)
    assert EXPECTED_NAMES <= samples[""]
    assert samples["vllm:prompt_tokens_total"] == prompt_total
    assert samples["vllm:generation_tokens_total"] == completion_total
    assert samples["vllm:request_success_total"] == 1 + 2 + 1 + 1 + 1 + 1
    assert samples["vllm:e2e_request_latency_seconds_count"] == 7
    assert samples["vllm:time_to_first_token_seconds_count"] == 7
    assert samples["vllm:num_requests_running"] == 0
    assert samples["vllm:kv_cache_usage_perc"] == 0.0


def test_metrics_are_per_app(make_server: Any) -> None:
    a, b = make_server(), make_server()
    with a.client() as client:
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).is_success
    assert scrape(a)["vllm:generation_tokens_total"] == 2
    assert scrape(b)["vllm:generation_tokens_total"] == 0


def test_gauges_follow_engine_stats(make_server: Any) -> None:
    engine = FakeEngine()
    server = make_server(engine)
    engine.counters.update(num_preemptions_total=3, prefix_cache_queries_total=40,
                           prefix_cache_hits_total=16)
    samples = scrape(server)
    assert samples["vllm:num_preemptions_total"] == 3
    assert samples["vllm:prefix_cache_queries_total"] == 40
    assert samples["vllm:prefix_cache_hits_total"] == 16
