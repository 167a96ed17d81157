"""Tool calling through the real server (default model, CPU) and the official `openai` client:
`tool_choice: "required"` and a named function return calls whose arguments validate against
the tool's schema (`jsonschema`), also streamed; "auto" with the hermes parser turns the
model's `<tool_call>` text into calls; tool results in the conversation; bad tool requests are
a 400 naming the field."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
from server_harness import CHAT, LiveServer, assert_error

pytestmark = pytest.mark.timeout(300)

NAME = "smollm2"
WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 12},
                          "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a zone",
                                      "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(real_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_server.url + "/v1", api_key="none", max_retries=0,
                         timeout=240)


def _validate(name: str, arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def _streamed_calls(chunks: Iterator[Any]) -> tuple[list[tuple[str, str]], str | None, str]:
    """(name, arguments) per streamed call, the finish reason and the content."""
    calls: dict[int, list[str]] = {}
    finish, content = None, ""
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                if d.index not in calls:
                    assert d.id and d.type == "function" and d.function.name
                    calls[d.index] = [d.function.name, ""]
                calls[d.index][1] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    return [(n, a) for n, a in calls.values()], finish, content


def test_required_returns_valid_calls(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS,
                                       tool_choice="required", max_tokens=60, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        _validate(call.function.name, call.function.arguments)
    stream = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS,
                                            tool_choice="required", max_tokens=60,
                                            temperature=0, stream=True)
    calls, finish, content = _streamed_calls(stream)
    assert finish == "tool_calls" and content == "" and calls
    assert [(c.function.name, json.loads(c.function.arguments))
            for c in choice.message.tool_calls] == [(n, json.loads(a)) for n, a in calls]
    for name, arguments in calls:
        _validate(name, arguments)


def test_named_function_and_sampling(client: openai.OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, tool_choice=choice,
                                       max_tokens=30, temperature=1.0, seed=4, n=2)
    for c in r.choices:
        (call,) = c.message.tool_calls
        assert call.function.name == "get_time"
        _validate("get_time", call.function.arguments)
    stream = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS,
                                            tool_choice=choice, max_tokens=30, temperature=0,
                                            stream=True)
    calls, finish, _ = _streamed_calls(stream)
    assert [n for n, _ in calls] == ["get_time"] and finish == "stop"
    _validate("get_time", calls[0][1])


HERMES_CALL = (r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", '
               r'"unit": "(celsius|fahrenheit)"\}\}\n</tool_call>')


@pytest.fixture
def auto_tools(real_server: LiveServer) -> Iterator[LiveServer]:
    """The server with --enable-auto-tool-choice --tool-call-parser hermes, for one test."""
    state = real_server.state
    before = state.options
    state.options = dataclasses.replace(before, enable_auto_tool_choice=True,
                                        tool_call_parser="hermes")
    yield real_server
    state.options = before


def test_auto_reads_hermes_calls_from_the_text(auto_tools: LiveServer,
                                               client: openai.OpenAI) -> None:
    # the model's text is forced into Hermes' format; the parser must turn it into a call
    extra = {"structured_outputs": {"regex": HERMES_CALL}}
    r = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, max_tokens=80,
                                       temperature=0, extra_body=extra)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
    _validate("get_weather", call.function.arguments)
    stream = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS,
                                            max_tokens=80, temperature=0, stream=True,
                                            extra_body=extra)
    calls, finish, content = _streamed_calls(stream)
    assert [(n, json.loads(a)) for n, a in calls] == [
        ("get_weather", json.loads(call.function.arguments))]
    assert finish == "tool_calls" and content == ""
    plain = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS,
                                           tool_choice="none", max_tokens=5, temperature=0)
    assert plain.choices[0].message.tool_calls in (None, [])


def test_tool_results_in_the_conversation(client: openai.OpenAI) -> None:
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather",
                         "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    r = client.chat.completions.create(model=NAME, messages=messages, tools=TOOLS,
                                       tool_choice="none", max_tokens=8, temperature=0)
    assert r.choices[0].message.content and r.usage.prompt_tokens > 20


@pytest.mark.parametrize("extra, param", [
    ({"tools": TOOLS}, "tool_choice"),  # "auto" without --enable-auto-tool-choice
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}],
      "tool_choice": "none"}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "none", "messages": [
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}]},
     "messages"),
])
def test_bad_tool_requests_are_a_400(real_server: LiveServer, extra: dict[str, Any],
                                     param: str) -> None:
    with real_server.client() as http:
        r = http.post(CHAT, json={"messages": ASK, "max_tokens": 3, **extra})
    assert_error(r, 400, param=param)


def test_tool_flags_reach_the_options_and_are_checked() -> None:
    import argparse

    from fuselm.server.launcher import add_serve_arguments, options_from_args
    from fuselm.server.options import ServerOptions

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    options = options_from_args(parser.parse_args(
        ["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"]))
    assert options.enable_auto_tool_choice and options.tool_call_parser == "llama3_json"
    assert not options_from_args(parser.parse_args([])).enable_auto_tool_choice
    with pytest.raises(ValueError, match="--enable-auto-tool-choice needs --tool-call-parser"):
        ServerOptions(enable_auto_tool_choice=True)
    with pytest.raises(ValueError, match="--tool-call-parser must be one of hermes"):
        ServerOptions(tool_call_parser="mistral")


def test_tokenize_takes_tools_with_messages(real_server: LiveServer) -> None:
    with real_server.client() as http:
        ok = http.post("/tokenize", json={"messages": ASK, "tools": TOOLS})
        assert ok.status_code == 200 and ok.json()["count"] > 0
        assert_error(http.post("/tokenize", json={"prompt": "hi", "tools": TOOLS}), 400,
                     param="tools")
        assert_error(http.post("/tokenize", json={"messages": ASK, "tools": [{"x": 1}]}), 400,
                     param="tools")
