"""OpenAI API behaviour against the fake engine: the official client, exact SSE framing, usage,
and each sampling parameter reaching the engine."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from server_harness import MESSAGES, LiveServer, parse_sse

pytestmark = pytest.mark.timeout(60)

def openai_client(server: LiveServer, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kwargs.pop("api_key", "none"),
                         max_retries=0, timeout=30, **kwargs)


def test_openai_client_models_completion_chat_and_stream(fake_server: LiveServer) -> None:
    client = openai_client(fake_server)
    assert [m.id for m in client.models.list().data] == ["fake-model"]
    done = client.completions.create(model="fake-model", prompt="Hello", max_tokens=6,
                                     temperature=0)
    assert len(done.choices[0].text) == 6 and done.choices[0].finish_reason == "length"
    assert done.usage.prompt_tokens == 5 and done.usage.completion_tokens == 6

    chat = client.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=8,
                                          temperature=0)
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=8,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == chat.choices[0].message.content
    assert chunks[-1].usage == chat.usage
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_prompt_is_the_chat_template_output(fake_server: LiveServer) -> None:
    engine = fake_server.engine
    with fake_server.client() as client:
        r = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 200
    tok = engine.tokenizer
    expected = tok.encode(tok.apply_chat_template(MESSAGES, add_generation_prompt=True),
                          add_special_tokens=False)
    assert engine.received[-1][1] == expected
    assert r.json()["usage"]["prompt_tokens"] == len(expected)


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": "Hello world", "max_tokens": 7, "n": 2}),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 7, "n": 2}),
])
def test_raw_stream_framing_and_usage(fake_server: LiveServer, route: str,
                                      body: dict[str, Any]) -> None:
    with fake_server.client() as client:
        plain = client.post(route, json={**body, "temperature": 0}).json()
        r = client.post(route, json={**body, "temperature": 0, "stream": True,
                                     "stream_options": {"include_usage": True}})
        no_usage = client.post(route, json={**body, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = parse_sse(r.text)
    assert all(c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        texts[choice["index"]] += choice.get("text") or choice.get("delta", {}).get("content", "")
    for choice in plain["choices"]:
        final = choice.get("text", None) or choice.get("message", {}).get("content")
        assert texts[choice["index"]] == final
    assert all("usage" not in c for c in parse_sse(no_usage.text))


def test_sampling_parameters_reach_the_engine(fake_server: LiveServer) -> None:
    body = {"prompt": "abc", "max_tokens": 5, "temperature": 0.7, "top_p": 0.9, "top_k": 5,
            "min_p": 0.1, "seed": 3, "stop": ["zz"], "stop_token_ids": [7],
            "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.2,
            "ignore_eos": True, "logit_bias": {"10": -100, "11": 5.5}, "n": 2}
    with fake_server.client() as client:
        assert client.post("/v1/completions", json=body).status_code == 200
        params = fake_server.engine.received[-1][2]
        assert (params.temperature, params.top_p, params.top_k, params.min_p, params.seed) == (
            0.7, 0.9, 5, 0.1, 3)
        assert params.stop == ["zz"] and params.stop_token_ids == [7] and params.n == 2
        assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (
            0.5, -0.5, 1.2)
        assert params.ignore_eos and params.logit_bias == {10: -100.0, 11: 5.5}
        chat = {"messages": MESSAGES, "max_tokens": 9, "max_completion_tokens": 4}
        r = client.post("/v1/chat/completions", json=chat)
        assert fake_server.engine.received[-1][2].max_tokens == 4
        assert r.json()["usage"]["completion_tokens"] == 4
        r = client.post("/v1/chat/completions", json={"messages": MESSAGES})
        room = fake_server.engine.max_model_len - r.json()["usage"]["prompt_tokens"]
        assert r.json()["usage"]["completion_tokens"] == room


def test_seeded_sampling_is_reproducible(fake_server: LiveServer) -> None:
    body = {"prompt": "abc", "max_tokens": 12, "temperature": 1.0, "seed": 42}
    with fake_server.client() as client:
        a, b = (client.post("/v1/completions", json=body).json() for _ in range(2))
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_stop_strings_and_stop_tokens(fake_server: LiveServer) -> None:
    with fake_server.client() as client:
        text = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 10,
                                                    "temperature": 0}).json()["choices"][0]["text"]
        stop = text[3:5]
        r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 10,
                                                 "temperature": 0, "stop": stop}).json()
        assert r["choices"][0]["text"] == text[:text.find(stop)]
        assert (r["choices"][0]["finish_reason"], r["choices"][0]["stop_reason"]) == ("stop", stop)
        streamed = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 10,
                                                        "temperature": 0, "stop": stop,
                                                        "stream": True})
        chunks = parse_sse(streamed.text)
        assert "".join(c["choices"][0]["text"] for c in chunks) == r["choices"][0]["text"]
        token = 3 + ord(text[2])
        r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 10,
                                                 "temperature": 0, "stop_token_ids": [token]})
        assert r.json()["choices"][0]["stop_reason"] == token


def test_completion_logprobs_echo_and_batched_prompts(fake_server: LiveServer) -> None:
    with fake_server.client() as client:
        r = client.post("/v1/completions", json={"prompt": ["ab", "CDE"], "max_tokens": 3,
                                                 "n": 2, "logprobs": 2, "echo": True,
                                                 "temperature": 0}).json()
        ids = client.post("/v1/completions", json={"prompt": [[70, 71, 72], [73]],
                                                   "max_tokens": 1, "echo": True}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert r["choices"][0]["text"].startswith("ab") and len(r["choices"][0]["text"]) == 5
    assert r["choices"][2]["text"].startswith("CDE")
    lp = r["choices"][0]["logprobs"]
    assert lp["tokens"][:2] == ["a", "b"] and lp["token_logprobs"][:2] == [None, None]
    assert lp["token_logprobs"][2:] == [-0.25] * 3 and len(lp["top_logprobs"][2]) == 3
    assert lp["text_offset"] == [0, 1, 2, 3, 4]
    assert r["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}
    assert [c["text"][:-1] for c in ids["choices"]] == ["CDE", "F"]


def test_chat_logprobs_streamed_and_not(fake_server: LiveServer) -> None:
    body = {"messages": MESSAGES, "max_tokens": 3, "logprobs": True, "top_logprobs": 2,
            "temperature": 0}
    with fake_server.client() as client:
        plain = client.post("/v1/chat/completions", json=body).json()
        chunks = parse_sse(client.post("/v1/chat/completions",
                                       json={**body, "stream": True}).text)
    content = plain["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(c["top_logprobs"]) == 2 for c in content)
    assert content[0]["logprob"] == -0.25 and content[0]["bytes"] == list(
        content[0]["token"].encode())
    streamed = [e for c in chunks if c["choices"][0].get("logprobs")
                for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == content


def test_chat_echo_prepends_the_assistant_prefill(fake_server: LiveServer) -> None:
    messages = [*MESSAGES, {"role": "assistant", "content": "Sure:"}]
    body = {"messages": messages, "max_tokens": 3, "echo": True,
            "add_generation_prompt": False}
    with fake_server.client() as client:
        r = client.post("/v1/chat/completions", json=body).json()
    assert r["choices"][0]["message"]["content"].startswith("Sure:")


def test_text_content_parts_are_joined(fake_server: LiveServer) -> None:
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    with fake_server.client() as client:
        r = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": parts}], "max_tokens": 1})
    assert r.status_code == 200
    tok = fake_server.engine.tokenizer
    assert tok.decode(fake_server.engine.received[-1][1]) == "<|user|>one\ntwo\n<|assistant|>"


def test_models_tokenize_detokenize_version_health(fake_server: LiveServer) -> None:
    with fake_server.client() as client:
        assert client.get("/health").status_code == 200
        assert client.get("/version").json()["version"]
        card = client.get("/v1/models/fake-model").json()
        assert card["id"] == "fake-model" and card["max_model_len"] == 256
        r = client.post("/tokenize", json={"prompt": "hey"}).json()
        assert r == {"count": 3, "max_model_len": 256, "tokens": [107, 104, 124],
                     "token_strs": None}  # vLLM's shape
        r = client.post("/tokenize", json={"messages": MESSAGES}).json()
        tok = fake_server.engine.tokenizer
        assert r["tokens"] == tok.encode(tok.apply_chat_template(MESSAGES))
        assert client.post("/detokenize", json={"tokens": [107, 104, 124]}).json() == {
            "prompt": "hey"}
        openapi = client.get("/openapi.json").json()
        assert "/v1/chat/completions" in openapi["paths"]


def test_kserve_generate_and_generate_stream(fake_server: LiveServer) -> None:
    body = {"text_input": "Hello", "parameters": {"max_tokens": 5, "temperature": 0}}
    with fake_server.client() as client:
        r = client.post("/v2/models/fake-model/generate", json=body)
        assert r.status_code == 200
        out = r.json()
        assert out["model_name"] == "fake-model" and len(out["text_output"]) == 5
        s = client.post("/v2/models/fake-model/generate_stream", json=body)
    events = [json.loads(e[len("data: "):]) for e in s.text.split("\n\n") if e]
    assert "".join(e["text_output"] for e in events) == out["text_output"]
    assert events[-1]["finish_reason"] == "length"
