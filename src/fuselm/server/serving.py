"""What every generation route shares: request checks, sampling parameters, the engine call
(with abort on every exit path), disconnect watching and Server-Sent Events.

Every check that can fail on user input runs before the first `engine.generate`, so a bad
request never reaches the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from fuselm.errors import ContextLengthError, FuselmError, InvalidRequestError
from fuselm.outputs import RequestOutput
from fuselm.sampling_params import SamplingParams
from fuselm.server.app_state import ServerState
from fuselm.server.prompts import check_token_ids
from fuselm.server.protocol import (
    SamplingFields,
    UsageInfo,
    error_body,
)

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"
MIN_LOGPROB = -9999.0
"""Stand-in for -inf / NaN log probabilities, which JSON cannot carry (vLLM's value)."""
LOGIT_BIAS_LIMIT = 100.0


# -- checks and sampling parameters --------------------------------------------------------------


def error_json(exc: FuselmError) -> dict[str, Any]:
    """The OpenAI error body of a fuselm error."""
    return error_body(str(exc), exc.error_type, getattr(exc, "param", None), exc.code)


def parse_logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's {"token id": bias} with ids in the vocabulary and biases in [-100, 100]."""
    if not bias:
        return None
    parsed: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise InvalidRequestError(f"logit_bias key {key!r} is not a token id",
                                      param="logit_bias") from None
        if not 0 <= token_id < vocab_size:
            raise InvalidRequestError(f"logit_bias token id {token_id} is out of range [0, "
                                      f"{vocab_size})", param="logit_bias")
        if not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
            raise InvalidRequestError("logit_bias values must be in [-100, 100]",
                                      param="logit_bias")
        parsed[token_id] = float(value)
    return parsed


def resolve_max_tokens(state: ServerState, num_prompt_tokens: int, max_tokens: int | None) -> int:
    """`max_tokens` checked against the context; None takes all the room left."""
    room = state.max_model_len - num_prompt_tokens
    if room <= 0:
        raise ContextLengthError(
            f"the prompt has {num_prompt_tokens} tokens, but this model's maximum context "
            f"length is {state.max_model_len} tokens; shorten the prompt", param="prompt")
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise ContextLengthError(
            f"this model's maximum context length is {state.max_model_len} tokens; you asked "
            f"for {num_prompt_tokens + max_tokens} ({num_prompt_tokens} in the prompt, "
            f"{max_tokens} to generate); lower max_tokens or shorten the prompt",
            param="max_tokens")
    return max_tokens


def build_sampling_params(state: ServerState, req: SamplingFields, *, max_tokens: int,
                          logprobs: int | None) -> SamplingParams:
    """The engine's SamplingParams from the request's fields (OpenAI defaults for None)."""
    vocab_size = state.tokenizer.vocab_size
    stop_token_ids = check_token_ids(req.stop_token_ids or [], vocab_size, "stop_token_ids")
    top_k = -1 if req.top_k in (None, 0) else req.top_k
    return SamplingParams(
        n=req.n,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=top_k,
        min_p=req.min_p or 0.0,
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        logit_bias=parse_logit_bias(req.logit_bias, vocab_size),
        max_tokens=max_tokens,
        min_tokens=min(req.min_tokens, max_tokens),
        stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
        stop_token_ids=stop_token_ids,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
    )


def usage_of(num_prompt_tokens: int, num_completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=num_prompt_tokens, completion_tokens=num_completion_tokens,
                     total_tokens=num_prompt_tokens + num_completion_tokens)


def clamp_logprob(value: float | None) -> float:
    """A finite log probability for JSON."""
    if value is None or math.isnan(value) or value < MIN_LOGPROB:
        return MIN_LOGPROB
    return float(value)


# -- the engine call -----------------------------------------------------------------------------


class EngineCall:
    """One HTTP request's engine requests (one per prompt), merged into one output stream.

    Every engine request that did not finish is aborted when the stream ends for any reason
    (client gone, error, server shutdown): by `_one`'s `finally` and again by `close()`.
    """

    def __init__(self, state: ServerState, request_id: str, prompts: list[list[int]],
                 params: list[SamplingParams]) -> None:
        self.state = state
        self.request_id = request_id
        self.prompts = prompts
        self.params = params
        # Fresh ids: a response id may carry a client's `request_id`, which two clients can
        # share; engine ids must never collide.
        base = state.new_id(request_id)
        self.engine_ids = [f"{base}-{i}" for i in range(len(prompts))]
        self.unfinished = set(self.engine_ids)

    def close(self) -> None:
        """Aborts (in the background) every engine request that has not finished."""
        for engine_id in sorted(self.unfinished):
            self.state.abort_soon(engine_id)
        self.unfinished.clear()

    async def stream(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) pairs as the engine produces them."""
        if len(self.prompts) == 1:
            async for out in self._one(0):
                yield 0, out
            return
        async for item in self._merged():
            yield item

    async def collect(self) -> list[RequestOutput]:
        """The final output of each prompt."""
        finals: dict[int, RequestOutput] = {}
        try:
            async for i, out in self.stream():
                finals[i] = out
        finally:
            self.close()
        return [finals[i] for i in range(len(self.prompts))]

    async def _one(self, i: int) -> AsyncIterator[RequestOutput]:
        engine_id, state = self.engine_ids[i], self.state
        tracker = state.metrics.tracker()
        log, last = state.request_log, None
        if log is not None:
            log.received(engine_id, self.prompts[i], self.params[i])
        gen = state.engine.generate(engine_id, self.prompts[i], self.params[i])
        try:
            async with contextlib.aclosing(gen):
                async for out in gen:
                    last = out
                    tracker.observe(out)
                    if out.finished:
                        self.unfinished.discard(engine_id)
                    yield out
                    if out.finished:
                        return
        except FuselmError:
            if not tracker.admitted:  # refused before it ran: not a finished request
                tracker.done = True
            raise
        finally:
            tracker.close()
            if log is not None:
                log.finished(engine_id, last, time.monotonic() - tracker.start)
            if engine_id in self.unfinished:
                self.unfinished.discard(engine_id)
                state.abort_soon(engine_id)

    async def _merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = (
            asyncio.Queue())

        async def pump(i: int) -> None:
            try:
                async for out in self._one(i):
                    queue.put_nowait((i, out, None))
            except Exception as exc:
                queue.put_nowait((i, None, exc))
                return
            queue.put_nowait((i, None, None))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(self.prompts))]
        try:
            remaining = len(tasks)
            while remaining:
                i, out, exc = await queue.get()
                if exc is not None:
                    raise exc
                if out is None:
                    remaining -= 1
                    continue
                yield i, out
        finally:
            for task in tasks:
                task.cancel()


# -- disconnects and streaming -------------------------------------------------------------------


async def run_until_disconnect(request: Request, handler: Awaitable[Response]) -> Response:
    """Runs `handler`; cancels it (so that its engine requests are aborted) if the client
    disconnects first. Covers the time before a response starts; a started stream is watched
    by Starlette's `StreamingResponse` itself."""
    handler_task = asyncio.ensure_future(handler)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({handler_task, watcher},
                                     return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        handler_task.cancel()
        watcher.cancel()
        raise
    if handler_task in done:
        watcher.cancel()
        return handler_task.result()
    handler_task.cancel()
    with contextlib.suppress(BaseException):
        await handler_task
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class EventStreamResponse(StreamingResponse):
    """`text/event-stream` response that aborts its engine call however the stream ends."""

    def __init__(self, content: AsyncIterator[str], call: EngineCall) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.call = call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.call.close()


def sse(payload: str) -> str:
    """One Server-Sent Event carrying a JSON payload."""
    return f"data: {payload}\n\n"


OutputHandler = Callable[[int, RequestOutput], list[str]]


async def start_stream(call: EngineCall) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The engine call's stream, its first output already awaited so that admission errors
    (queue full, engine dead) still become the HTTP status instead of an in-stream error."""
    it = call.stream()
    try:
        first = await it.__anext__()
    except BaseException:
        call.close()
        raise

    async def chained() -> AsyncIterator[tuple[int, RequestOutput]]:
        yield first
        async for item in it:
            yield item

    return chained()


async def event_stream(outputs: AsyncIterator[tuple[int, RequestOutput]], *,
                       on_output: OutputHandler, head: Callable[[], list[str]] = list,
                       tail: Callable[[], list[str]] = list, done: bool = True,
                       ) -> AsyncIterator[str]:
    """SSE text: `head()` events, `on_output` events per output, `tail()` events, `[DONE]`.
    An error after the stream began is sent as an error event (then `[DONE]`)."""
    try:
        for event in head():
            yield event
        async for i, out in outputs:
            for event in on_output(i, out):
                yield event
        for event in tail():
            yield event
    except FuselmError as exc:
        yield sse_json(error_json(exc))
    except Exception:
        logger.exception("generation failed mid-stream")
        yield sse_json(error_body("internal error while generating", "internal_error"))
    if done:
        yield SSE_DONE


def sse_json(obj: dict[str, Any]) -> str:
    """One event carrying `obj` as compact JSON."""
    return sse(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))
