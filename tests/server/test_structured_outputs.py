"""Structured outputs through the real server (default model, CPU) and the official `openai`
client: JSON for `json_object` and a `json_schema` (checked with `jsonschema`) on 20 prompts
sent at once, regex and choice constraints always matched (chat, completions, streamed, n > 1,
sampled), and bad constraints refused with a 400 naming the field."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import jsonschema
import openai
import pytest
from server_harness import CHAT, CMPL, LiveServer, assert_error

pytestmark = pytest.mark.timeout(300)

NAME = "smollm2"
TOPICS = ["a cat", "a city", "a book", "a car", "a planet", "a song", "a movie", "a fruit",
          "a tree", "a river", "a country", "a dog", "a computer", "a phone", "a chair",
          "a painter", "a mountain", "a bird", "a game", "a color"]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "likes": {"enum": ["tea", "coffee", "water"]}},
    "required": ["name", "age", "likes"], "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2,4}"


def _client(server: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                              timeout=240)


def _chat_all(server: LiveServer, prompts: list[str], **kwargs: Any) -> list[Any]:
    async def run() -> list[Any]:
        client = _client(server)
        return await asyncio.gather(*(client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": p}], **kwargs) for p in prompts))

    return asyncio.run(run())


def test_json_object_is_json_for_20_prompts(real_server: LiveServer) -> None:
    prompts = [f'Name {t}. Answer as JSON: {{"name": "<one word>"}}' for t in TOPICS]
    for r in _chat_all(real_server, prompts, max_tokens=40, temperature=0,
                       response_format={"type": "json_object"}):
        choice = r.choices[0]
        assert isinstance(json.loads(choice.message.content), dict), choice.message.content
        assert choice.finish_reason == "stop"


def test_json_schema_is_valid_for_20_prompts(real_server: LiveServer) -> None:
    prompts = [f"Describe {t} as a JSON object." for t in TOPICS]
    fmt = {"type": "json_schema",
           "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    for r in _chat_all(real_server, prompts, max_tokens=60, temperature=0, response_format=fmt):
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_regex_and_choice_always_match(real_server: LiveServer) -> None:
    async def run() -> None:
        client = _client(real_server)
        chat = await client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "Give me a code."}],
            max_tokens=12, temperature=1.0, seed=3, n=3,
            extra_body={"structured_outputs": {"regex": REGEX}})
        assert all(re.fullmatch(REGEX, c.message.content) for c in chat.choices), chat
        cmpl = await client.completions.create(
            model=NAME, prompt=["Is the sky blue?", "Is fire cold?"], max_tokens=5,
            temperature=0.7, seed=1, extra_body={"guided_choice": ["yes", "no", "unsure"]})
        assert [c.text in ("yes", "no", "unsure") for c in cmpl.choices] == [True, True]
        stream = await client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "A code?"}], max_tokens=12,
            temperature=0.9, seed=5, stream=True, extra_body={"guided_regex": REGEX})
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert re.fullmatch(REGEX, text), text
        grammar = await client.completions.create(
            model=NAME, prompt="Laugh:", max_tokens=10, temperature=0.8, seed=2,
            extra_body={"guided_grammar": 'root ::= ("ha" | "ho")+ "!"'})
        assert re.fullmatch(r"(ha|ho)+!", grammar.choices[0].text), grammar.choices[0].text

    asyncio.run(run())


@pytest.mark.parametrize("route, extra, param", [
    (CHAT, {"structured_outputs": {"regex": "[a-"}}, "regex"),
    (CMPL, {"guided_json": {"type": "nonsense"}}, "json"),
    (CHAT, {"guided_grammar": "root ::= "}, "grammar"),
    (CHAT, {"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    (CHAT, {"response_format": {"type": "xml"}}, "response_format"),
    (CMPL, {"structured_outputs": {"regex": "a", "whitespace_pattern": " "}},
     "structured_outputs"),
    (CHAT, {"structured_outputs": {"choice": []}}, "structured_outputs"),
    (CHAT, {"guided_decoding_backend": "outlines", "guided_regex": "a"},
     "guided_decoding_backend"),
    (CHAT, {"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
])
def test_bad_constraints_are_a_400_naming_the_field(real_server: LiveServer, route: str,
                                                   extra: dict[str, Any], param: str) -> None:
    base = ({"prompt": "hi"} if route == CMPL
            else {"messages": [{"role": "user", "content": "hi"}]})
    with real_server.client() as client:
        r = client.post(route, json={**base, "max_tokens": 3, **extra})
    error = assert_error(r, 400, param=param)
    assert "Traceback" not in error["message"] and "/project/" not in error["message"]


def test_a_new_schema_compiles_off_the_step_thread(real_server: LiveServer,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    compiler = real_server.engine.engine.grammars
    seen: list[tuple[str, bool]] = []
    compile_fn = compiler.compile

    def recording(params: Any) -> Any:
        key = json.dumps(params.json, sort_keys=True)
        seen.append((threading.current_thread().name, key in {json.dumps(g, sort_keys=True)
                                                               for g in cached()}))
        return compile_fn(params)

    def cached() -> list[Any]:
        return [json.loads(k[1]) for k in compiler._cache if k[0] == "json"]

    monkeypatch.setattr(compiler, "compile", recording)
    schema = {"type": "object", "properties": {"fresh": {"type": "boolean"}},
              "required": ["fresh"], "additionalProperties": False}
    with real_server.client() as client:
        r = client.post(CHAT, json={"messages": [{"role": "user", "content": "ok?"}],
                                    "max_tokens": 12, "temperature": 0,
                                    "structured_outputs": {"json": schema,
                                                           "disable_any_whitespace": True}})
    assert r.status_code == 200 and json.loads(r.json()["choices"][0]["message"]["content"])
    first_thread, was_cached = seen[0]
    assert first_thread != "fuselm-step" and not was_cached
    assert all(cached_ for name, cached_ in seen if name == "fuselm-step")
