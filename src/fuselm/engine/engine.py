"""The synchronous engine: add requests, step, get per-token outputs.

``LLMEngine.step`` reads: schedule -> execute -> update. It launches what the scheduler decides
through the executor, collects the oldest step in flight, advances the scheduler with its tokens,
applies stop rules, detokenizes incrementally and returns a ``RequestOutput`` for every request
that advanced or finished. How many steps are in flight is this loop's policy: one, or one
ahead (async scheduling: the next decode step is queued before the host reads the current
one's tokens, so host bookkeeping overlaps the device), or one micro-batch per pipeline stage.
An engine is built by ``fuselm.runtime.build_engine``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from fuselm.config import EngineConfig, ModelConfig
from fuselm.engine.block_manager import BlockManager
from fuselm.engine.builder import EngineParts
from fuselm.engine.executor import Executor, PendingStep
from fuselm.engine.kv_mover import kv_tier_stats, with_cpu_tiers
from fuselm.engine.model_runner import ModelRunner
from fuselm.engine.prompt_logprobs import PromptEntries
from fuselm.engine.request import Request, RequestStatus
from fuselm.engine.scheduler import Scheduler, SchedulerOutput
from fuselm.engine.stop_checker import SequenceText
from fuselm.errors import ContextLengthError, InvalidRequestError
from fuselm.outputs import CompletionOutput, RequestOutput
from fuselm.sampling_params import SamplingParams
from fuselm.structured.compiler import GrammarCompiler
from fuselm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class RequestState:
    """A user request: its n sequences and their texts."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[Request]
    texts: list[SequenceText]
    arrival_time: float = field(default_factory=time.monotonic)
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """Per prompt position (the first None), when the request asked for them."""

    @property
    def finished(self) -> bool:
        """True once every sequence finished."""
        return all(s.is_finished for s in self.sequences)


class LLMEngine:
    """Model, tokenizer, scheduler and executor behind ``add_request`` / ``step``."""

    def __init__(self, config: EngineConfig, parts: EngineParts, executor: Executor) -> None:
        self.config = config
        self.model_config: ModelConfig = parts.model_config
        self.tokenizer: Tokenizer = parts.tokenizer
        self.runner: ModelRunner = parts.runner
        self.executor = executor
        use_async = (parts.device.type == "cuda" if config.async_scheduling is None
                     else config.async_scheduling)
        self.run_ahead = use_async and executor.max_in_flight == 1  # pipelines overlap already
        self.in_flight: deque[PendingStep] = deque()
        self.num_pipelined_steps = 0  # steps launched before the previous one's tokens were read
        self.max_in_flight_seen = 0  # steps in flight at once (pipeline micro-batches)
        self.block_manager: BlockManager = with_cpu_tiers(config.cache, parts.block_manager,
                                                          self.runner)
        self.scheduler = Scheduler(parts.scheduler_config, self.block_manager)
        self.scheduler.kv_rates = self.runner.kv_rates  # measured where the copies run
        if self.runner.kv_mover is not None:
            self.scheduler.kv_block_bytes = self.runner.kv_mover.bytes_per_block
        self.max_model_len = parts.max_model_len
        self.model_name = parts.model_name
        self.device = parts.device
        self.requests: dict[str, RequestState] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.num_steps = 0
        self.max_seqs_in_step = 0
        self._eos = frozenset(self.model_config.eos_token_id) | self.tokenizer.stop_token_ids
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self._eos)

    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams | None = None) -> None:
        """Queues a request; raises InvalidRequestError for a bad or too long prompt."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if params.prompt_logprobs is not None and not self.executor.supports_prompt_logprobs:
            raise InvalidRequestError(
                "prompt_logprobs is not supported with tensor or pipeline parallelism",
                param="prompt_logprobs")
        text, ids = self._encode(prompt)
        max_tokens = self._max_tokens(len(ids), params)
        grammar = (self.grammars.compile(params.structured_outputs)
                   if params.structured_outputs is not None else None)
        seqs, texts = [], []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed + i)
            seqs.append(Request(f"{request_id}#{i}", list(ids), params, self._eos, max_tokens,
                                parent_id=request_id, index=i, generator=gen,
                                grammar=grammar.matcher() if grammar is not None else None))
            texts.append(SequenceText(self.tokenizer, ids, params))
        state = RequestState(request_id, text, ids, seqs, texts)
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None] * len(ids)
        self.requests[request_id] = state
        self.prompt_tokens_total += len(ids)
        for seq in seqs:
            self.scheduler.add(seq)

    def _encode(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            text: str | None = prompt
        else:
            ids, text = list(prompt), None
            if any(not isinstance(t, int) or not 0 <= t < self.model_config.vocab_size
                   for t in ids):
                raise InvalidRequestError(
                    f"prompt token ids must be integers in [0, {self.model_config.vocab_size})",
                    param="prompt")
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return text, ids

    def _max_tokens(self, num_prompt: int, params: SamplingParams) -> int:
        room = self.max_model_len - num_prompt
        if room <= 0:
            raise ContextLengthError(
                f"the prompt has {num_prompt} tokens, but this model's context is "
                f"{self.max_model_len} tokens; shorten the prompt", param="prompt")
        if params.max_tokens is None:
            return room
        if params.max_tokens > room:
            raise ContextLengthError(
                f"prompt ({num_prompt} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"context length {self.max_model_len}; lower max_tokens or shorten the prompt",
                param="max_tokens")
        return params.max_tokens

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Ends a request at once and frees its KV blocks; its final output, if it existed."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        self.scheduler.finish(state.sequences, RequestStatus.FINISHED_ABORTED)
        return self._make_output(state)

    def has_unfinished_requests(self) -> bool:
        """True while any request is queued or running."""
        return self.scheduler.has_unfinished()

    def step(self, stream: bool = True) -> list[RequestOutput]:
        """Runs one scheduling + model step; outputs of the requests that advanced (only of
        those that finished when ``stream`` is False, which saves per-step work offline)."""
        self._launch_steps()
        if not self.in_flight:
            return []
        pending = self.in_flight.popleft()
        out, result = pending.out, pending.result()
        self.num_steps += 1
        self.max_seqs_in_step = max(self.max_seqs_in_step, len(out.sequences))
        self.scheduler.update(out, result.token_ids)
        for later in self.in_flight:  # its masks can read this step's tokens now
            later.finish_sampling()
        if result.prompt_logprobs is not None:
            self._record_prompt_logprobs(out, result.prompt_logprobs)
        touched: dict[str, RequestState] = {}
        for seq, token, logprobs in zip(out.sequences, result.token_ids, result.logprobs,
                                        strict=True):
            req = seq.request
            state = self.requests.get(req.parent_id or "")
            if token is None or state is None:
                continue
            self.generation_tokens_total += 1
            if logprobs is not None:
                req.logprobs.append(logprobs)
            self._apply_text(state, req)
            touched[state.request_id] = state
        outputs = [self._make_output(s) for s in touched.values() if stream or s.finished]
        for state in touched.values():
            if state.finished:
                del self.requests[state.request_id]
        return outputs

    def _record_prompt_logprobs(self, out: SchedulerOutput,
                                entries: list[PromptEntries | None]) -> None:
        """Stores the prompt entries of a step's chunks (a position computed twice, after a
        preemption or by a sibling, keeps its first entry)."""
        for seq, chunk in zip(out.sequences, entries, strict=True):
            state = self.requests.get(seq.request.parent_id or "")
            if chunk is None or state is None or state.prompt_logprobs is None:
                continue
            for pos, entry in chunk:
                if state.prompt_logprobs[pos] is None:
                    state.prompt_logprobs[pos] = entry

    def _launch_steps(self) -> None:
        """Fills the executor: micro-batches up to ``max_in_flight`` (disjoint sequences, each
        at most its share of the active ones), then, with async scheduling, the decode step
        that follows the newest one."""
        sched, limit = self.scheduler, self.executor.max_in_flight
        while len(self.in_flight) < limit:
            if limit == 1:
                out = sched.schedule()
            else:
                busy = {s.request for p in self.in_flight for s in p.out.sequences}
                active = min(len(sched.running) + len(sched.waiting), sched.config.max_num_seqs)
                out = sched.schedule(exclude=busy, max_num_seqs=max(1, -(-active // limit)))
            if out.is_empty:
                break
            self.in_flight.append(self.executor.execute(out))
        if self.run_ahead and limit == 1 and len(self.in_flight) == 1:
            prev = self.in_flight[0]
            defer = self.executor.can_defer_sampling
            ahead = (sched.schedule_ahead(prev.out, with_grammars=defer)
                     if self.executor.can_follow(prev) else None)
            if ahead is not None:
                # a constrained sequence's mask needs prev's token: its sampling waits for it
                masked = any(s.request.grammar is not None for s in ahead.sequences)
                self.in_flight.append(self.executor.execute(ahead, follows=prev,
                                                            defer_sampling=masked))
                self.num_pipelined_steps += 1
        self.max_in_flight_seen = max(self.max_in_flight_seen, len(self.in_flight))

    def shutdown(self) -> None:
        """Drops the steps in flight and releases the executor."""
        self.in_flight.clear()
        self.executor.shutdown()

    def _apply_text(self, state: RequestState, req: Request) -> None:
        text = state.texts[req.index]
        stop = text.append(req.output_token_ids[-1], req.is_finished)
        if stop is not None and not req.is_finished:
            self.scheduler.finish([req], RequestStatus.FINISHED_STOPPED, stop)

    def _make_output(self, state: RequestState) -> RequestOutput:
        outputs = []
        for req, text in zip(state.sequences, state.texts, strict=True):
            delta, start = text.take_delta(req.is_finished, len(req.output_token_ids))
            outputs.append(CompletionOutput(
                index=req.index, text=text.visible_text(req.is_finished),
                token_ids=list(req.output_token_ids),
                finish_reason=req.status.value if req.is_finished else None,
                stop_reason=req.stop_reason,
                logprobs=list(req.logprobs) if req.sampling_params.logprobs is not None
                else None,
                text_delta=delta, token_ids_delta=req.output_token_ids[start:]))
        first = min((r.first_token_time for r in state.sequences if r.first_token_time),
                    default=None)
        metrics = {"arrival_time": state.arrival_time}
        scheduled = min((r.scheduled_time for r in state.sequences if r.scheduled_time),
                        default=None)
        if scheduled is not None:
            metrics["scheduled_time"] = scheduled
        if first is not None:
            metrics["first_token_time"] = first
        if state.finished:
            metrics["finished_time"] = time.monotonic()
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, outputs,
                             state.finished, max(r.num_cached_tokens for r in state.sequences),
                             metrics, prompt_logprobs=list(state.prompt_logprobs)
                             if state.prompt_logprobs is not None else None)

    def stats(self) -> dict[str, float]:
        """Counts for metrics and tests."""
        bm = self.block_manager
        return {
            "num_requests_running": len({r.parent_id for r in self.scheduler.running}),
            "num_requests_waiting": len({r.parent_id for r in self.scheduler.waiting}),
            "kv_cache_usage_perc": bm.usage,
            "num_preemptions_total": self.scheduler.num_preemptions,
            "num_partial_prefills_total": self.scheduler.num_partial_prefills,
            "prompt_tokens_computed_total": self.scheduler.num_prompt_tokens_computed,
            "max_num_seqs_in_step": self.max_seqs_in_step,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "prefix_cache_queries_total": bm.prefix_queries,
            "prefix_cache_hits_total": bm.prefix_hits,
            "num_free_blocks": bm.num_free_blocks,
            "num_total_blocks": bm.num_blocks,
            "num_graph_replays": self.runner.num_graph_replays,
            **kv_tier_stats(bm, self.runner.kv_mover, self.scheduler),
        }
