"""Tool-call parsers (``--tool-call-parser NAME``) and the forced tool choices.

A parser has ``extract(text) -> ExtractedToolCalls`` for a whole message and ``streamer()``,
a per-choice object whose ``feed(text_delta)`` and ``finish()`` return ``StreamDelta``s
(content text and OpenAI-shaped ``tool_calls`` pieces).
"""

from __future__ import annotations

from fuselm.server.tool_parsers.base import (
    ExtractedToolCalls,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
)
from fuselm.server.tool_parsers.hermes import HermesToolParser
from fuselm.server.tool_parsers.llama3_json import Llama3JsonToolParser

TOOL_PARSERS = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}
"""Parser names as vLLM spells them."""


def get_tool_parser(name: str) -> HermesToolParser | Llama3JsonToolParser:
    """The parser called ``name``; ValueError listing the known names."""
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; known: {', '.join(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()


__all__ = ["ExtractedToolCalls", "StreamDelta", "TOOL_PARSERS", "ToolCall", "ToolCallDelta",
           "get_tool_parser"]
