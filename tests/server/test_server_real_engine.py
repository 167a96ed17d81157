"""End to end with the real engine on the default model (SmolLM2-135M GGUF, CPU): the official
client, exact framing, metrics vs usage, disconnects, bad input. The model loads once per session
(`real_server` in conftest.py); token counts stay small (CPU decode is tens of ms a token)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import openai
import pytest
from server_harness import LiveServer, assert_error, disconnect_load, parse_sse, scrape, wait_until

pytestmark = pytest.mark.timeout(180)

NAME = "smollm2"
MESSAGES = [{"role": "user", "content": "Name a color."}]


def test_openai_client_end_to_end(real_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=real_server.url + "/v1", api_key="none", max_retries=0,
                           timeout=60)
    assert [m.id for m in client.models.list().data] == [NAME]
    done = client.completions.create(model=NAME, prompt="The capital of France is",
                                     max_tokens=6, temperature=0)
    assert done.choices[0].text and done.usage.completion_tokens <= 6
    chat = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=8,
                                          temperature=0)
    chunks = list(client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == chat.choices[0].message.content and streamed
    assert real_server.engine.engine.num_pipelined_steps > 0, "no step ran ahead"
    assert chunks[-1].usage == chat.usage
    tok = real_server.engine.tokenizer
    template_ids = tok.encode(tok.apply_chat_template(MESSAGES, add_generation_prompt=True),
                              add_special_tokens=False)
    assert chat.usage.prompt_tokens == len(template_ids)
    with real_server.client() as http:
        assert http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"] == \
            template_ids


def test_raw_framing_and_usage(real_server: LiveServer) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
    with real_server.client() as client:
        plain = client.post("/v1/completions", json=body).json()
        raw = client.post("/v1/completions", json={
            **body, "stream": True, "stream_options": {"include_usage": True}}).text
    chunks = parse_sse(raw)
    assert chunks[-1]["usage"] == plain["usage"]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == plain["choices"][0]["text"]


def test_logprobs_real_engine(real_server: LiveServer) -> None:
    body = {"messages": MESSAGES, "max_tokens": 3, "temperature": 0, "logprobs": True,
            "top_logprobs": 2}
    with real_server.client() as client:
        chat = client.post("/v1/chat/completions", json=body).json()
        cmpl = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3,
                                                    "temperature": 0, "logprobs": 2}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"]
    for entry in content:  # greedy: the sampled token is the most likely one
        assert len(entry["top_logprobs"]) == 2 and entry["logprob"] <= 0
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])
    lp = cmpl["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == cmpl["choices"][0]["text"]
    assert all(len(top) >= 2 for top in lp["top_logprobs"])


def test_metrics_token_counters_equal_usage(real_server: LiveServer) -> None:
    before = scrape(real_server)
    prompt_total = completion_total = 0
    with real_server.client() as client:
        for body in ({"prompt": "Hi", "max_tokens": 3}, {"prompt": ["a b", "c"], "max_tokens": 2},
                     {"prompt": "x", "max_tokens": 4, "n": 2, "temperature": 0.8, "seed": 1}):
            usage = client.post("/v1/completions", json=body).json()["usage"]
            prompt_total += usage["prompt_tokens"]
            completion_total += usage["completion_tokens"]
    after = scrape(real_server)
    for name, total in (("prompt", prompt_total), ("generation", completion_total)):
        key = f"vllm:{name}_tokens_total"
        assert after[key] - before[key] == total


def test_bad_input_never_reaches_the_engine(real_server: LiveServer) -> None:
    before = real_server.stats()["prompt_tokens_total"]
    with real_server.client() as client:
        assert_error(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 9000}),
                     400, "max_tokens", "context_length_exceeded")
        assert_error(client.post("/v1/completions", json={"prompt": [10**6]}), 400, "prompt")
        assert_error(client.post("/v1/chat/completions", json={"messages": MESSAGES,
                                                                "temperature": -1}), 400)
    assert real_server.stats()["prompt_tokens_total"] == before


def _held_blocks(server: LiveServer) -> tuple[int, int, int]:
    """(running requests, blocks in use, distinct blocks held by running sequences)."""
    def probe(core) -> tuple[int, int, int]:  # on the step thread, between two steps
        stats = core.stats()
        held = {b for seq in core.scheduler.running for b in seq.block_ids}
        return (stats["num_requests_running"],
                stats["num_total_blocks"] - stats["num_free_blocks"], len(held))

    return server.on_loop(lambda: server.engine.inspect(probe))


def test_streams_with_disconnects_real_engine(real_server: LiveServer) -> None:
    prompts = [f"Story {i % 4}: Once upon a time" for i in range(16)]
    max_tokens, survivors = 40, 12

    def check() -> None:
        start = time.monotonic()

        def settled() -> bool:
            running, used, held = _held_blocks(real_server)
            return running == survivors and used == held

        assert wait_until(settled, 2.0, 0.05), _held_blocks(real_server)
        assert time.monotonic() - start < 2.0

    # ignore_eos keeps every stream going to max_tokens
    body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    results = asyncio.run(disconnect_load(real_server, prompts, body, check))
    alone: dict[str, str] = {}
    with real_server.client() as client:
        for prompt, text in results:
            if text is None:
                continue
            if prompt not in alone:
                alone[prompt] = client.post("/v1/completions", json={
                    **body, "prompt": prompt}).json()["choices"][0]["text"]
            assert text == alone[prompt]
    assert sum(t is not None for _, t in results) == survivors
    assert wait_until(lambda: real_server.stats()["num_requests_running"] == 0, 5)
    assert real_server.stats()["kv_cache_usage_perc"] == 0.0



@pytest.mark.slow
def test_200_streams_quarter_disconnect_real_engine(real_server: LiveServer) -> None:
    """Acceptance 4 at full size on the real engine (CPU: about a second per 200-wide step)."""
    prompts = [f"Story {i % 8}: Once upon a time" for i in range(200)]
    body: dict[str, Any] = {"max_tokens": 16, "temperature": 0, "ignore_eos": True}

    def check() -> None:
        def settled() -> bool:
            running, used, held = _held_blocks(real_server)
            return running == 150 and used == held

        assert wait_until(settled, 2.0, 0.05), _held_blocks(real_server)

    results = asyncio.run(disconnect_load(real_server, prompts, body, check))
    alone: dict[str, str] = {}
    with real_server.client() as client:
        for prompt, text in results:
            if text is not None:
                if prompt not in alone:
                    alone[prompt] = client.post("/v1/completions", json={
                        **body, "prompt": prompt}).json()["choices"][0]["text"]
                assert text == alone[prompt]
    assert sum(t is not None for _, t in results) == 150
    assert wait_until(lambda: real_server.stats()["num_requests_running"] == 0, 5)
    assert real_server.stats()["kv_cache_usage_perc"] == 0.0
