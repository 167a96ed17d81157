"""Sampling on the device: the structured-output token mask, logit bias, penalties, temperature,
top-k, top-p, min-p, then a draw.

Processing follows Hugging Face's order (bias, repetition, presence/frequency, temperature,
top-k, top-p, min-p) so that the filtered distributions agree with its logits processors.
A row with a seed draws from its own generator, so its tokens do not depend on the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

MIN_TEMPERATURE = 1e-5
"""Lower temperatures sample greedily (vLLM's bound): dividing by them overflows float32."""


@dataclass
class SamplingTensors:
    """Per-row parameters of one step, on the logits' device. Rows are sequences needing a token.

    ``top_k`` holds the vocabulary size where off; penalty inputs are None when no row uses them.
    """

    temperature: torch.Tensor  # float32 [N]; 0 = greedy
    top_k: torch.Tensor  # int64 [N]
    top_p: torch.Tensor  # float32 [N]
    min_p: torch.Tensor  # float32 [N]
    all_greedy: bool
    need_top_k: bool
    need_top_p: bool
    need_min_p: bool
    presence: torch.Tensor | None = None  # float32 [N]
    frequency: torch.Tensor | None = None  # float32 [N]
    repetition: torch.Tensor | None = None  # float32 [N]
    output_counts: torch.Tensor | None = None  # float32 [N, V] counts of generated tokens
    seen_mask: torch.Tensor | None = None  # bool [N, V] prompt or generated tokens
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # rows, ids, bias
    generators: list[torch.Generator | None] | None = None
    max_logprobs: int = -1  # -1: no logprobs wanted
    # int32 [N, ceil(V / 32)]: bit j of word w set = token 32w + j allowed (structured outputs)
    token_bitmask: torch.Tensor | None = None


@dataclass
class SamplerOutput:
    """Sampled ids and, when asked, logprobs of the raw model distribution."""

    token_ids: torch.Tensor  # int64 [N]
    sampled_logprobs: torch.Tensor | None = None  # float32 [N]
    top_logprobs: torch.Tensor | None = None  # float32 [N, k]
    top_ids: torch.Tensor | None = None  # int64 [N, k]


def apply_penalties(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Repetition (HF: on prompt and output tokens), then presence/frequency (on output)."""
    if t.repetition is not None and t.seen_mask is not None:
        rep = t.repetition[:, None]
        penalized = torch.where(logits < 0, logits * rep, logits / rep)
        logits = torch.where(t.seen_mask, penalized, logits)
    if t.output_counts is not None:
        counts = t.output_counts
        if t.frequency is not None:
            logits = logits - t.frequency[:, None] * counts
        if t.presence is not None:
            logits = logits - t.presence[:, None] * (counts > 0).to(logits.dtype)
    return logits


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Masks (to -inf) tokens outside each row's top-k, then outside its top-p nucleus."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        kth = sorted_logits.gather(1, (top_k - 1).clamp(0, logits.shape[-1] - 1)[:, None])
        remove |= sorted_logits < kth  # ties with the k-th value are kept, as in HF
    if top_p is not None:
        masked = sorted_logits.masked_fill(remove, float("-inf"))
        probs = masked.softmax(dim=-1)
        mass_above = probs.cumsum(dim=-1) - probs
        nucleus_out = mass_above >= top_p[:, None]
        nucleus_out[:, 0] = False
        remove |= nucleus_out
    mask = torch.empty_like(remove).scatter_(1, order, remove)
    return logits.masked_fill(mask, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Masks tokens whose probability is below ``min_p`` times the top probability."""
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """The filtered, temperature-scaled logits that sampling draws from (float32 [N, V])."""
    logits = logits.float()
    if t.logit_bias is not None:
        rows, ids, bias = t.logit_bias
        logits = logits.index_put((rows, ids), bias, accumulate=True)
    logits = apply_penalties(logits, t)
    temp = torch.where(t.temperature >= MIN_TEMPERATURE, t.temperature,
                       torch.ones_like(t.temperature))
    logits = logits / temp[:, None]
    if t.need_top_k or t.need_top_p:
        logits = apply_top_k_top_p(logits, t.top_k if t.need_top_k else None,
                                   t.top_p if t.need_top_p else None)
    if t.need_min_p:
        logits = apply_min_p(logits, t.min_p)
    return logits


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` ``[N, V]`` with the tokens whose bit is clear in ``bitmask`` (int32
    ``[N, ceil(V / 32)]``, on the logits' device) set to -inf; a new tensor."""
    if bitmask.shape != (logits.shape[0], -(-logits.shape[1] // 32)):
        raise ValueError(f"bitmask {tuple(bitmask.shape)} does not cover logits "
                         f"{tuple(logits.shape)}")
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).flatten(1)[:, : logits.shape[1]]
    return logits.masked_fill(allowed == 0, float("-inf"))


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None] | None) -> torch.Tensor:
    """Exponential-race sampling: argmax(p / E), E ~ Exp(1), per-row generators where given."""
    noise = torch.empty_like(probs)
    if generators is None or all(g is None for g in generators):
        noise.exponential_()
    else:
        for row, gen in enumerate(generators):
            noise[row].exponential_(generator=gen)
    return (probs / noise).argmax(dim=-1)


def _torch_argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, t: SamplingTensors,
           argmax: Callable[[torch.Tensor], torch.Tensor] = _torch_argmax) -> SamplerOutput:
    """Picks one token per row; greedy rows take the argmax of the processed logits (with
    ``argmax``: the model's kernel, ``KernelSet.argmax``)."""
    raw = logits.float()
    if t.token_bitmask is not None:  # logprobs, like vLLM's, are of the masked logits
        raw = apply_token_bitmask(raw, t.token_bitmask)
    if t.all_greedy and t.logit_bias is None and t.output_counts is None \
            and t.seen_mask is None:
        token_ids = argmax(raw)
    else:
        processed = process_logits(raw, t)
        greedy_ids = argmax(processed)
        if t.all_greedy:
            token_ids = greedy_ids
        else:
            drawn = _draw(processed.softmax(dim=-1), t.generators)
            token_ids = torch.where(t.temperature >= MIN_TEMPERATURE, drawn, greedy_ids)
    out = SamplerOutput(token_ids=token_ids)
    if t.max_logprobs >= 0:
        logprobs = raw.log_softmax(dim=-1)
        out.sampled_logprobs = logprobs.gather(1, token_ids[:, None])[:, 0]
        if t.max_logprobs > 0:
            out.top_logprobs, out.top_ids = logprobs.topk(t.max_logprobs, dim=-1)
    return out
