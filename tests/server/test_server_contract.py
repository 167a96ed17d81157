"""The request contract: every field of OpenAI's completions and chat completions references
(the lists below are copied from its API reference, not from our schemas) is accepted, honoured
or refused by name; an unknown field is a 400 naming it; the README's table lists every field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from server_harness import CHAT, CMPL, MESSAGES, assert_error

from fuselm.server.contract import IGNORED, NOT_IMPLEMENTED, STRUCTURED_OUTPUT_FIELDS
from fuselm.server.protocol import ChatCompletionRequest, CompletionRequest

README = Path(__file__).resolve().parents[2] / "src/fuselm/server/README.md"

# OpenAI's API reference: a value for each field that asks for something.
OPENAI_COMPLETIONS = {
    "model": "fake-model", "prompt": "hi", "best_of": 1, "echo": True,
    "frequency_penalty": 0.5, "logit_bias": {"100": 1.0}, "logprobs": 2, "max_tokens": 3,
    "n": 2, "presence_penalty": 0.5, "seed": 7, "stop": ["zz"], "stream": False,
    "stream_options": None, "suffix": "end", "temperature": 0.5, "top_p": 0.9, "user": "u1",
}
OPENAI_CHAT = {
    "messages": MESSAGES, "model": "fake-model", "audio": {"voice": "alloy", "format": "mp3"},
    "frequency_penalty": 0.5, "function_call": "auto",
    "functions": [{"name": "f", "parameters": {}}], "logit_bias": {"100": 1.0},
    "logprobs": True, "max_completion_tokens": 3, "max_tokens": 3, "metadata": {"k": "v"},
    "modalities": ["text", "audio"], "n": 2, "parallel_tool_calls": True,
    "prediction": {"type": "content", "content": "x"}, "presence_penalty": 0.5,
    "prompt_cache_key": "k", "reasoning_effort": "low",
    "response_format": {"type": "json_object"}, "safety_identifier": "s", "seed": 7,
    "service_tier": "auto", "stop": "zz", "store": False, "stream": False,
    "stream_options": None, "temperature": 0.5,
    "tool_choice": "required",
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "top_logprobs": 2, "top_p": 0.9, "user": "u1", "verbosity": "low",
    "web_search_options": {},
}
REFUSED = set(STRUCTURED_OUTPUT_FIELDS) | set(NOT_IMPLEMENTED)


def _base(route: str) -> dict[str, Any]:
    return {"prompt": "hi", "max_tokens": 2} if route == CMPL else {"messages": MESSAGES,
                                                                     "max_tokens": 2}


@pytest.mark.parametrize("route, fields", [(CMPL, OPENAI_COMPLETIONS), (CHAT, OPENAI_CHAT)])
def test_every_openai_field_is_honoured_ignored_or_refused_by_name(
        fake_server: Any, route: str, fields: dict[str, Any]) -> None:
    with fake_server.client() as client:
        for name, value in fields.items():
            extra = {"top_logprobs": {"logprobs": True},
                     "tool_choice": {"tools": fields.get("tools")},  # OpenAI: no tools, a 400
                     "tools": {"tool_choice": "none"},  # "auto" needs a tool call parser
                     }.get(name, {})
            r = client.post(route, json={**_base(route), **extra, name: value})
            if name in REFUSED:
                error = assert_error(r, 400, param=name)
                assert name in error["message"]
            else:
                assert r.status_code == 200, (name, r.text)


@pytest.mark.parametrize("route", [CMPL, CHAT])
def test_unknown_field_is_a_400_naming_it(fake_server: Any, route: str) -> None:
    num_received = len(fake_server.engine.received)
    with fake_server.client() as client:
        body = {**_base(route), "max_token": 5}
        body.pop("max_tokens")
        error = assert_error(client.post(route, json=body), 400, param="max_token")
        assert "unrecognized" in error["message"]
        nested = {**_base(route), "stream": True, "stream_options": {"include_usge": True}}
        assert_error(client.post(route, json=nested), 400, param="stream_options.include_usge")
    assert len(fake_server.engine.received) == num_received


def test_refused_fields_pass_with_values_that_ask_for_nothing(fake_server: Any) -> None:
    with fake_server.client() as client:
        for name, harmless in NOT_IMPLEMENTED.items():
            route = CMPL if name in CompletionRequest.model_fields else CHAT
            for value in harmless:
                r = client.post(route, json={**_base(route), name: value})
                assert r.status_code == 200, (name, value, r.text)


def test_chat_template_from_a_request_is_refused(fake_server: Any) -> None:
    with fake_server.client() as client:
        body = {**_base(CHAT), "chat_template": "{{ messages[0].content }}"}
        error = assert_error(client.post(CHAT, json=body), 400, param="chat_template")
        assert "trust-request-chat-template" in error["message"]
        body = {**_base(CHAT), "chat_template_kwargs": {"messages": []}}
        assert_error(client.post(CHAT, json=body), 400, param="chat_template_kwargs")
        body = {**_base(CHAT), "chat_template_kwargs": {"enable_thinking": False}}
        assert client.post(CHAT, json=body).status_code == 200


def test_vllm_extensions_are_honoured(fake_server: Any) -> None:
    engine = fake_server.engine
    with fake_server.client() as client:
        r = client.post(CMPL, json={"prompt": "abcdefgh", "max_tokens": 2,
                                    "truncate_prompt_tokens": 3})
        assert r.json()["usage"]["prompt_tokens"] == 3
        assert engine.received[-1][1] == engine.tokenizer.encode("fgh")
        ids = [client.post(CMPL, json={"prompt": "x", "max_tokens": 1, "request_id": "mine"}
                           ).json()["id"] for _ in range(2)]
        assert ids == ["cmpl-mine", "cmpl-mine"]
        chat = client.post(CHAT, json={**_base(CHAT), "request_id": "c1"}).json()
        assert chat["id"] == "chatcmpl-c1"
    assert len({rid for rid, _, _ in engine.received}) == len(engine.received)


def _readme_fields() -> set[str]:
    section = README.read_text().split("## Request fields", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    return names


def test_readme_table_lists_every_request_field() -> None:
    fields = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
    listed = _readme_fields()
    assert fields - listed == set(), "fields missing from the README table"
    assert listed - fields == set(), "README rows naming no field"
    assert set(IGNORED) <= fields and REFUSED <= fields
