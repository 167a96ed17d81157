"""What every tool-call parser shares: the parsed calls, the streamed deltas (OpenAI's
``tool_calls`` delta shape, without pydantic), and an incremental reader of one JSON object
``{"name": ..., "arguments": {...}}`` that streams its arguments text as it grows."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

_WHITESPACE = " \t\n\r"


def new_call_id() -> str:
    """A tool call id in vLLM's form."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass
class ToolCall:
    """One complete call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=new_call_id)


@dataclass
class ExtractedToolCalls:
    """A whole message split into calls and the text around them (None: no text)."""

    tool_calls: list[ToolCall]
    content: str | None

    @property
    def tools_called(self) -> bool:
        """True when the message holds at least one call."""
        return bool(self.tool_calls)


@dataclass
class ToolCallDelta:
    """One streamed piece of call ``index``: the first carries ``id`` and ``name``, later ones
    the next piece of the arguments text (their concatenation is the arguments JSON)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class StreamDelta:
    """What one streamed text delta adds: content text and tool-call pieces."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def extend(self, other: StreamDelta) -> None:
        """Appends ``other``'s content and pieces."""
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)


def json_value_end(text: str, start: int) -> int | None:
    """Index just past the JSON value starting at ``text[start]`` (no leading whitespace), or
    None while the value is incomplete. A bare scalar counts as complete only once a delimiter
    follows it."""
    if start >= len(text):
        return None
    first = text[start]
    if first == '"':
        return _string_end(text, start)
    if first in "{[":
        depth, i = 0, start
        while i < len(text):
            ch = text[i]
            if ch == '"':
                end = _string_end(text, i)
                if end is None:
                    return None
                i = end
                continue
            if ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    i = start
    while i < len(text) and text[i] not in ",}]" + _WHITESPACE:
        i += 1
    return i if i < len(text) else None


def _string_end(text: str, start: int) -> int | None:
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i + 1
        i += 1
    return None


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


@dataclass
class ObjectScan:
    """The top-level members of a (possibly incomplete) JSON object: ``members`` maps a key to
    ``(value start, value end or None)``; ``end`` is set once the object is closed."""

    members: dict[str, tuple[int, int | None]]
    end: int | None
    malformed: bool = False


def scan_object(text: str, start: int) -> ObjectScan:
    """Reads the members of the JSON object whose ``{`` is ``text[start]`` as far as the text
    goes."""
    members: dict[str, tuple[int, int | None]] = {}
    i = _skip_ws(text, start + 1)
    while i < len(text):
        if text[i] == "}":
            return ObjectScan(members, i + 1)
        if text[i] != '"':
            return ObjectScan(members, None, malformed=True)
        key_end = _string_end(text, i)
        if key_end is None:
            break
        key = json.loads(text[i:key_end])
        i = _skip_ws(text, key_end)
        if i >= len(text):
            break
        if text[i] != ":":
            return ObjectScan(members, None, malformed=True)
        value_start = _skip_ws(text, i + 1)
        if value_start >= len(text):
            break
        value_end = json_value_end(text, value_start)
        members[key] = (value_start, value_end)
        if value_end is None:
            break
        i = _skip_ws(text, value_end)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
    return ObjectScan(members, None)


class CallObjectStream:
    """Streams one call written as a JSON object with a name key and an arguments key (e.g.
    ``{"name": "f", "arguments": {...}}``): ``update(text)`` takes the whole text so far
    (the object starts at ``start``) and returns the new pieces. Arguments stream only after
    the name is known; an object or array value streams as it grows, a scalar when whole."""

    def __init__(self, index: int, start: int, name_key: str = "name",
                 argument_keys: tuple[str, ...] = ("arguments", "parameters")) -> None:
        self.index, self.start = index, start
        self.name_key, self.argument_keys = name_key, argument_keys
        self.call_id = new_call_id()
        self.name: str | None = None
        self.num_sent = 0  # characters of the arguments text already sent
        self.end: int | None = None  # past the object's closing brace, once seen
        self.malformed = False

    def update(self, text: str) -> list[ToolCallDelta]:
        """The pieces that ``text`` (a longer version of the last text) adds."""
        scan = scan_object(text, self.start)
        self.malformed = scan.malformed
        deltas: list[ToolCallDelta] = []
        if self.name is None:
            span = scan.members.get(self.name_key)
            if span is None or span[1] is None:
                return deltas
            name = json.loads(text[span[0]:span[1]])
            if not isinstance(name, str):
                self.malformed = True
                return deltas
            self.name = name
            deltas.append(ToolCallDelta(self.index, id=self.call_id, name=name))
        span = next((scan.members[k] for k in self.argument_keys if k in scan.members), None)
        if span is not None:
            value_start, value_end = span
            if value_end is None and text[value_start] not in "{[":
                upto = value_start  # an incomplete scalar could still change
            else:
                upto = len(text) if value_end is None else value_end
            piece = text[value_start + self.num_sent:upto]
            if piece:
                self.num_sent += len(piece)
                deltas.append(ToolCallDelta(self.index, arguments=piece))
        elif scan.end is not None and self.num_sent == 0:
            self.num_sent = 2
            deltas.append(ToolCallDelta(self.index, arguments="{}"))
        self.end = scan.end
        return deltas


def call_from_object(obj: Any) -> ToolCall | None:
    """A call from a parsed ``{"name": str, "arguments" | "parameters": ...}``, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))
