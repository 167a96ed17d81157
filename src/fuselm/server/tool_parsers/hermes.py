"""The Hermes / Qwen format: each call is ``<tool_call>{"name": ..., "arguments": {...}}
</tool_call>``; text before the first call is the message's content."""

from __future__ import annotations

import json
import re

from fuselm.server.tool_parsers.base import (
    CallObjectStream,
    ExtractedToolCalls,
    StreamDelta,
    ToolCall,
    call_from_object,
)

START, END = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


class HermesToolParser:
    """``--tool-call-parser hermes`` (vLLM's name; Qwen 2.5/3 and Hermes models)."""

    name = "hermes"

    def extract(self, text: str) -> ExtractedToolCalls:
        """Calls and content of a complete message; a block that is not a valid call leaves
        the whole text as content (vLLM's behaviour)."""
        if START not in text:
            return ExtractedToolCalls([], text)
        calls: list[ToolCall] = []
        for body in _BLOCK.findall(text):
            try:
                call = call_from_object(json.loads(body))
            except ValueError:
                call = None
            if call is None:
                return ExtractedToolCalls([], text)
            calls.append(call)
        content = text[:text.index(START)]
        return ExtractedToolCalls(calls, content if content.strip() else None)

    def streamer(self) -> HermesStreamer:
        """Per-choice streaming state."""
        return HermesStreamer()


class HermesStreamer:
    """Turns text deltas into content (held back while it could be the start of
    ``<tool_call>``; none after the first call) and tool-call pieces."""

    def __init__(self) -> None:
        self.text = ""
        self.pos = 0  # text before this is sent as content or read as part of a call
        self.state = "content"  # content | brace (after <tool_call>) | call | end_tag
        self.call: CallObjectStream | None = None
        self.num_calls = 0
        self.tag_start = 0  # where the open <tool_call> began

    def feed(self, delta: str) -> StreamDelta:
        """The content and pieces that ``delta`` completes."""
        self.text += delta
        out = StreamDelta()
        while self._step(out):
            pass
        return out

    def _step(self, out: StreamDelta) -> bool:
        """Advances the state machine once; False when it needs more text."""
        text = self.text
        if self.state == "content":
            found = text.find(START, self.pos)
            upto = found if found >= 0 else len(text) - _partial_suffix(text, START, self.pos)
            if self.num_calls == 0:  # as in extract: text after the first call is dropped
                out.content += text[self.pos:upto]
            self.pos = upto
            if found < 0:
                return False
            self.pos, self.state, self.tag_start = found + len(START), "brace", found
        if self.state == "brace":
            brace = text.find("{", self.pos)
            if brace < 0:
                return False
            self.call, self.state = CallObjectStream(self.num_calls, brace), "call"
        if self.state == "call" and self.call is not None:
            out.tool_calls.extend(self.call.update(text))
            if self.call.end is None:
                return False
            self.pos, self.state = self.call.end, "end_tag"
            self.num_calls += 1
        close = text.find(END, self.pos)
        if close < 0:
            return False
        self.pos, self.state, self.call = close + len(END), "content", None
        return True

    def finish(self) -> StreamDelta:
        """Content still held back at the end of the message; a first block that never
        became a call (no name) is content too, as in ``extract``."""
        out = StreamDelta()
        if self.num_calls == 0 and self.state == "content":
            out.content = self.text[self.pos:]
            self.pos = len(self.text)
        elif self.num_calls == 0 and (self.call is None or self.call.name is None):
            out.content = self.text[self.tag_start:]
        return out


def _partial_suffix(text: str, tag: str, start: int) -> int:
    """Length of the longest end of ``text[start:]`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text) - start), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
