"""Tools and tool turns in the chat template: fuselm's rendering equals transformers' own
``apply_chat_template`` for a Hermes-style template that lists the tools, an assistant turn
with tool calls and a ``role: tool`` result; a template that cannot render a turn is a 400."""

from __future__ import annotations

import pytest
import transformers

from fuselm.errors import InvalidRequestError
from fuselm.tokenizer import Tokenizer

TEMPLATE = """{%- if tools %}<|im_start|>system
You may call these functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Answer with <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city, é",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
MESSAGES = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
]


@pytest.fixture(scope="module")
def tokenizers(default_gguf_path):
    base = Tokenizer.from_gguf(default_gguf_path)
    ours = Tokenizer(base.tokenizer, bos_token_id=base.bos_token_id,
                     eos_token_id=base.eos_token_id, chat_template=TEMPLATE)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=base.tokenizer)
    hf.chat_template = TEMPLATE
    return ours, hf


@pytest.mark.parametrize("tools", [TOOLS, None])
def test_tools_and_tool_turns_render_as_transformers_does(tokenizers, tools):
    ours, hf = tokenizers
    got = ours.apply_chat_template(MESSAGES, tools=tools)
    expected = hf.apply_chat_template(MESSAGES, tools=tools, tokenize=False,
                                      add_generation_prompt=True)
    assert got == expected
    assert ('<tools>' in got) == (tools is not None)
    assert "<tool_response>\n{\"temp\": 21}\n</tool_response>" in got


def test_a_turn_the_template_cannot_render_is_an_invalid_request(default_gguf_path):
    tok = Tokenizer.from_gguf(default_gguf_path)  # its template adds strings to content
    with pytest.raises(InvalidRequestError) as info:
        tok.apply_chat_template([{"role": "assistant", "content": None}])
    assert info.value.param == "messages"
