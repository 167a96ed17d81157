"""`POST /v1/completions` and the KServe v2 generate extension (`/v2/models/{model}/generate`,
`/generate_stream`): prompts in, text (or SSE chunks) out."""

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
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    GenerateRequest,
    GenerateResponse,
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
from fuselm.server.serving_structured import structured_outputs_of


def completion_logprobs(tokenizer: Any, token_ids: list[int],
                        logprobs: list[dict[int, float]] | None,
                        text_offset: int) -> CompletionLogProbs | None:
    """Legacy-completions logprobs of `token_ids`, text offsets counted from `text_offset`."""
    if logprobs is None:
        return None
    result = CompletionLogProbs()
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        token = tokenizer.decode([token_id], skip_special_tokens=False)
        result.tokens.append(token)
        result.token_logprobs.append(clamp_logprob(entry.get(token_id)))
        top = {tokenizer.decode([t], skip_special_tokens=False): clamp_logprob(lp)
               for t, lp in entry.items()}
        result.top_logprobs.append(top)
        result.text_offset.append(text_offset)
        text_offset += len(token)
    return result


def _with_prompt_logprobs(tokenizer: Any, prompt_ids: list[int],
                          generated: CompletionLogProbs) -> CompletionLogProbs:
    """`echo` with `logprobs`: prompt tokens first (their logprobs are not computed: null)."""
    result = CompletionLogProbs()
    offset = 0
    for token_id in prompt_ids:
        token = tokenizer.decode([token_id], skip_special_tokens=False)
        result.tokens.append(token)
        result.token_logprobs.append(None)
        result.top_logprobs.append(None)
        result.text_offset.append(offset)
        offset += len(token)
    result.tokens += generated.tokens
    result.token_logprobs += generated.token_logprobs
    result.top_logprobs += generated.top_logprobs
    result.text_offset += [o + offset for o in generated.text_offset]
    return result


async def _prepare(state: ServerState, req: CompletionRequest,
                   ) -> tuple[list[tuple[str, list[int]]], EngineCall]:
    state.check_model(req.model)
    check_supported(req)
    if req.best_of is not None and req.best_of != req.n:
        raise InvalidRequestError("best_of must equal n (or be left out)", param="best_of")
    prompts = await state.prompts.completion_prompts(
        req.prompt, add_special_tokens=req.add_special_tokens,
        truncate_prompt_tokens=req.truncate_prompt_tokens)
    params = [build_sampling_params(state, req, logprobs=req.logprobs,
                                    max_tokens=resolve_max_tokens(state, len(ids),
                                                                  req.max_tokens))
              for _, ids in prompts]
    constraint = structured_outputs_of(req)
    for p in params:
        p.structured_outputs = constraint
    state.check_admission()
    call = EngineCall(state, state.response_id("cmpl", req.request_id),
                      [ids for _, ids in prompts], params)
    return prompts, call


async def create_completion(state: ServerState, req: CompletionRequest) -> Response:
    """Runs a completion request; JSON, or an event stream when `stream` is set."""
    prompts, call = await _prepare(state, req)
    if req.stream:
        outputs = await start_stream(call)
        streamer = _CompletionStreamer(state, req, call.request_id, prompts)
        return EventStreamResponse(event_stream(outputs, on_output=streamer.on_output,
                                                tail=streamer.tail), call)
    finals = await call.collect()
    return JSONResponse(_completion_response(state, req, call.request_id, prompts, finals)
                        .model_dump())


def _completion_response(state: ServerState, req: CompletionRequest, request_id: str,
                         prompts: list[tuple[str, list[int]]],
                         finals: list[RequestOutput]) -> CompletionResponse:
    tok, choices = state.tokenizer, []
    num_prompt_tokens = num_completion_tokens = 0
    for i, ((prompt_text, prompt_ids), final) in enumerate(zip(prompts, finals, strict=True)):
        num_prompt_tokens += len(final.prompt_token_ids)
        for c in sorted(final.outputs, key=lambda c: c.index):
            num_completion_tokens += len(c.token_ids)
            logprobs = completion_logprobs(tok, c.token_ids, c.logprobs, 0)
            text = c.text
            if req.echo:
                text = prompt_text + text
                if logprobs is not None:
                    logprobs = _with_prompt_logprobs(tok, prompt_ids, logprobs)
            choices.append(CompletionChoice(index=i * req.n + c.index, text=text,
                                            logprobs=logprobs, finish_reason=c.finish_reason,
                                            stop_reason=c.stop_reason))
    return CompletionResponse(id=request_id, model=state.model_name, choices=choices,
                              usage=usage_of(num_prompt_tokens, num_completion_tokens))


class _CompletionStreamer:
    """Turns engine outputs into completion chunks; counts usage for the final chunk."""

    def __init__(self, state: ServerState, req: CompletionRequest, request_id: str,
                 prompts: list[tuple[str, list[int]]]) -> None:
        self.state, self.req, self.request_id, self.prompts = state, req, request_id, prompts
        self.created = int(time.time())
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.num_prompt_tokens: dict[int, int] = {}
        self.num_tokens: dict[int, int] = {}
        self.text_len: dict[int, int] = {}
        self.finished: set[int] = set()

    def _chunk(self, choices: list[CompletionChoice], usage: Any = None) -> str:
        chunk = CompletionStreamResponse(id=self.request_id, created=self.created,
                                         model=self.state.model_name, choices=choices,
                                         usage=usage)
        return sse(chunk.model_dump_json(exclude=None if self.include_usage else {"usage"}))

    def on_output(self, i: int, out: RequestOutput) -> list[str]:
        self.num_prompt_tokens[i] = len(out.prompt_token_ids)
        events = []
        for c in out.outputs:
            index = i * self.req.n + c.index
            if index in self.finished:
                continue
            choice = self._choice(i, index, c)
            if choice is not None:
                events.append(self._chunk([choice]))
        return events

    def _choice(self, i: int, index: int, c: CompletionOutput) -> CompletionChoice | None:
        self.num_tokens[index] = len(c.token_ids)
        text = c.text_delta
        if self.req.echo and index not in self.text_len:
            text = self.prompts[i][0] + text
        if not text and not c.token_ids_delta and c.finish_reason is None:
            return None
        offset = self.text_len.get(index, 0)
        self.text_len[index] = offset + len(text)
        delta_ids = c.token_ids_delta
        logprobs = None
        if c.logprobs is not None:
            start = len(c.token_ids) - len(delta_ids)
            logprobs = completion_logprobs(self.state.tokenizer, delta_ids,
                                           c.logprobs[start:len(c.token_ids)],
                                           offset + len(text) - len(c.text_delta))
        if c.finish_reason is not None:
            self.finished.add(index)
        return CompletionChoice(index=index, text=text, logprobs=logprobs,
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason)

    def tail(self) -> list[str]:
        if not self.include_usage:
            return []
        usage = usage_of(sum(self.num_prompt_tokens.values()), sum(self.num_tokens.values()))
        return [self._chunk([], usage)]


# -- KServe v2 generate --------------------------------------------------------------------------


async def _prepare_generate(state: ServerState, model: str, req: GenerateRequest) -> EngineCall:
    state.check_model(model)
    params = req.parameters
    check_supported(params)
    if params.n != 1:
        raise InvalidRequestError("the generate extension returns one text; n must be 1",
                                  param="parameters.n")
    (_, ids), = await state.prompts.completion_prompts(
        req.text_input, truncate_prompt_tokens=params.truncate_prompt_tokens)
    sampling = build_sampling_params(state, params, logprobs=None,
                                     max_tokens=resolve_max_tokens(state, len(ids),
                                                                   params.max_tokens))
    sampling.structured_outputs = structured_outputs_of(params)
    state.check_admission()
    # The client's `id` is only echoed: engine ids are the server's, so that two clients
    # sending the same id can never collide with (or abort) each other's work.
    return EngineCall(state, state.new_id("gen"), [ids], [sampling])


async def kserve_generate(state: ServerState, model: str, req: GenerateRequest) -> Response:
    """`text_input` -> `text_output`, in one JSON response."""
    call = await _prepare_generate(state, model, req)
    final = (await call.collect())[0]
    c = final.outputs[0]
    body = GenerateResponse(model_name=state.model_name, id=req.id, text_output=c.text,
                            finish_reason=c.finish_reason,
                            usage=usage_of(len(final.prompt_token_ids), len(c.token_ids)))
    return JSONResponse(body.model_dump(exclude_none=True))


async def kserve_generate_stream(state: ServerState, model: str,
                                 req: GenerateRequest) -> Response:
    """`text_input` -> SSE events of `text_output` deltas (no `[DONE]`, as in Triton)."""
    call = await _prepare_generate(state, model, req)
    outputs = await start_stream(call)

    def on_output(_: int, out: RequestOutput) -> list[str]:
        c = out.outputs[0]
        if not c.text_delta and c.finish_reason is None:
            return []
        body = GenerateResponse(model_name=state.model_name, id=req.id, text_output=c.text_delta,
                                finish_reason=c.finish_reason)
        return [sse(body.model_dump_json(exclude_none=True))]

    return EventStreamResponse(event_stream(outputs, on_output=on_output, done=False), call)
