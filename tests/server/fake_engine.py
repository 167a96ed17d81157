"""A fake `AsyncEngine` with the real one's face, for server tests that must not wait on a model.

- `FakeTokenizer`: byte-level (id = byte + 3; 0 pad, 1 BOS, 2 EOS), a simple chat template.
- `FakeEngine`: a step loop on the running event loop; each step gives every running sequence
  one token. Tokens are deterministic at temperature 0 (a function of the prompt, the sequence
  index and the position; never of the batch), seeded otherwise. KV blocks are really counted:
  a sequence reserves ceil((prompt + max_tokens) / block_size) blocks when admitted and frees
  them when it finishes or is aborted. Stop strings, stop token ids, EOS, logprobs, n and the
  waiting-queue bound behave like the engine's.
- `received`: every (request id, prompt ids, params) that reached `generate`, so tests can assert
  that a bad request never did; `aborted`: ids passed to `abort`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from fuselm.errors import ContextLengthError, EngineDeadError, InvalidRequestError, QueueFullError
from fuselm.outputs import CompletionOutput, RequestOutput
from fuselm.sampling_params import SamplingParams

ALPHABET = "abcdefghijklmnopqrstuvwxyz    "


class FakeTokenizer:
    """Bytes as tokens; special ids 0 (pad), 1 (BOS), 2 (EOS)."""

    bos_token_id = 1
    eos_token_id = 2
    vocab_size = 259
    _special = {0: "<pad>", 1: "<s>", 2: "</s>"}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if i >= 3:
                buf.append(i - 3)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens:
                out.append(self._special[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_text(self, token_id: int) -> str | None:
        if token_id in self._special:
            return self._special[token_id]
        return self.decode([token_id]) if 3 <= token_id < self.vocab_size else None

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        text = "".join(f"<|{m['role']}|>{m.get('content') or ''}\n" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")


@dataclass(eq=False)
class _Seq:
    index: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent_text: int = 0
    sent_tokens: int = 0
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    rng: random.Random | None = None


@dataclass(eq=False)
class _Req:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    seqs: list[_Seq]
    queue: asyncio.Queue
    arrival: float = field(default_factory=time.monotonic)
    scheduled: float | None = None
    num_blocks: int = 0

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


class FakeEngine:
    """The `AsyncEngine` face over deterministic fake tokens and counted KV blocks."""

    def __init__(self, *, max_model_len: int = 256, num_total_blocks: int = 4096,
                 block_size: int = 16, step_delay: float = 0.005, max_num_seqs: int = 256,
                 max_waiting: int | None = None, eos_after: int | None = None,
                 model_name: str = "fake-model") -> None:
        self.tokenizer = FakeTokenizer()
        self.max_model_len = max_model_len
        self.model_name = model_name
        self.block_size = block_size
        self.num_total_blocks = num_total_blocks
        self.num_free_blocks = num_total_blocks
        self.step_delay = step_delay
        self.max_num_seqs = max_num_seqs
        self.max_waiting = max_waiting
        self.eos_after = eos_after
        self.waiting: deque[_Req] = deque()
        self.running: list[_Req] = []
        self.requests: dict[str, _Req] = {}
        self.received: list[tuple[str, list[int], SamplingParams]] = []
        self.aborted: list[str] = []
        self.fail_after_tokens: int | None = None
        """When set, a step raises RuntimeError once a sequence has this many tokens."""
        self.dead = False
        self.paused = False
        self.counters = {"prompt_tokens_total": 0, "generation_tokens_total": 0,
                         "num_preemptions_total": 0, "prefix_cache_queries_total": 0,
                         "prefix_cache_hits_total": 0}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def shutdown(self) -> None:
        for req in list(self.requests.values()):  # like the engine: in-flight requests fail
            req.queue.put_nowait(EngineDeadError("the engine is shutting down"))
            self._release(req)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def kill(self) -> None:
        """Simulates an engine failure: pending and new requests get EngineDeadError."""
        self.dead = True
        for req in list(self.requests.values()):
            req.queue.put_nowait(EngineDeadError("the engine died"))
            self._release(req)

    # -- the face ---------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt: str | list[int],
                       sampling_params: SamplingParams) -> AsyncIterator[RequestOutput]:
        req = self._add(request_id, prompt, sampling_params)
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if request_id in self.requests:
                self._release(req)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        req = self.requests.get(request_id)
        if req is None:
            return
        for seq in req.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
        self._release(req)
        req.queue.put_nowait(self._output(req))

    async def check_health(self) -> None:
        if self.dead:
            raise EngineDeadError("the engine died")

    def stats(self) -> dict[str, float]:
        used = self.num_total_blocks - self.num_free_blocks
        return {
            "num_requests_running": len(self.running),
            "num_requests_waiting": len(self.waiting),
            "kv_cache_usage_perc": used / self.num_total_blocks,
            "num_free_blocks": self.num_free_blocks,
            "num_total_blocks": self.num_total_blocks,
            **self.counters,
        }

    # -- internals --------------------------------------------------------------------------

    def _add(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> _Req:
        if self.dead:
            raise EngineDeadError("the engine died")
        ids = list(prompt) if not isinstance(prompt, str) else self.tokenizer.encode(prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if room <= 0 or max_tokens > room:
            raise ContextLengthError("prompt + max_tokens exceed the context", param="max_tokens")
        if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
            raise QueueFullError("waiting queue is full")
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        seqs = [_Seq(i, rng=None if params.greedy else random.Random(
            None if params.seed is None else params.seed + i)) for i in range(params.n)]
        req = _Req(request_id, ids, params, max_tokens, seqs, asyncio.Queue())
        self.received.append((request_id, ids, params))
        self.requests[request_id] = req
        self.waiting.append(req)
        if self._wake is not None:
            self._wake.set()
        return req

    def _release(self, req: _Req) -> None:
        self.requests.pop(req.request_id, None)
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self.num_free_blocks += req.num_blocks
        req.num_blocks = 0

    async def _loop(self) -> None:
        assert self._wake is not None
        while True:
            if self.paused or not (self.waiting or self.running):
                self._wake.clear()
                await self._wake.wait()
                continue
            self._admit()
            try:
                self._step()
            except Exception:  # like the engine: fail every request, then die
                self.kill()
                return
            await asyncio.sleep(self.step_delay)

    def _admit(self) -> None:
        while self.waiting and sum(len(r.seqs) for r in self.running) < self.max_num_seqs:
            req = self.waiting[0]
            per_seq = -(-(len(req.prompt_ids) + req.max_tokens) // self.block_size)
            need = per_seq * len(req.seqs)
            if need > self.num_free_blocks:
                return
            self.waiting.popleft()
            self.num_free_blocks -= need
            req.num_blocks = need
            self.running.append(req)
            req.scheduled = time.monotonic()
            self.counters["prompt_tokens_total"] += len(req.prompt_ids)

    def _step(self) -> None:
        for req in list(self.running):
            for seq in req.seqs:
                if seq.finish_reason is None:
                    self._append(req, seq)
            out = self._output(req)
            if req.finished:
                self._release(req)
            req.queue.put_nowait(out)

    def _next_token(self, req: _Req, seq: _Seq) -> int:
        pos = len(seq.tokens)
        if self.eos_after is not None and pos >= self.eos_after:
            return self.tokenizer.eos_token_id
        if seq.rng is not None:
            return 3 + ord(seq.rng.choice(ALPHABET))
        return 3 + ord(ALPHABET[(sum(req.prompt_ids) + 7 * seq.index + 3 * pos) % 26])

    def _append(self, req: _Req, seq: _Seq) -> None:
        params = req.params
        token = self._next_token(req, seq)
        if self.fail_after_tokens is not None and len(seq.tokens) >= self.fail_after_tokens:
            raise RuntimeError("injected engine failure")
        seq.tokens.append(token)
        self.counters["generation_tokens_total"] += 1
        if params.logprobs is not None:
            entry = {token: -0.25}
            for j in range(params.logprobs):
                entry.setdefault(3 + ord("a") + j, -1.0 - 0.5 * j)
            seq.logprobs.append(entry)
        if token == self.tokenizer.eos_token_id and not params.ignore_eos:
            seq.finish_reason = "stop"
            return
        seq.text += self.tokenizer.decode([token])
        if token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
            return
        for stop in params.stop:
            at = seq.text.find(stop)
            if at >= 0:
                keep = at + (len(stop) if params.include_stop_str_in_output else 0)
                seq.text = seq.text[:keep]
                seq.finish_reason, seq.stop_reason = "stop", stop
                return
        if len(seq.tokens) >= req.max_tokens:
            seq.finish_reason = "length"

    def _output(self, req: _Req) -> RequestOutput:
        outputs = []
        for seq in req.seqs:
            # Hold back a possible stop-string prefix, like the engine.
            hold = max((len(s) for s in req.params.stop), default=1) - 1
            visible = seq.text if seq.finish_reason or not hold else seq.text[:-hold]
            visible = seq.text[:max(len(visible), seq.sent_text)]
            outputs.append(CompletionOutput(
                index=seq.index, text=visible, token_ids=list(seq.tokens),
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                logprobs=list(seq.logprobs) if req.params.logprobs is not None else None,
                text_delta=visible[seq.sent_text:], token_ids_delta=seq.tokens[seq.sent_tokens:]))
            seq.sent_text, seq.sent_tokens = len(visible), len(seq.tokens)
        return RequestOutput(req.request_id, None, list(req.prompt_ids), outputs, req.finished,
                             metrics={"arrival_time": req.arrival,
                                      **({"scheduled_time": req.scheduled}
                                         if req.scheduled is not None else {})})

    def expected_text(self, prompt_ids: list[int], max_tokens: int, index: int = 0) -> str:
        """The temperature-0 text of a prompt (no stops): what a request alone would get."""
        return "".join(ALPHABET[(sum(prompt_ids) + 7 * index + 3 * pos) % 26]
                       for pos in range(max_tokens))
