"""Llama 3.1 / 3.2's JSON tool calls: the message is ``{"name": ..., "parameters": {...}}``
(optionally after ``<|python_tag|>``), several separated by ``;``; any other message is
content."""

from __future__ import annotations

import json

from fuselm.server.tool_parsers.base import (
    CallObjectStream,
    ExtractedToolCalls,
    StreamDelta,
    call_from_object,
)

PYTHON_TAG = "<|python_tag|>"


def _body_start(text: str) -> int | None:
    """Where the first call's ``{`` is, -1 when the message is plain content, None while it
    cannot be told yet (only whitespace or a prefix of the python tag so far)."""
    stripped = text.lstrip()
    offset = len(text) - len(stripped)
    if stripped.startswith(PYTHON_TAG):
        rest = stripped[len(PYTHON_TAG):]
        after = rest.lstrip()
        if not after:
            return None
        return offset + len(PYTHON_TAG) + (len(rest) - len(after)) if after[0] == "{" else -1
    if not stripped or PYTHON_TAG.startswith(stripped):
        return None
    return offset if stripped[0] == "{" else -1


class Llama3JsonToolParser:
    """``--tool-call-parser llama3_json`` (vLLM's name)."""

    name = "llama3_json"

    def extract(self, text: str) -> ExtractedToolCalls:
        """Calls of a complete message; a message that is not all calls is content."""
        start = _body_start(text)
        if start is None or start < 0:
            return ExtractedToolCalls([], text)
        decoder, calls, i = json.JSONDecoder(), [], start
        while i < len(text):
            try:
                obj, i = decoder.raw_decode(text, i)
            except ValueError:
                return ExtractedToolCalls([], text)
            call = call_from_object(obj)
            if call is None:
                return ExtractedToolCalls([], text)
            calls.append(call)
            i = _next_call(text, i)
            if i is None:
                return ExtractedToolCalls([], text)
        return ExtractedToolCalls(calls, None)

    def streamer(self) -> Llama3JsonStreamer:
        """Per-choice streaming state."""
        return Llama3JsonStreamer()


def _next_call(text: str, i: int) -> int | None:
    """Index of the next call's ``{`` after a call ending at ``i`` (len(text) at the end);
    None when something else follows."""
    rest = text[i:].lstrip()
    if not rest:
        return len(text)
    if rest[0] != ";":
        return None
    after = rest[1:].lstrip()
    if not after:
        return len(text)
    return len(text) - len(after) if after[0] == "{" else None


class Llama3JsonStreamer:
    """Content mode (everything is text) or call mode, decided by the first characters."""

    def __init__(self) -> None:
        self.text = ""
        self.mode: str | None = None  # None (undecided) | content | calls
        self.sent = 0
        self.call: CallObjectStream | None = None
        self.num_calls = 0

    def feed(self, delta: str) -> StreamDelta:
        """The content and pieces that ``delta`` completes."""
        self.text += delta
        out = StreamDelta()
        if self.mode is None:
            start = _body_start(self.text)
            if start is None:
                return out
            self.mode = "content" if start < 0 else "calls"
            if start >= 0:
                self.call = CallObjectStream(0, start)
        if self.mode == "content":
            out.content, self.sent = self.text[self.sent:], len(self.text)
            return out
        while self.call is not None:
            out.tool_calls.extend(self.call.update(self.text))
            if self.call.end is None:
                break
            nxt = self._next_start(self.call.end)
            if nxt is None:
                break
            self.num_calls += 1
            self.call = CallObjectStream(self.num_calls, nxt)
        return out

    def _next_start(self, end: int) -> int | None:
        rest = self.text[end:].lstrip()
        if not rest.startswith(";"):
            return None
        brace = self.text.find("{", end)
        return brace if brace >= 0 else None

    def finish(self) -> StreamDelta:
        """Text held back while the mode was undecided, or a message that looked like a call
        but never named a function (JSON content)."""
        unnamed = self.num_calls == 0 and self.call is not None and self.call.name is None
        if self.mode is None or (self.mode == "calls" and unnamed):
            return StreamDelta(content=self.text)
        return StreamDelta()
