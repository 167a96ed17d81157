"""`POST /v1/chat/completions`: messages -> the tokenizer's chat template -> the engine ->
an assistant message (or SSE chunks)."""

from __future__ import annotations

import time
from typing import Any

from fastapi.responses import JSONResponse
from starlette.responses import Response

from fuselm.errors import InvalidRequestError
from fuselm.outputs import CompletionOutput, RequestOutput
from fuselm.server.app_state import ServerState
from fuselm.server.contract import check_supported
from fuselm.server.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatLogProbs,
    ChatMessage,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
)
from fuselm.server.serving import (
    EngineCall,
    EventStreamResponse,
    build_sampling_params,
    clamp_logprob,
    event_stream,
    resolve_max_tokens,
    sse,
    start_stream,
    usage_of,
)
from fuselm.server.serving_structured import (
    ChoiceToolStreams,
    ToolPlan,
    chat_constraint,
    plan_tools,
    template_messages,
    tool_calls_json,
)

ROLE = "assistant"


def chat_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[dict[int, float]] | None,
                  num_top: int) -> ChatLogProbs | None:
    """Chat-style logprobs of `token_ids`: each token with its `num_top` most likely ones."""
    if logprobs is None:
        return None
    content = []
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        ranked = sorted(entry.items(), key=lambda kv: -clamp_logprob(kv[1]))[:num_top]
        content.append(ChatTokenLogprob(
            **_token_logprob(tokenizer, token_id, entry.get(token_id)),
            top_logprobs=[TopLogprob(**_token_logprob(tokenizer, t, lp)) for t, lp in ranked]))
    return ChatLogProbs(content=content)


def _token_logprob(tokenizer: Any, token_id: int, logprob: float | None) -> dict[str, Any]:
    token = tokenizer.decode([token_id], skip_special_tokens=False)
    return {"token": token, "logprob": clamp_logprob(logprob),
            "bytes": list(token.encode("utf-8", errors="replace"))}


async def _prepare(state: ServerState, req: ChatCompletionRequest,
                   ) -> tuple[int | None, EngineCall, ToolPlan | None]:
    state.check_model(req.model)
    check_supported(req)
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
    options = state.options
    plan = plan_tools(req, options.tool_call_parser if options.enable_auto_tool_choice else None)
    template_kwargs = dict(req.chat_template_kwargs or {})
    if plan is not None:  # as vLLM: the template sees the tools even for tool_choice "none"
        template_kwargs["tools"] = plan.template_tools
    _, ids = await state.prompts.chat_prompt(
        template_messages(req.messages), req.add_generation_prompt,
        add_special_tokens=req.add_special_tokens, template_kwargs=template_kwargs or None)
    if req.truncate_prompt_tokens is not None:
        ids = ids[-req.truncate_prompt_tokens:]
    num_top = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens or req.max_tokens
    params = build_sampling_params(state, req, logprobs=num_top,
                                   max_tokens=resolve_max_tokens(state, len(ids), max_tokens))
    params.structured_outputs = chat_constraint(req, plan)
    state.check_admission()
    return num_top, EngineCall(state, state.response_id("chatcmpl", req.request_id), [ids],
                               [params]), plan


def _echo_text(req: ChatCompletionRequest) -> str:
    """vLLM's chat `echo`: the last message's text when it is the assistant's (a prefill)."""
    last = req.messages[-1]
    if not req.echo or last.role != ROLE:
        return ""
    if isinstance(last.content, list):
        return "\n".join(p.text or "" for p in last.content)
    return last.content or ""


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest) -> Response:
    """Runs a chat completion; JSON, or an event stream when `stream` is set."""
    num_top, call, plan = await _prepare(state, req)
    if req.stream:
        outputs = await start_stream(call)
        streamer = _ChatStreamer(state, req, call.request_id, num_top, plan)
        return EventStreamResponse(event_stream(outputs, on_output=streamer.on_output,
                                                head=streamer.head, tail=streamer.tail), call)
    final = (await call.collect())[0]
    choices = []
    for c in sorted(final.outputs, key=lambda c: c.index):
        logprobs = (chat_logprobs(state.tokenizer, c.token_ids, c.logprobs, num_top)
                    if num_top is not None else None)
        content: str | None = _echo_text(req) + c.text
        calls, finish_reason = [], c.finish_reason
        if plan is not None:
            extracted = plan.extract(c.text)
            if extracted.tools_called:
                content, calls = extracted.content, tool_calls_json(extracted.tool_calls)
                finish_reason = plan.finish_reason(True, c.finish_reason)
        choices.append(ChatCompletionChoice(
            index=c.index, message=ChatMessage(role=ROLE, content=content, tool_calls=calls),
            logprobs=logprobs, finish_reason=finish_reason, stop_reason=c.stop_reason))
    usage = usage_of(len(final.prompt_token_ids), sum(len(c.token_ids) for c in final.outputs))
    body = ChatCompletionResponse(id=call.request_id, model=state.model_name, choices=choices,
                                  usage=usage)
    return JSONResponse(body.model_dump())


class _ChatStreamer:
    """Turns engine outputs into chat chunks: a role chunk per choice, content deltas (the
    last one with `finish_reason`), then the usage chunk when asked."""

    def __init__(self, state: ServerState, req: ChatCompletionRequest, request_id: str,
                 num_top: int | None, plan: ToolPlan | None = None) -> None:
        self.state, self.req, self.request_id, self.num_top = state, req, request_id, num_top
        self.tools = ChoiceToolStreams(plan) if plan is not None else None
        self.created = int(time.time())
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.num_prompt_tokens = 0
        self.num_tokens: dict[int, int] = {}
        self.finished: set[int] = set()

    def _chunk(self, choices: list[ChatCompletionStreamChoice], usage: Any = None) -> str:
        chunk = ChatCompletionStreamResponse(id=self.request_id, created=self.created,
                                             model=self.state.model_name, choices=choices,
                                             usage=usage)
        return sse(chunk.model_dump_json(exclude=None if self.include_usage else {"usage"}))

    def head(self) -> list[str]:
        events = []
        echo = _echo_text(self.req)
        for index in range(self.req.n):
            events.append(self._chunk([ChatCompletionStreamChoice(
                index=index, delta=DeltaMessage(role=ROLE, content=""))]))
            if echo:
                events.append(self._chunk([ChatCompletionStreamChoice(
                    index=index, delta=DeltaMessage(content=echo))]))
        return events

    def on_output(self, _: int, out: RequestOutput) -> list[str]:
        self.num_prompt_tokens = len(out.prompt_token_ids)
        events = []
        for c in out.outputs:
            if c.index in self.finished:
                continue
            choice = self._choice(c)
            if choice is not None:
                events.append(self._chunk([choice]))
        return events

    def _choice(self, c: CompletionOutput) -> ChatCompletionStreamChoice | None:
        self.num_tokens[c.index] = len(c.token_ids)
        if not c.text_delta and not c.token_ids_delta and c.finish_reason is None:
            return None
        logprobs = None
        if self.num_top is not None and c.logprobs is not None:
            start = len(c.token_ids) - len(c.token_ids_delta)
            logprobs = chat_logprobs(self.state.tokenizer, c.token_ids_delta,
                                     c.logprobs[start:len(c.token_ids)], self.num_top)
        if c.finish_reason is not None:
            self.finished.add(c.index)
        delta, finish_reason = DeltaMessage(content=c.text_delta), c.finish_reason
        if self.tools is not None:
            content, calls = self.tools.delta(c.index, c.text_delta, c.finish_reason is not None)
            if not content and not calls and c.finish_reason is None and logprobs is None:
                return None  # held back: it may start a tool call
            delta = DeltaMessage(content=content or None, tool_calls=calls or None)
            finish_reason = self.tools.plan.finish_reason(c.index in self.tools.called,
                                                          c.finish_reason)
        return ChatCompletionStreamChoice(index=c.index, delta=delta, logprobs=logprobs,
                                          finish_reason=finish_reason,
                                          stop_reason=c.stop_reason)

    def tail(self) -> list[str]:
        if not self.include_usage:
            return []
        usage = usage_of(self.num_prompt_tokens, sum(self.num_tokens.values()))
        return [self._chunk([], usage)]
