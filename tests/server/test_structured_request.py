"""The request side of structured outputs and tools, on the real request schemas (no model):
which constraint each field becomes, which plan `tools` + `tool_choice` make, and the 400s."""

from __future__ import annotations

from typing import Any

import pytest

from fuselm.errors import InvalidRequestError
from fuselm.server.protocol import ChatCompletionRequest, CompletionRequest
from fuselm.server.serving_structured import (
    chat_constraint,
    plan_tools,
    structured_outputs_of,
    template_messages,
)

MESSAGES = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "g"}}]


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest(**{"messages": MESSAGES, **fields})


@pytest.mark.parametrize("fields, kind, value", [
    ({"response_format": {"type": "json_object"}}, "json_object", True),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     "json", SCHEMA),
    ({"structured_outputs": {"json": SCHEMA}}, "json", SCHEMA),
    ({"structured_outputs": {"regex": "a+"}}, "regex", "a+"),
    ({"structured_outputs": {"choice": ["x", "y"]}}, "choice", ["x", "y"]),
    ({"structured_outputs": {"grammar": "start: \"a\""}}, "grammar", "start: \"a\""),
    ({"guided_json": '{"type": "object"}'}, "json", {"type": "object"}),
    ({"guided_regex": "b"}, "regex", "b"),
    ({"guided_choice": ["z"]}, "choice", ["z"]),
    ({"guided_grammar": "root ::= \"a\""}, "grammar", "root ::= \"a\""),
])
def test_each_field_becomes_its_constraint(fields: dict[str, Any], kind: str, value: Any) -> None:
    for req in (chat(**fields), CompletionRequest(prompt="p", **fields)):
        params = structured_outputs_of(req)
        assert params is not None and params.kind == kind
        assert (params.json_object if kind == "json_object" else getattr(params, kind)) == value


def test_text_format_and_no_fields_are_unconstrained() -> None:
    assert structured_outputs_of(chat(response_format={"type": "text"})) is None
    assert structured_outputs_of(chat()) is None
    assert structured_outputs_of(chat(guided_decoding_backend="xgrammar")) is None


def test_whitespace_switch_reaches_the_params() -> None:
    params = structured_outputs_of(chat(structured_outputs={"json_object": True,
                                                            "disable_any_whitespace": True}))
    assert params is not None and params.json_object and params.disable_any_whitespace


@pytest.mark.parametrize("fields, param", [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"structured_outputs": {"regex": "a"}, "guided_json": SCHEMA}, "guided_json"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"regexp": "a"}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "extra": 1}}},
     "response_format"),
    ({"guided_json": "{bad json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
])
def test_conflicts_and_malformed_fields_are_refused(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        structured_outputs_of(chat(**fields))
    assert info.value.param == param


def test_tool_plans() -> None:
    assert plan_tools(chat(), "hermes") is None
    none = plan_tools(chat(tools=TOOLS, tool_choice="none"), None)
    assert none is not None and none.mode == "none" and none.constraint is None
    assert [t["function"]["name"] for t in none.template_tools] == ["f", "g"]
    auto = plan_tools(chat(tools=TOOLS), "hermes")
    assert auto is not None and auto.mode == "auto" and auto.parser_name == "hermes"
    required = plan_tools(chat(tools=TOOLS, tool_choice="required"), None)
    assert required is not None and required.constraint is not None
    items = required.constraint.json["items"]["anyOf"]  # type: ignore[index]
    assert [i["properties"]["name"]["enum"] for i in items] == [["f"], ["g"]]
    assert items[0]["properties"]["parameters"] == SCHEMA
    single = plan_tools(chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=False),
                        None)
    assert single is not None and single.constraint.json["maxItems"] == 1  # type: ignore
    named = plan_tools(chat(tools=TOOLS, tool_choice={"type": "function",
                                                      "function": {"name": "f"}}), None)
    assert named is not None and named.constraint.json == SCHEMA  # type: ignore[union-attr]
    assert named.finish_reason(True, "stop") == "stop"
    assert required.finish_reason(True, "stop") == "tool_calls"
    assert required.finish_reason(True, "length") == "length"


def test_parallel_false_keeps_the_first_call() -> None:
    plan = plan_tools(chat(tools=TOOLS, parallel_tool_calls=False), "hermes")
    assert plan is not None
    text = ('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
            '<tool_call>{"name": "g", "arguments": {}}</tool_call>')
    assert [c.name for c in plan.extract(text).tool_calls] == ["f"]


@pytest.mark.parametrize("fields, param", [
    ({"tools": TOOLS}, "tool_choice"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "h"}}},
     "tool_choice"),
    ({"tools": TOOLS + TOOLS[:1], "tool_choice": "none"}, "tools"),
    ({"tools": [{"type": "retrieval"}], "tool_choice": "none"}, "tools"),
])
def test_bad_tool_requests(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        plan_tools(chat(**fields), None)
    assert info.value.param == param


def test_forced_tool_choice_and_a_constraint_do_not_mix() -> None:
    req = chat(tools=TOOLS, tool_choice="required", guided_regex="a")
    with pytest.raises(InvalidRequestError) as info:
        chat_constraint(req, plan_tools(req, None))
    assert info.value.param == "tool_choice"
    auto = chat(tools=TOOLS, guided_regex="a")
    assert chat_constraint(auto, plan_tools(auto, "hermes")).regex == "a"  # type: ignore


def test_tool_call_arguments_reach_the_template_as_objects() -> None:
    req = chat(messages=[*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function",
         "function": {"name": "f", "arguments": '{"a": 1}'}}]}])
    rendered = template_messages(req.messages)
    assert rendered[0] is req.messages[0]
    assert rendered[1].tool_calls[0]["function"]["arguments"] == {"a": 1}
    bad = chat(messages=[{"role": "assistant", "tool_calls": [{"function": {"name": 3}}]}])
    with pytest.raises(InvalidRequestError):
        template_messages(bad.messages)
