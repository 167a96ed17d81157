"""/metrics: vLLM's names under `fuselm:`, token counters equal to the summed usage."""

from __future__ import annotations

from typing import Any

import pytest
from fake_engine import FakeEngine
from server_harness import MESSAGES, LiveServer, parse_sse, scrape

pytestmark = pytest.mark.timeout(60)

EXPECTED_NAMES = {
    "fuselm:num_requests_running", "fuselm:num_requests_waiting", "fuselm:kv_cache_usage_perc",
    "fuselm:prompt_tokens", "fuselm:generation_tokens", "fuselm:time_to_first_token_seconds",
    "fuselm:inter_token_latency_seconds", "fuselm:e2e_request_latency_seconds",
    "fuselm:num_preemptions", "fuselm:prefix_cache_queries", "fuselm:prefix_cache_hits",
    "fuselm:request_success",
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
    assert samples["fuselm:prompt_tokens_total"] == prompt_total
    assert samples["fuselm:generation_tokens_total"] == completion_total
    assert samples["fuselm:request_success_total"] == 1 + 2 + 1 + 1 + 1 + 1
    assert samples["fuselm:e2e_request_latency_seconds_count"] == 7
    assert samples["fuselm:time_to_first_token_seconds_count"] == 7
    assert samples["fuselm:num_requests_running"] == 0
    assert samples["fuselm:kv_cache_usage_perc"] == 0.0


def test_metrics_are_per_app(make_server: Any) -> None:
    a, b = make_server(), make_server()
    with a.client() as client:
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).is_success
    assert scrape(a)["fuselm:generation_tokens_total"] == 2
    assert scrape(b)["fuselm:generation_tokens_total"] == 0


def test_gauges_follow_engine_stats(make_server: Any) -> None:
    engine = FakeEngine()
    server = make_server(engine)
    engine.counters.update(num_preemptions_total=3, prefix_cache_queries_total=40,
                           prefix_cache_hits_total=16)
    samples = scrape(server)
    assert samples["fuselm:num_preemptions_total"] == 3
    assert samples["fuselm:prefix_cache_queries_total"] == 40
    assert samples["fuselm:prefix_cache_hits_total"] == 16
