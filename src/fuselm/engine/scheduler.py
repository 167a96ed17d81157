"""Continuous batching with a token budget per step.

Each step: running sequences first (decodes, and the next chunk of prompts being prefilled), then
waiting ones in arrival order, while the token budget (``max_num_batched_tokens``) and the sequence
limit (``max_num_seqs``) allow. A long prompt is split into chunks so that decodes never stall.
When blocks run out, the newest running sequence is preempted: its blocks are swapped to CPU
memory and back (``--swap-space``) when measured rates say the copies cost less than the
recompute, else it gives its blocks back and is recomputed later (through the prefix cache where
its blocks survive). The block moves a step needs travel in its ``SchedulerOutput.kv_copies``.
The ``n`` sequences of one request share its prompt: the first admitted (the leader) prefills
it, the others wait for it and then share its full prompt blocks, computing only their last
partial block.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from fuselm.config import SchedulerConfig
from fuselm.engine.block_manager import BlockManager, PrefixHit
from fuselm.engine.kv_tiers import KVCopies, TransferRates
from fuselm.engine.request import Request, RequestStatus


@dataclass
class ScheduledSequence:
    """A sequence's share of one step."""

    request: Request
    num_new_tokens: int
    sample: bool
    """True when this chunk reaches the sequence's last token, so a new token is sampled."""
    ahead: int = 0
    """Tokens of this sequence computed but not yet appended on the host (async scheduling:
    the input token is the previous step's sample, still on the device)."""


@dataclass
class SchedulerOutput:
    """What one step computes."""

    sequences: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    kv_copies: KVCopies | None = None
    """Block moves between the GPU and CPU caches, run before this step's forward."""

    @property
    def num_tokens(self) -> int:
        """Tokens in the step's flat batch."""
        return sum(s.num_new_tokens for s in self.sequences)

    @property
    def is_decode(self) -> bool:
        """True when every sequence brings one token."""
        return all(s.num_new_tokens == 1 for s in self.sequences)

    @property
    def is_empty(self) -> bool:
        """True when there is nothing to compute."""
        return not self.sequences


class Scheduler:
    """Decides each step's batch; owns the waiting queue and the running list."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_partial_prefills = 0  # chunks that stopped short of the sequence's end
        self.num_prompt_tokens_computed = 0  # prompt tokens run through the model
        self.num_swapped_preemptions = 0  # preemptions by swap (the rest recompute)
        self.num_recomputed_tokens = 0  # tokens computed again after a preemption
        self.kv_rates = TransferRates()  # the runner's measurements (LLMEngine wires them)
        self.kv_block_bytes = 0  # one block over all layers: what a swap copies per block
        # parent id -> the sibling (n > 1) whose prompt blocks the others share
        self._leaders: dict[str, Request] = {}

    def add(self, req: Request) -> None:
        """Queues a new sequence."""
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        """True while any sequence waits or runs."""
        return bool(self.waiting or self.running)

    def schedule(self, exclude: Collection[Request] = (),
                 max_num_seqs: int | None = None) -> SchedulerOutput:
        """Picks this step's sequences and token counts, allocating their KV blocks.

        Pipeline parallelism asks for several batches in flight: ``exclude`` holds the
        sequences of batches not yet returned (neither scheduled nor preempted now), and
        ``max_num_seqs`` caps this batch's sequences.
        """
        out = SchedulerOutput()
        cap = self.config.max_num_seqs if max_num_seqs is None else max_num_seqs
        budget = self._schedule_running(out, self.config.max_num_batched_tokens, exclude, cap)
        if not out.preempted:
            self._schedule_waiting(out, budget, cap)
        self._attach_copies(out)
        return out

    def _attach_copies(self, out: SchedulerOutput) -> None:
        # moves of a schedule that runs nothing wait for the next one (its forward is the
        # first to write the blocks they read)
        if not out.is_empty:
            out.kv_copies = self.block_manager.take_copies()

    def schedule_ahead(self, out: SchedulerOutput,
                       with_grammars: bool = False) -> SchedulerOutput | None:
        """The next decode step of ``out``'s sequences, scheduled before ``out``'s tokens reach
        the host (async scheduling: its input tokens are ``out``'s samples, on the device), or
        None when ``out`` cannot be followed blindly. ``with_grammars``: sequences with a
        structured-output grammar may follow too (their step's sampling is then deferred until
        ``out``'s tokens are read, see ``LLMEngine._launch_steps``).

        Only steady decode follows: every sequence of ``out`` decodes one token, nothing waits
        for admission, no sequence can end by length in ``out``, and no sampling parameter reads
        the token history (penalties) or asks for logprobs. A sequence that stops in ``out``
        (EOS, stop string, abort) has its successor's token discarded by ``update`` (it skips
        finished sequences); its KV write lands in blocks that the stream order keeps from any
        later owner.
        """
        if self.waiting or not out.sequences or not all(
                s.num_new_tokens == 1 and s.sample for s in out.sequences):
            return None
        reqs = [s.request for s in out.sequences]
        if not all(self._follows_blindly(r, with_grammars) for r in reqs):
            return None
        if not all(self.block_manager.allocate(r, 2) for r in reqs):
            return None  # blocks already taken stay with their sequences: harmless
        ahead = SchedulerOutput([ScheduledSequence(r, 1, True, ahead=1) for r in reqs])
        self._attach_copies(ahead)  # a new block can evict a cached one to the CPU tier
        return ahead

    def _follows_blindly(self, req: Request, with_grammars: bool) -> bool:
        p = req.sampling_params
        max_model_len = self.config.max_model_len
        return (not req.is_finished and p.logprobs is None and not p.uses_penalties
                and (with_grammars or req.grammar is None)  # its mask needs this token
                and len(req.output_token_ids) + 1 < req.max_tokens
                and (max_model_len is None or req.num_computed_tokens + 2 <= max_model_len))

    def _schedule_running(self, out: SchedulerOutput, budget: int,
                          exclude: Collection[Request], cap: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0 and len(out.sequences) < cap:
            req = self.running[i]
            if req in exclude:
                i += 1
                continue
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not (self._has_room(req, num_new)
                       or self.block_manager.allocate(req, num_new)):
                victim = next(r for r in reversed(self.running) if r not in exclude)
                self.running.remove(victim)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    return budget
            out.sequences.append(self._scheduled(req, num_new))
            budget -= num_new
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, cap: int) -> None:
        deferred: list[Request] = []  # siblings waiting for their leader's prompt blocks
        while (self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
               and len(out.sequences) < cap):
            req = self.waiting[0]
            shared = self._sibling_prefix(req)
            if shared is None:
                deferred.append(self.waiting.popleft())
                continue
            reserved = self._reserve(req, shared, budget)
            if reserved is None:
                break
            num_cached, num_new = reserved
            self.waiting.popleft()
            self._admit(req, num_cached)
            out.sequences.append(self._scheduled(req, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(deferred))

    def _reserve(self, req: Request, shared: list[int], budget: int) -> tuple[int, int] | None:
        """Blocks for a waiting sequence's first chunk: its swapped-out KV copied back, else
        its longest cached prefix (either tier, or its leader's prompt blocks) plus new ones.
        (tokens already computed, tokens to compute), or None when it does not fit."""
        bm = self.block_manager
        if req.swapped_block_ids:
            num_cached, hit = req.num_swapped_tokens, None
        elif req.sampling_params.prompt_logprobs is not None and (
                req.status is RequestStatus.WAITING):
            # its prompt's logprobs come from computing it: a cached prefix would skip them
            # (its siblings' shared blocks are the leader's, which computes them)
            hit = PrefixHit(list(shared), [None] * len(shared))
            num_cached = len(hit) * bm.block_size
        else:
            hit = bm.find_prefix(req)
            if len(shared) > len(hit):
                hit = PrefixHit(list(shared), [None] * len(shared))
            num_cached = len(hit) * bm.block_size
        remaining = req.num_tokens - num_cached
        num_new = min(remaining, budget)
        if num_new < remaining and not self.config.enable_chunked_prefill:
            return None
        fits = bm.swap_in(req, num_new) if hit is None else bm.allocate(req, num_new, hit)
        return (num_cached, num_new) if fits else None

    def _admit(self, req: Request, num_cached: int) -> None:
        if req.status is RequestStatus.WAITING:
            req.num_cached_tokens = num_cached
            req.scheduled_time = time.monotonic()
        self.num_recomputed_tokens += max(req.num_discarded_tokens - num_cached, 0)
        req.num_discarded_tokens = 0
        if req.sampling_params.n > 1 and req.parent_id is not None:
            self._leaders.setdefault(req.parent_id, req)
        req.status = RequestStatus.RUNNING
        req.num_computed_tokens = num_cached
        self.running.append(req)

    def _sibling_prefix(self, req: Request) -> list[int] | None:
        """The full prompt blocks that ``req`` shares with its leader (the first of its ``n``
        siblings admitted, which prefills the prompt once); None while the leader has not
        computed them yet (``req`` waits), [] when there is nothing to share."""
        num_full = (req.num_prompt_tokens - 1) // self.block_manager.block_size
        leader = self._leaders.get(req.parent_id or "")
        if (num_full == 0 or leader is None or leader is req
                or req.status is not RequestStatus.WAITING):
            return []
        if leader.num_computed_tokens < num_full * self.block_manager.block_size:
            return None
        return leader.block_ids[:num_full]

    def _has_room(self, req: Request, num_new: int) -> bool:
        """True when the request's blocks already hold ``num_new`` more tokens (most decodes)."""
        capacity = len(req.block_ids) * self.block_manager.block_size
        return req.num_computed_tokens + num_new <= capacity

    def _scheduled(self, req: Request, num_new: int) -> ScheduledSequence:
        sample = req.num_computed_tokens + num_new == req.num_tokens
        self.num_partial_prefills += not sample
        if req.num_computed_tokens < req.num_prompt_tokens:
            self.num_prompt_tokens_computed += min(num_new,
                                                   req.num_prompt_tokens - req.num_computed_tokens)
        return ScheduledSequence(req, num_new, sample)

    def _preempt(self, req: Request) -> None:
        bm = self.block_manager
        num_blocks = bm.can_swap_out(req)
        if num_blocks and self.kv_rates.swap_is_cheaper(num_blocks * self.kv_block_bytes,
                                                        req.num_computed_tokens):
            bm.swap_out(req)
            self.num_swapped_preemptions += 1
        else:
            bm.free(req)
            req.num_discarded_tokens = req.num_computed_tokens
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update(self, out: SchedulerOutput, sampled: list[int | None]) -> list[Request]:
        """Advances each scheduled sequence and appends its sampled token (None where the
        chunk did not reach the end); returns the sequences that finished."""
        finished = []
        for seq, token in zip(out.sequences, sampled, strict=True):
            req = seq.request
            if req.is_finished:  # aborted while the step ran
                continue
            req.num_computed_tokens += seq.num_new_tokens
            self.block_manager.cache_computed_blocks(req)
            if token is not None:
                req.append_token(token)
                if req.is_finished:
                    finished.append(req)
        self._release(finished)
        return finished

    def finish(self, requests: Iterable[Request], status: RequestStatus,
               reason: int | str | None = None) -> None:
        """Ends sequences early (abort, stop string) and frees their blocks at once."""
        done = []
        for req in requests:
            if not req.is_finished:
                req.finish(status, reason)
            done.append(req)
        self._release(done)

    def _release(self, requests: list[Request]) -> None:
        for req in requests:
            if req.parent_id is not None and self._leaders.get(req.parent_id) is req:
                del self._leaders[req.parent_id]
            if req in self.running:
                self.running.remove(req)
            elif req in self.waiting:
                self.waiting.remove(req)
            self.block_manager.free(req)
