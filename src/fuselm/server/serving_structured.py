"""Structured outputs and tool calling on the request path: the request's constraint fields
(`response_format`, `structured_outputs`, vLLM's `guided_*`) become one
`StructuredOutputsParams`; `tools` + `tool_choice` become a `ToolPlan` (what the template
sees, which constraint forces a call, how the output is read back as calls).

Field shapes follow OpenAI's and vLLM's references; each is validated here, so that a bad
value is a 400 naming its field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from fuselm.errors import InvalidRequestError
from fuselm.sampling_params import StructuredOutputsParams
from fuselm.server.tool_parsers import ExtractedToolCalls, StreamDelta, get_tool_parser
from fuselm.server.tool_parsers.forced import (
    NamedStreamer,
    RequiredStreamer,
    extract_named,
    extract_required,
    parameters_schema,
    required_schema,
)


class _Strict(BaseModel):
    """Unknown keys are a 400 (they are inside fields the contract cannot see)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)


class JsonSchemaFormat(_Strict):
    """OpenAI's ``response_format.json_schema``."""

    name: str = Field("response", min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's ``response_format``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(_Strict):
    """vLLM's `structured_outputs` object (the constraints fuselm implements)."""

    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False


class FunctionDefinition(_Strict):
    """A tool's function: its name, description and parameters schema."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Strict):
    """One of ``tools``."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class _FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"] = "function"
    function: _FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
BACKENDS = (None, "auto", "xgrammar")
"""`guided_decoding_backend` values accepted (fuselm's only backend is xgrammar)."""


def _parse(adapter: TypeAdapter[Any], value: Any, param: str) -> Any:
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidRequestError(f"{param}{'.' + where if where else ''}: {first['msg']}",
                                  param=param) from None


def structured_outputs_of(req: Any) -> StructuredOutputsParams | None:
    """The one constraint a request asks for, or None; InvalidRequestError when it asks for
    several or one is malformed."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    if req.response_format is not None:
        fmt = _parse(TypeAdapter(ResponseFormat), req.response_format, "response_format")
        if fmt.type == "json_object":
            found.append(("response_format", _params("response_format", json_object=True)))
        elif fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.json_schema is None:
                raise InvalidRequestError("response_format json_schema needs a schema",
                                          param="response_format")
            found.append(("response_format",
                          _params("response_format", json=fmt.json_schema.json_schema)))
    if req.structured_outputs is not None:
        so = _parse(TypeAdapter(StructuredOutputsField), req.structured_outputs,
                    "structured_outputs")
        found.append(("structured_outputs", _params(
            "structured_outputs", json=so.json_, regex=so.regex, choice=so.choice,
            grammar=so.grammar, json_object=bool(so.json_object),
            disable_any_whitespace=so.disable_any_whitespace)))
    guided = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
              "guided_grammar": "grammar"}
    for name, kind in guided.items():
        if getattr(req, name) is not None:
            found.append((name, _params(name, **{kind: getattr(req, name)})))
    if req.guided_decoding_backend not in BACKENDS:
        raise InvalidRequestError("guided_decoding_backend: fuselm's only backend is xgrammar",
                                  param="guided_decoding_backend")
    if len(found) > 1:
        raise InvalidRequestError(
            f"send one structured-output constraint; got {', '.join(n for n, _ in found)}",
            param=found[1][0])
    return found[0][1] if found else None


def _params(param: str, **kwargs: Any) -> StructuredOutputsParams:
    """StructuredOutputsParams whose errors name the request field ``param`` when the
    constraint's own name is not a request field."""
    try:
        return StructuredOutputsParams(**kwargs)
    except InvalidRequestError as exc:
        raise InvalidRequestError(str(exc), param=param) from None


class ToolStreamer(Protocol):
    """Per-choice streaming state of a tool parser or a forced choice."""

    def feed(self, delta: str) -> StreamDelta:
        """What a text delta adds."""
        ...

    def finish(self) -> StreamDelta:
        """What was held back, at the end."""
        ...


@dataclass
class ToolPlan:
    """How a chat request's tools are used: ``template_tools`` go to the chat template;
    ``constraint`` forces the call (required, named); ``mode`` says how output is read."""

    mode: Literal["none", "auto", "required", "named"]
    template_tools: list[dict[str, Any]]
    constraint: StructuredOutputsParams | None = None
    function_name: str | None = None
    parser_name: str | None = None
    parallel: bool = True

    def extract(self, text: str) -> ExtractedToolCalls:
        """The calls and content of a finished choice's text."""
        if self.mode == "named":
            got = extract_named(self.function_name or "", text)
        elif self.mode == "required":
            got = extract_required(text)
        elif self.mode == "auto" and self.parser_name is not None:
            got = get_tool_parser(self.parser_name).extract(text)
        else:
            return ExtractedToolCalls([], text)
        if not self.parallel:
            got.tool_calls = got.tool_calls[:1]
        return got

    def streamer(self) -> ToolStreamer | None:
        """Per-choice streaming state, or None when the text streams as plain content."""
        if self.mode == "named":
            return NamedStreamer(self.function_name or "")
        if self.mode == "required":
            return RequiredStreamer()
        if self.mode == "auto" and self.parser_name is not None:
            return get_tool_parser(self.parser_name).streamer()
        return None

    def finish_reason(self, called: bool, engine_reason: str | None) -> str | None:
        """OpenAI's: ``tool_calls`` when the model chose to call (auto, required); a named
        choice keeps the engine's reason, as OpenAI's forced calls do."""
        if called and self.mode in ("auto", "required") and engine_reason == "stop":
            return "tool_calls"
        return engine_reason


def plan_tools(req: Any, tool_call_parser: str | None) -> ToolPlan | None:
    """The request's ToolPlan, or None without tools; ``tool_call_parser``: the server's
    ``--tool-call-parser`` when ``--enable-auto-tool-choice`` is on, else None."""
    tools = _parse(TypeAdapter(list[ChatTool] | None), req.tools, "tools")
    choice = _parse(TypeAdapter(ToolChoice | None), req.tool_choice, "tool_choice")
    if not tools:
        if choice not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        return None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tool function names must be unique", param="tools")
    template_tools = [t.model_dump(exclude_none=True) for t in tools]
    parallel = req.parallel_tool_calls is not False
    choice = "auto" if choice is None else choice
    if choice == "none":
        return ToolPlan("none", template_tools)
    if choice == "auto":
        if tool_call_parser is None:
            raise InvalidRequestError(
                '"auto" tool choice requires the server to be started with '
                "--enable-auto-tool-choice and --tool-call-parser", param="tool_choice")
        return ToolPlan("auto", template_tools, parser_name=tool_call_parser, parallel=parallel)
    functions = [t.function.model_dump(exclude_none=True) for t in tools]
    if choice == "required":
        schema = required_schema(functions)
        if not parallel:
            schema["maxItems"] = 1
        return ToolPlan("required", template_tools, StructuredOutputsParams(json=schema),
                        parallel=parallel)
    named = next((f for f in functions if f["name"] == choice.function.name), None)
    if named is None:
        raise InvalidRequestError(f"tool_choice names {choice.function.name!r}, which is not "
                                  "one of the tools", param="tool_choice")
    return ToolPlan("named", template_tools,
                    StructuredOutputsParams(json=parameters_schema(named)),
                    function_name=named["name"])


def chat_constraint(req: Any, plan: ToolPlan | None) -> StructuredOutputsParams | None:
    """The constraint of a chat request: a forced tool call's, or its own (not both)."""
    own = structured_outputs_of(req)
    forced = plan.constraint if plan is not None else None
    if own is not None and forced is not None:
        raise InvalidRequestError(
            "a required or named tool_choice is enforced with a constraint of its own; send "
            "no response_format, structured_outputs or guided_* with it", param="tool_choice")
    return forced or own


def template_messages(messages: list[Any]) -> list[Any]:
    """``messages`` with each assistant tool call's ``arguments`` JSON text parsed into an
    object, as chat templates (and vLLM) expect; other messages unchanged."""
    out = []
    for message in messages:
        calls = getattr(message, "tool_calls", None)
        if message.role != "assistant" or not isinstance(calls, list):
            out.append(message)
            continue
        parsed = []
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise InvalidRequestError("an assistant tool call needs function.name",
                                          param="messages")
            args = function.get("arguments")
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except ValueError:
                    raise InvalidRequestError("a tool call's arguments must be JSON",
                                              param="messages") from None
            parsed.append({**call, "function": {**function, "arguments": args}})
        out.append(message.model_copy(update={"tool_calls": parsed}))
    return out


def tool_calls_json(calls: list[Any]) -> list[dict[str, Any]]:
    """OpenAI's ``message.tool_calls`` of parsed calls."""
    return [{"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def delta_tool_calls_json(deltas: list[Any]) -> list[dict[str, Any]]:
    """OpenAI's streamed ``delta.tool_calls``: id, type and name in a call's first piece."""
    out = []
    for d in deltas:
        if d.id is not None:
            out.append({"index": d.index, "id": d.id, "type": "function",
                        "function": {"name": d.name, "arguments": d.arguments}})
        else:
            out.append({"index": d.index, "function": {"arguments": d.arguments}})
    return out


class ChoiceToolStreams:
    """Per-choice tool-call streaming of one chat request (``plan``'s streamer per index)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.streamers: dict[int, ToolStreamer | None] = {}
        self.called: set[int] = set()

    def delta(self, index: int, text: str, finished: bool) -> tuple[str, list[dict[str, Any]]]:
        """The content text and ``tool_calls`` pieces that ``text`` adds to choice ``index``."""
        if index not in self.streamers:
            self.streamers[index] = self.plan.streamer()
        streamer = self.streamers[index]
        if streamer is None:
            return text, []
        out = streamer.feed(text)
        if finished:
            out.extend(streamer.finish())
        if not self.plan.parallel:
            out.tool_calls = [d for d in out.tool_calls if d.index == 0]
        if out.tool_calls:
            self.called.add(index)
        return out.content, delta_tool_calls_json(out.tool_calls)


def template_tools(tools: Any) -> list[dict[str, Any]]:
    """A request's ``tools`` validated, as the chat template sees them."""
    parsed = _parse(TypeAdapter(list[ChatTool]), tools, "tools")
    return [t.model_dump(exclude_none=True) for t in parsed]
