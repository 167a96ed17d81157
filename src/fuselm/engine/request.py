"""One sequence being generated: its tokens, progress, KV blocks and stop conditions.

A request with ``n > 1`` is run as n sequences (``Request`` objects sharing a ``parent_id``):
the first one admitted prefills the prompt, the others share its full prompt blocks.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from fuselm.sampling_params import SamplingParams
from fuselm.structured.matcher import SequenceGrammar


class RequestStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        """True for the three finished states."""
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    """A sequence: prompt + generated tokens, how many have KV in the cache, and its blocks."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_tokens: int = 16
    """Tokens to generate at most (resolved against the context length)."""
    parent_id: str | None = None
    index: int = 0
    """Which of the parent's n sequences this is."""
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens whose KV is in the cache."""
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache at admission."""
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    """Chained hashes of this sequence's full blocks, computed once per block."""
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    generator: torch.Generator | None = None
    grammar: SequenceGrammar | None = None
    """Where the sequence is in its structured-output grammar (None: unconstrained)."""
    scheduled_time: float | None = None
    """When the sequence was first scheduled (time.monotonic)."""
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    swapped_block_ids: list[int] = field(default_factory=list)
    """CPU swap-space blocks holding this preempted sequence's KV (empty: not swapped)."""
    num_swapped_tokens: int = 0
    """Tokens whose KV is in ``swapped_block_ids``."""
    num_discarded_tokens: int = 0
    """Computed tokens dropped by its last preemption by recomputation."""

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by generated tokens."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens."""
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        """True once stopped, out of length, or aborted."""
        return self.status.finished

    def append_token(self, token_id: int) -> None:
        """Adds a sampled token and applies the stop checks on token ids and length."""
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.output_token_ids.append(token_id)
        params = self.sampling_params
        num_out = len(self.output_token_ids)
        if num_out >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                self.finish(RequestStatus.FINISHED_STOPPED, None)
                return
            if token_id in params.stop_token_ids:
                self.finish(RequestStatus.FINISHED_STOPPED, token_id)
                return
        if num_out >= self.max_tokens:
            self.finish(RequestStatus.FINISHED_LENGTH, None)

    def finish(self, status: RequestStatus, reason: int | str | None) -> None:
        """Marks the sequence finished (its blocks are freed by the scheduler)."""
        self.status = status
        self.stop_reason = reason
        self.finished_time = time.monotonic()
