"""Every bad input gets its status code and an OpenAI-shaped body, and never reaches the engine;
auth, unknown models, queue bound, engine failure, draining, body size, mid-stream errors."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from fake_engine import FakeEngine
from server_harness import CHAT, CMPL, MESSAGES, LiveServer, assert_error, parse_sse, wait_until

pytestmark = pytest.mark.timeout(60)

BAD_REQUESTS = [
    (CMPL, {"prompt": "hi", "temperature": -1}, "temperature"),
    (CMPL, {"prompt": "hi", "temperature": "hot"}, "temperature"),
    (CMPL, {"prompt": "hi", "top_p": 0}, "top_p"),
    (CMPL, {"prompt": "hi", "top_p": 1.5}, "top_p"),
    (CMPL, {"prompt": "hi", "top_k": -5}, "top_k"),
    (CMPL, {"prompt": "hi", "min_p": 2}, "min_p"),
    (CMPL, {"prompt": "hi", "n": 0}, "n"),
    (CMPL, {"prompt": "hi", "n": 1000}, "n"),
    (CMPL, {"prompt": "hi", "logprobs": 21}, "logprobs"),
    (CMPL, {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    (CMPL, {"prompt": "hi", "max_tokens": 10**6}, "max_tokens"),
    (CMPL, {"prompt": "x" * 300, "max_tokens": 1}, "prompt"),
    (CMPL, {"prompt": ""}, "prompt"),
    (CMPL, {"prompt": []}, "prompt"),
    (CMPL, {"prompt": [999999]}, "prompt"),
    (CMPL, {"prompt": ["a"] * 65}, "prompt"),
    (CMPL, {"prompt": 123}, None),
    (CMPL, {}, "prompt"),
    (CMPL, {"prompt": "hi", "stop": ["s"] * 17}, "stop"),
    (CMPL, {"prompt": "hi", "stop": [""]}, "stop"),
    (CMPL, {"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids"),
    (CMPL, {"prompt": "hi", "logit_bias": {"abc": 1}}, "logit_bias"),
    (CMPL, {"prompt": "hi", "logit_bias": {"5": 1000}}, "logit_bias"),
    (CMPL, {"prompt": "hi", "logit_bias": {"999999": 1}}, "logit_bias"),
    (CMPL, {"prompt": "hi", "seed": 2**70}, "seed"),
    (CMPL, {"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
    (CMPL, {"prompt": "hi", "frequency_penalty": -3}, "frequency_penalty"),
    (CMPL, {"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    (CMPL, {"prompt": "hi", "suffix": "x"}, "suffix"),
    (CMPL, {"prompt": "hi", "best_of": 2}, "best_of"),
    (CMPL, {"prompt": "hi", "stream_options": {"include_usage": "maybe"}}, None),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {}, "messages"),
    (CHAT, {"messages": [{"role": "", "content": "x"}]}, None),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    (CHAT, {"messages": MESSAGES, "top_logprobs": 5}, "top_logprobs"),
    (CHAT, {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"messages": MESSAGES, "max_completion_tokens": 10**6}, "max_tokens"),
    (CHAT, {"messages": "hello"}, "messages"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": MESSAGES}, "prompt"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/v2/models/fake-model/generate", {"parameters": {}}, "text_input"),
    ("/v2/models/fake-model/generate", {"text_input": "a", "parameters": {"n": 2}},
     "parameters.n"),
    ("/v2/models/fake-model/generate_stream", {"text_input": ""}, "prompt"),
]


@pytest.mark.parametrize("route,body,param", BAD_REQUESTS,
                         ids=[f"{r}-{json.dumps(b)[:40]}" for r, b, _ in BAD_REQUESTS])
def test_bad_input_is_400_and_never_reaches_the_engine(fake_server: LiveServer, route: str,
                                                       body: dict[str, Any],
                                                       param: str | None) -> None:
    before = len(fake_server.engine.received)
    with fake_server.client() as client:
        for stream in (False, True):
            payload = {**body, "stream": True} if stream and route in (CMPL, CHAT) else body
            error = assert_error(client.post(route, json=payload), 400, param)
            assert error["type"] == "invalid_request_error"
    assert len(fake_server.engine.received) == before


def test_malformed_bodies_are_400(fake_server: LiveServer) -> None:
    headers = {"content-type": "application/json"}
    with fake_server.client() as client:
        for raw in (b"{bad", b"[1, 2]", b"", b'{"prompt": "a", "temperature": NaN}',
                    b'{"prompt": "a", "max_tokens": Infinity}', "\udcff".encode(
                        "utf-8", "surrogatepass"), b"[" * 100_000,
                    b'{"prompt": "a\\udcffb"}', b'{"prompt": "a", "stop": ["\\ud800"]}',
                    b'{"prompt": "a", "logit_bias": {"\\udfff": 1}}'):
            assert_error(client.post(CMPL, content=raw, headers=headers), 400)
    assert fake_server.engine.received == [] or all(
        ids for _, ids, _ in fake_server.engine.received)


def test_context_length_error_code(fake_server: LiveServer) -> None:
    with fake_server.client() as client:
        r = client.post(CMPL, json={"prompt": "hi", "max_tokens": 10**6})
    assert_error(r, 400, "max_tokens", "context_length_exceeded")


def test_api_key_is_required_on_inference_routes(make_server: Any) -> None:
    server = make_server(api_key="sk-test")
    routes = [("POST", CMPL, {"prompt": "a", "max_tokens": 1}),
              ("POST", CHAT, {"messages": MESSAGES, "max_tokens": 1}),
              ("GET", "/v1/models", None),
              ("POST", "/tokenize", {"prompt": "a"}),
              ("POST", "/detokenize", {"tokens": [70]}),
              ("POST", "/v2/models/fake-model/generate", {"text_input": "a"}),
              ("POST", "/v2/models/fake-model/generate_stream", {"text_input": "a"})]
    with server.client() as client:
        for method, route, body in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test"}):
                r = client.request(method, route, json=body, headers=headers)
                assert_error(r, 401, code="invalid_api_key")
            ok = client.request(method, route, json=body,
                                headers={"Authorization": "Bearer sk-test"})
            assert ok.status_code == 200, (route, ok.text)
        for route in ("/health", "/metrics", "/version"):
            assert client.get(route).status_code == 200
    assert len(server.engine.received) == 4


def test_unknown_model_and_route_are_404(fake_server: LiveServer) -> None:
    with fake_server.client() as client:
        assert_error(client.post(CMPL, json={"model": "gpt-9", "prompt": "a"}), 404,
                     code="model_not_found")
        assert_error(client.post(CHAT, json={"model": "gpt-9", "messages": MESSAGES}), 404)
        assert_error(client.post("/v2/models/gpt-9/generate", json={"text_input": "a"}), 404)
        assert_error(client.get("/v1/models/gpt-9"), 404)
        assert_error(client.get("/v1/nothing-here"), 404)
        assert_error(client.get(CMPL), 405)


def test_waiting_queue_bound_is_429(make_server: Any) -> None:
    engine = FakeEngine()
    engine.paused = True  # nothing leaves the waiting queue
    server = make_server(engine, max_waiting_requests=2)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            waiting = [asyncio.create_task(client.post(CMPL, json={"prompt": "a"}))
                       for _ in range(2)]
            await asyncio.to_thread(wait_until, lambda: server.stats()[
                "num_requests_waiting"] == 2, 10)
            rejected = [await client.post(CMPL, json={"prompt": "a", "stream": stream})
                        for stream in (False, True)]
            server.on_loop(lambda: setattr(engine, "paused", False) or engine._wake.set())
            return rejected + list(await asyncio.gather(*waiting))

    responses = asyncio.run(run())
    for r in responses[:2]:
        assert_error(r, 429, code="queue_full")
    assert [r.status_code for r in responses[2:]] == [200, 200]
    assert len(engine.received) == 2


def test_engine_queue_full_error_is_429(make_server: Any) -> None:
    engine = FakeEngine(max_waiting=0)
    server = make_server(engine)
    with server.client() as client:
        for stream in (False, True):
            assert_error(client.post(CMPL, json={"prompt": "a", "stream": stream}), 429)


def test_engine_failure_is_503_and_health_fails(make_server: Any) -> None:
    engine = FakeEngine()
    server = make_server(engine)
    with server.client() as client:
        assert client.get("/health").status_code == 200
        server.on_loop(engine.kill)
        assert_error(client.post(CMPL, json={"prompt": "a"}), 503)
        assert_error(client.post(CHAT, json={"messages": MESSAGES, "stream": True}), 503)
        assert_error(client.get("/health"), 503)


def test_error_after_stream_began_is_an_error_event(make_server: Any) -> None:
    engine = FakeEngine()
    engine.fail_after_tokens = 3
    server = make_server(engine)
    with server.client() as client:
        r = client.post(CHAT, json={"messages": MESSAGES, "max_tokens": 10, "stream": True})
    assert r.status_code == 200
    events = parse_sse(r.text)
    assert set(events[-1]) == {"error"} and events[-1]["error"]["type"] == "service_unavailable"
    assert sum(len(e["choices"][0]["delta"].get("content", "")) for e in events[:-1]) == 3


def test_draining_server_answers_503(make_server: Any) -> None:
    server = make_server()
    server.state.draining = True
    with server.client() as client:
        assert_error(client.post(CMPL, json={"prompt": "a"}), 503, code="shutting_down")
        assert_error(client.get("/health"), 503)
        assert client.get("/metrics").status_code == 200
    server.state.draining = False


def test_body_size_limit(make_server: Any) -> None:
    server = make_server(max_body_bytes=1000)
    with server.client() as client:
        assert_error(client.post(CMPL, json={"prompt": "a" * 2000}), 413,
                     code="request_too_large")

        def chunks() -> Any:  # no Content-Length: counted as it arrives
            yield b'{"prompt": "'
            for _ in range(20):
                yield b"a" * 100
            yield b'"}'

        r = client.post(CMPL, content=chunks(), headers={"content-type": "application/json"})
        assert_error(r, 413)
        assert client.post(CMPL, json={"prompt": "a" * 100, "max_tokens": 1}).status_code == 200
    assert len(server.engine.received) == 1
