"""Prompt logprobs (``SamplingParams.prompt_logprobs``): the logprob of every prompt token given
the tokens before it, read off the hidden states of the prefill chunks that compute them.

A chunk of a sequence covers positions ``[start, start + n)``; the hidden state at position p
predicts token p + 1, so a chunk yields the entries of prompt positions ``start + 1`` ..
``min(start + n, num_prompt - 1)``. Logits are made ``ROWS_PER_SLICE`` rows at a time so that a
long chunk never holds ``[n, vocab]`` float32 logits at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fuselm.engine.scheduler import SchedulerOutput

ROWS_PER_SLICE = 512

# (prompt position, {token id: logprob}) pairs of one sequence's chunk
PromptEntries = list[tuple[int, dict[int, float]]]


def wants_prompt_logprobs(out: SchedulerOutput) -> bool:
    """True when a sequence of ``out`` asks for prompt logprobs and this chunk covers some."""
    return any(s.request.sampling_params.prompt_logprobs is not None
               and s.request.num_computed_tokens + s.ahead + 1 < s.request.num_prompt_tokens
               for s in out.sequences)


def compute_prompt_logprobs(out: SchedulerOutput, hidden: torch.Tensor,
                            compute_logits: Callable[[torch.Tensor], torch.Tensor]
                            ) -> list[PromptEntries | None]:
    """Per scheduled sequence (in ``out``'s order, which is the flat batch's), the prompt
    entries its chunk computes, None where it asks for none. ``hidden``: the step's flat hidden
    states ``[num_tokens, hidden]`` (eager layout, no padding)."""
    result: list[PromptEntries | None] = []
    row0 = 0
    for seq in out.sequences:
        req, n = seq.request, seq.num_new_tokens
        k = req.sampling_params.prompt_logprobs
        start = req.num_computed_tokens + seq.ahead
        last = min(start + n, req.num_prompt_tokens - 1)  # the last position with a target
        if k is None or last <= start:
            result.append(None)
        else:
            targets = req.prompt_token_ids[start + 1 : last + 1]
            rows = hidden[row0 : row0 + len(targets)]
            result.append(_entries(rows, targets, start + 1, k, compute_logits))
        row0 += n
    return result


def _entries(rows: torch.Tensor, targets: list[int], first_pos: int, k: int,
             compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> PromptEntries:
    entries: PromptEntries = []
    for lo in range(0, len(targets), ROWS_PER_SLICE):
        hi = min(lo + ROWS_PER_SLICE, len(targets))
        logprobs = torch.log_softmax(compute_logits(rows[lo:hi]).float(), dim=-1)
        tgt = torch.tensor(targets[lo:hi], device=logprobs.device).unsqueeze(1)
        own = logprobs.gather(1, tgt).squeeze(1).tolist()
        if k > 0:
            top_lp, top_ids = logprobs.topk(k, dim=-1)
            tops = zip(top_ids.tolist(), top_lp.tolist(), strict=True)
        else:
            tops = (([], []) for _ in range(hi - lo))
        for i, (lp, (ids, lps)) in enumerate(zip(own, tops, strict=True)):
            entry = {targets[lo + i]: lp}
            for tid, tlp in zip(ids, lps, strict=True):
                entry.setdefault(tid, tlp)
            entries.append((first_pos + lo + i, entry))
    return entries
