"""LangChain against the real server (default model, CPU), as issue #20's users run it:
``ChatOpenAI(...).bind_tools(...)`` returns a tool call whose arguments validate against the
tool's schema, and ``with_structured_output(Model)`` returns a parsed object (OpenAI's
``json_schema`` response format under the hood)."""

from __future__ import annotations

import jsonschema
import pytest

pytest.importorskip("langchain_core", reason="the langchain test extra is not installed")
pytest.importorskip("langchain_openai", reason="the langchain test extra is not installed")

from langchain_core.tools import tool  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402
from server_harness import LiveServer  # noqa: E402

pytestmark = pytest.mark.timeout(300)


class City(BaseModel):
    """A city and how many people live there."""

    name: str = Field(max_length=12)
    population_millions: int = Field(ge=0, le=40)


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def _llm(server: LiveServer, max_tokens: int) -> ChatOpenAI:
    return ChatOpenAI(base_url=server.url + "/v1", api_key="none", model="smollm2",
                      temperature=0, max_tokens=max_tokens, max_retries=0, timeout=240)


def test_bind_tools_returns_a_valid_call(real_server: LiveServer) -> None:
    llm = _llm(real_server, 40).bind_tools([get_weather], tool_choice="get_weather")
    message = llm.invoke("What is the weather in Paris?")
    (call,) = message.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], get_weather.args_schema.model_json_schema())


def test_with_structured_output_returns_a_parsed_object(real_server: LiveServer) -> None:
    city = _llm(real_server, 40).with_structured_output(City).invoke(
        "Name a big city as JSON.")
    assert isinstance(city, City)
    assert 0 <= city.population_millions <= 40 and len(city.name) <= 12
