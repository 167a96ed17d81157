"""Tool-call parsers on messages built from random calls with ``json.dumps`` (the reference):
complete text and the same text streamed in random pieces give back the calls and the
content; OpenAI's delta shape (id and name first, then arguments pieces) holds."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from fuselm.server.tool_parsers import StreamDelta, get_tool_parser
from fuselm.server.tool_parsers.forced import (
    NamedStreamer,
    RequiredStreamer,
    extract_named,
    extract_required,
)

TRICKY = ['a"b', "{x}", "</tool_call>", "\\", "é 漢字", "new\nline", "[1, {2}]", ";", ""]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(6 if depth < 3 else 4)
    if kind == 0:
        return rng.choice(TRICKY) + str(rng.randrange(100))
    if kind == 1:
        return rng.choice([rng.randrange(-1000, 1000), rng.random() * 100])
    if kind == 2:
        return rng.choice([True, False, None])
    if kind == 3:
        return rng.choice(TRICKY)
    if kind == 4:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{i}{rng.choice(TRICKY)}": random_value(rng, depth + 1)
            for i in range(rng.randrange(4))}


def random_calls(rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    return [(f"fn_{rng.randrange(1000)}", {f"p{i}": random_value(rng) for i in
                                           range(rng.randrange(4))})
            for _ in range(rng.randrange(1, 4))]


def pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(1, 40))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def stream(streamer: Any, chunks: list[str]) -> tuple[str, list[tuple[str, Any]], set[str]]:
    """Content, (name, parsed arguments) per call, and the ids, from the streamed deltas."""
    total = StreamDelta()
    for chunk in chunks:
        total.extend(streamer.feed(chunk))
    total.extend(streamer.finish())
    calls: dict[int, list[Any]] = {}
    ids = set()
    for d in total.tool_calls:
        if d.index not in calls:
            assert d.id and d.name, "the first piece of a call carries its id and name"
            calls[d.index] = [d.name, ""]
            ids.add(d.id)
        else:
            assert d.id is None and d.name is None
        calls[d.index][1] += d.arguments
    assert sorted(calls) == list(range(len(calls)))
    return total.content, [(n, json.loads(a)) for n, a in calls.values()], ids


def hermes_text(content: str, calls, rng: random.Random, indent: int | None) -> str:
    blocks = [f"<tool_call>\n{json.dumps({'name': n, 'arguments': a}, indent=indent)}\n"
              "</tool_call>" for n, a in calls]
    return content + rng.choice(["\n", ""]).join(blocks)


@pytest.mark.parametrize("seed", range(12))
def test_hermes_complete_and_streamed(seed):
    rng = random.Random(seed)
    calls = random_calls(rng)
    content = rng.choice(["", "Let me check. ", "I'll call <tool that.\n"])
    text = hermes_text(content, calls, rng, rng.choice([None, 2]))
    parser = get_tool_parser("hermes")
    got = parser.extract(text)
    assert [(c.name, json.loads(c.arguments)) for c in got.tool_calls] == calls
    assert got.content == (content if content.strip() else None)
    assert len({c.id for c in got.tool_calls}) == len(calls)
    streamed_content, streamed_calls, ids = stream(parser.streamer(), pieces(text, rng))
    assert streamed_calls == calls
    assert streamed_content == content
    assert len(ids) == len(calls)


@pytest.mark.parametrize("seed", range(12))
def test_llama3_json_complete_and_streamed(seed):
    rng = random.Random(100 + seed)
    calls = random_calls(rng)
    key = rng.choice(["parameters", "arguments"])
    text = rng.choice(["", "<|python_tag|>", " "]) + "; ".join(
        json.dumps({"name": n, key: a}) for n, a in calls)
    parser = get_tool_parser("llama3_json")
    got = parser.extract(text)
    assert [(c.name, json.loads(c.arguments)) for c in got.tool_calls] == calls
    assert got.content is None
    content, streamed_calls, _ = stream(parser.streamer(), pieces(text, rng))
    assert streamed_calls == calls and content == ""


@pytest.mark.parametrize("name", ["hermes", "llama3_json"])
@pytest.mark.parametrize("text", ["Just text, no call.", "The answer is {not a call}",
                                  "<|python_tag|> print(1)", ""])
def test_plain_text_is_content(name, text):
    parser = get_tool_parser(name)
    got = parser.extract(text)
    assert not got.tools_called and got.content == text
    rng = random.Random(len(text))
    content, calls, _ = stream(parser.streamer(), pieces(text, rng) if len(text) > 1 else [text])
    assert calls == [] and content == text


def test_hermes_malformed_block_leaves_the_text_as_content():
    text = 'ok <tool_call>{"name": "f", "arguments": {"a": </tool_call>'
    got = get_tool_parser("hermes").extract(text)
    assert not got.tools_called and got.content == text


def test_unknown_parser_names_the_known_ones():
    with pytest.raises(ValueError, match="hermes, llama3_json"):
        get_tool_parser("mistral")


@pytest.mark.parametrize("seed", range(6))
def test_required_output_complete_and_streamed(seed):
    rng = random.Random(200 + seed)
    calls = random_calls(rng)
    text = json.dumps([{"name": n, "parameters": a} for n, a in calls],
                      indent=rng.choice([None, 2]))
    got = extract_required(text)
    assert [(c.name, json.loads(c.arguments)) for c in got.tool_calls] == calls
    content, streamed, _ = stream(RequiredStreamer(), pieces(text, rng))
    assert streamed == calls and content == ""
    assert not extract_required(text[:-1]).tools_called  # cut short: content, not a call


def test_named_output_complete_and_streamed():
    rng = random.Random(7)
    args = {"city": "Paris", "days": [1, 2], "x": {"y": "}"}}
    text = json.dumps(args)
    got = extract_named("weather", text)
    assert got.tool_calls[0].name == "weather" and json.loads(got.tool_calls[0].arguments) == args
    content, streamed, _ = stream(NamedStreamer("weather"), pieces(text, rng))
    assert streamed == [("weather", args)] and content == ""


@pytest.mark.parametrize("name, text", [
    ("llama3_json", '{"answer": 42, "why": "because"}'),
    ("hermes", 'Sure. <tool_call>{"arguments": {"a": 1}</tool_call>'),
    ("hermes", "Sure. <tool_call> not json at all"),
])
def test_what_never_becomes_a_call_streams_as_content(name, text):
    parser = get_tool_parser(name)
    assert parser.extract(text).content == text
    content, calls, _ = stream(parser.streamer(), pieces(text, random.Random(3)))
    assert calls == [] and content == text
