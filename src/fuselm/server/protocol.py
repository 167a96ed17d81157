"""OpenAI-compatible request and response schemas (pydantic), plus the KServe v2 generate ones.

Field names, defaults and shapes follow the OpenAI API; the extra sampling fields (`top_k`,
`min_p`, `repetition_penalty`, `stop_token_ids`, `ignore_eos`, ...) follow vLLM. Simple range
limits live in the schema (so that /openapi.json documents them); checks that need the model
(context length, vocabulary) are in `fuselm.server.serving`.
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from fuselm.sampling_params import MAX_LOGPROBS

MAX_N = 16
"""Most choices per prompt (`n`)."""
MAX_PROMPTS = 64
"""Most prompts in one batched completion request."""
MAX_STOP = 16
"""Most stop strings or stop token ids."""
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


_SURROGATE = re.compile("[\ud800-\udfff]")


def has_lone_surrogate(data: Any) -> bool:
    """True if any string (or dict key) in parsed JSON holds a UTF-16 surrogate, which JSON's
    \\uXXXX escapes allow but UTF-8 (the tokenizer, the response) cannot encode."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class OpenAIModel(BaseModel):
    """Base of request schemas: an unknown field is a 400 naming it (a typo such as
    `max_token` must not be silently dropped); NaN, infinities and lone surrogates are
    rejected. What each declared field does is `fuselm.server.contract`'s."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if has_lone_surrogate(data):
            raise ValueError("strings must be valid Unicode (no lone surrogate escapes)")
        return data


# -- errors ------------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""

    error: ErrorInfo


# -- shared pieces -------------------------------------------------------------------------------


class StreamOptions(OpenAIModel):
    include_usage: bool | None = False
    include_obfuscation: bool | None = None
    """Ignored: OpenAI pads streamed chunks against side channels; fuselm sends none."""


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class SamplingFields(OpenAIModel):
    """Sampling fields shared by completions and chat completions."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=1)
    """vLLM: keep only the last this many prompt tokens."""
    request_id: str | None = Field(None, min_length=1, max_length=256)
    """vLLM: names the response (`cmpl-<request_id>`); never an engine request's id."""
    # Declared so that /openapi.json documents them and a 400 names them; see contract.py.
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    logits_processors: list[Any] | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    spaces_between_special_tokens: bool | None = None
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None
    priority: int | None = None
    prompt_embeds: Any = None
    response_format: Any = None
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None

    @field_validator("stop", mode="before")
    @classmethod
    def _at_most_max_stop(cls, value: Any) -> Any:
        # The bound is on the number of strings; a single string may be of any length.
        if isinstance(value, list) and len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        return value


# -- /v1/completions -----------------------------------------------------------------------------

Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    add_special_tokens: bool = True
    """vLLM: add the tokenizer's special tokens (BOS) to text prompts."""


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# -- /v1/chat/completions ------------------------------------------------------------------------


class ContentPart(OpenAIModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessageParam(OpenAIModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(min_length=1)
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageParam] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    echo: bool = False
    """vLLM extension: prepend the last message's content when its role is the assistant's."""
    chat_template_kwargs: dict[str, Any] | None = None
    """vLLM: extra variables for the chat template (e.g. `enable_thinking`)."""
    add_special_tokens: bool = False
    """vLLM: add the tokenizer's special tokens on top of the template's (BOS)."""
    # OpenAI fields without effect here (contract.IGNORED) ...
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    # ... and fields refused when used (contract.NOT_IMPLEMENTED, STRUCTURED_OUTPUT_FIELDS)
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    modalities: list[str] | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    documents: Any = None
    continue_final_message: bool | None = None
    chat_template: str | None = None
    mm_processor_kwargs: Any = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogProbs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str
    """The arguments as JSON text."""


class MessageToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[MessageToolCall] = Field(default_factory=list)


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    """A streamed message delta; fields left None are left out (OpenAI sends `role` once)."""

    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """OpenAI's pieces: ``{index, id, type, function: {name, arguments}}`` first, then
    ``{index, function: {arguments}}`` (`serving_structured.delta_tool_calls_json`)."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


# -- models, tokenize, version -------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "fuselm"
    root: str | None = None
    """The model path it was loaded from (the served name is `id`), as in vLLM."""
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(OpenAIModel):
    """vLLM's `/tokenize`: a `prompt`, or `messages` rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageParam] | None = None
    add_special_tokens: bool | None = None
    """Default: True for a prompt, False for messages (vLLM's defaults)."""
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False
    continue_final_message: bool | None = None
    chat_template: str | None = None
    tools: Any = None
    mm_processor_kwargs: Any = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


# -- KServe v2 generate extension ----------------------------------------------------------------


class GenerateParameters(SamplingFields):
    max_tokens: int | None = Field(16, ge=1)


class GenerateRequest(OpenAIModel):
    text_input: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    id: str | None = None


class GenerateResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    text_output: str
    finish_reason: str | None = None
    usage: UsageInfo | None = None


def error_body(message: str, error_type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
