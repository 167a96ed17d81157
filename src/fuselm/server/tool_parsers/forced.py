"""``tool_choice: "required"`` and a named function, enforced with structured generation as
vLLM does: the output is a JSON array of ``{"name", "parameters"}`` objects (required) or the
named function's arguments (named), so it is always a valid call."""

from __future__ import annotations

import json
from typing import Any

from fuselm.server.tool_parsers.base import (
    CallObjectStream,
    ExtractedToolCalls,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
    call_from_object,
    new_call_id,
)

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def parameters_schema(function: dict[str, Any]) -> dict[str, Any]:
    """A function's parameters schema (an empty object when it declares none)."""
    return function.get("parameters") or EMPTY_PARAMETERS


def required_schema(functions: list[dict[str, Any]]) -> dict[str, Any]:
    """The schema of one or more calls of ``functions`` (OpenAI function objects)."""
    return {
        "type": "array",
        "minItems": 1,
        "items": {"anyOf": [{
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [f["name"]]},
                           "parameters": parameters_schema(f)},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        } for f in functions]},
    }


def extract_required(text: str) -> ExtractedToolCalls:
    """The calls of a ``required`` output; the text as content if it is not one (cut short
    by max_tokens)."""
    try:
        items = json.loads(text)
    except ValueError:
        return ExtractedToolCalls([], text)
    calls = [call_from_object(item) for item in items] if isinstance(items, list) else [None]
    if not calls or any(c is None for c in calls):
        return ExtractedToolCalls([], text)
    return ExtractedToolCalls([c for c in calls if c is not None], None)


def extract_named(name: str, text: str) -> ExtractedToolCalls:
    """The call of a named-function output: the text is its arguments."""
    return ExtractedToolCalls([ToolCall(name, text)], None)


class RequiredStreamer:
    """Streams the calls of a ``required`` output (a JSON array of call objects)."""

    def __init__(self) -> None:
        self.text = ""
        self.call: CallObjectStream | None = None
        self.num_calls = 0

    def feed(self, delta: str) -> StreamDelta:
        """The pieces that ``delta`` completes."""
        self.text += delta
        out = StreamDelta()
        while True:
            if self.call is None or self.call.end is not None:
                start = self._next_object()
                if start is None:
                    return out
                if self.call is not None:
                    self.num_calls += 1
                self.call = CallObjectStream(self.num_calls, start, "name", ("parameters",))
            out.tool_calls.extend(self.call.update(self.text))
            if self.call.end is None:
                return out

    def _next_object(self) -> int | None:
        """The ``{`` of the next array item, or None while there is none yet."""
        after = 0 if self.call is None else self.call.end or 0
        brace = self.text.find("{", after)
        return brace if brace >= 0 else None

    def finish(self) -> StreamDelta:
        """Nothing is held back."""
        return StreamDelta()


class NamedStreamer:
    """Streams a named-function output: the name first, then the text as its arguments."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = False

    def feed(self, delta: str) -> StreamDelta:
        """The pieces that ``delta`` completes."""
        out = StreamDelta()
        if not self.started:
            self.started = True
            out.tool_calls.append(ToolCallDelta(0, id=new_call_id(), name=self.name))
        if delta:
            out.tool_calls.append(ToolCallDelta(0, arguments=delta))
        return out

    def finish(self) -> StreamDelta:
        """The call's header if no text came at all."""
        return self.feed("") if not self.started else StreamDelta()
