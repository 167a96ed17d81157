"""One engine step as tensors: the plan that rank 0 sends to every other rank, and the sampled
result that comes back. Never pickled objects: a plan is two int64 CPU tensors (``pipeline``
sends a small payload inside the header's message).

- header ``[HEADER_LEN]``: the fields of ``StepHeader`` (kind, sizes, flags).
- payload ``[header.payload_len]``: flat arrays back to back::

      input_ids[T] positions[T] slot_mapping[T] seq_lens[S] query_start_loc[S + 1]
      logits_indices[R] block_tables[S * W]

  followed, when the plan carries sampling (``FLAG_SAMPLING``: the last pipeline stage samples,
  not rank 0), by ``L`` rows of sampling parameters::

      top_k[L] seed[L] generator_key[L] temperature/top_p/min_p/presence/frequency/repetition[L]
      logit_bias rows[B] ids[B] values[B] release_keys[K]
      (FLAG_PENALTIES) token_offsets[L + 1] prompt_lens[L] tokens[P]
      (FLAG_BITMASK) token_bitmask[L * ceil(V / 32)] (structured outputs; int32 words)

  Floats travel as the bits of float64 values, so they round to float32 exactly as
  ``build_sampling_tensors`` rounds them.

The batch arrays are the host halves of ``InputBuffers`` after ``fill``: rank 0 fills its
buffers from the schedule, every other rank writes the received arrays into its own buffers, so
CUDA graphs replay on the same persistent device tensors on every rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fuselm.engine.input_batch import InputBuffers
from fuselm.engine.request import Request
from fuselm.forward_batch import ForwardBatch
from fuselm.layers.sampler import SamplerOutput, SamplingTensors
from fuselm.structured.bitmask import fill_token_bitmask
from fuselm.structured.compiler import bitmask_width

KIND_STEP, KIND_NOOP, KIND_STOP = 0, 1, 2
FLAG_SAMPLING, FLAG_PENALTIES, FLAG_BITMASK = 1, 2, 16
# async scheduling (one pipeline stage): every rank keeps its greedy tokens of the step on the
# device (KEEP_ARGMAX), and a plan sent before rank 0 has read them takes them as input ids
# (DEVICE_INPUTS) instead of the payload's placeholders.
FLAG_KEEP_ARGMAX, FLAG_DEVICE_INPUTS = 4, 8


@dataclass
class StepHeader:
    """Fixed-size description of one plan (every field an int)."""

    kind: int = KIND_STEP
    step_id: int = 0
    num_tokens: int = 0  # T, padded to the graph size for a graph step
    num_seqs: int = 0  # S, padded likewise
    num_real_seqs: int = 0  # sequences of the schedule
    num_logits: int = 0  # rows that sample
    num_logit_rows: int = 0  # R: logits_indices length (S when padded)
    max_query_len: int = 0
    max_seq_len: int = 0
    width: int = 0  # W: block-table columns sent
    graph_size: int = 0  # decode CUDA graph to replay; 0 = eager
    payload_len: int = 0
    num_sample_rows: int = 0  # L
    max_logprobs: int = -1
    num_bias: int = 0  # B
    num_release: int = 0  # K
    num_penalty_tokens: int = 0  # P
    flags: int = 0

    def to_tensor(self) -> torch.Tensor:
        """int64 ``[HEADER_LEN]``."""
        return torch.tensor(dataclasses.astuple(self), dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> StepHeader:
        """Reads a header tensor."""
        return cls(*t.tolist())


HEADER_LEN = len(dataclasses.fields(StepHeader))


class _Reader:
    """Consumes a flat int64 payload front to back."""

    def __init__(self, payload: torch.Tensor) -> None:
        self.payload, self.pos = payload, 0

    def take(self, n: int) -> torch.Tensor:
        out = self.payload[self.pos : self.pos + n]
        self.pos += n
        return out

    def floats(self, n: int) -> torch.Tensor:
        return self.take(n).view(torch.float64)


def _f64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).view(torch.int64)


def encode_batch(buffers: InputBuffers, batch: ForwardBatch, num_logits: int,
                 num_real_seqs: int, graph_size: int | None
                 ) -> tuple[StepHeader, list[torch.Tensor]]:
    """Header fields and payload parts of a batch that ``buffers.fill`` just wrote."""
    t = batch.slot_mapping.shape[0]
    s = batch.seq_lens.shape[0]
    r = batch.logits_indices.shape[0]
    w = min(batch.block_tables.shape[1], max(1, -(-batch.max_seq_len // buffers.block_size)))
    parts = [buffers.h_input_ids[:t], buffers.h_positions[:t], buffers.h_slots[:t],
             buffers.h_seq_lens[:s], buffers.h_qsl[: s + 1], buffers.h_logits_idx[:r],
             buffers.h_block_tables[:s, :w].reshape(-1)]
    header = StepHeader(num_tokens=t, num_seqs=s, num_real_seqs=num_real_seqs,
                        num_logits=num_logits, num_logit_rows=r,
                        max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len,
                        width=w, graph_size=graph_size or 0)
    return header, [p.to(torch.int64) for p in parts]


def decode_batch(header: StepHeader, payload: torch.Tensor, buffers: InputBuffers
                 ) -> tuple[torch.Tensor, torch.Tensor, ForwardBatch]:
    """Writes a received plan's arrays into ``buffers``; returns ids, positions and batch."""
    h = header
    t, s, w = h.num_tokens, h.num_seqs, h.width
    buffers.wait_for_copies()
    reader = _Reader(payload)
    for dst, n in ((buffers.h_input_ids, t), (buffers.h_positions, t), (buffers.h_slots, t),
                   (buffers.h_seq_lens, s), (buffers.h_qsl, s + 1),
                   (buffers.h_logits_idx, h.num_logit_rows)):
        dst[:n].copy_(reader.take(n))
    buffers.h_block_tables[:s, :w].copy_(reader.take(s * w).view(s, w))
    ids, pos, batch, _ = buffers.to_device(t, s, h.num_logits, h.max_query_len,
                                           h.max_seq_len, w, h.graph_size or None)
    return ids, pos, batch


def batch_payload_len(header: StepHeader) -> int:
    """Length of the batch part of the payload (the sampling part follows)."""
    h = header
    return 3 * h.num_tokens + 2 * h.num_seqs + 1 + h.num_logit_rows + h.num_seqs * h.width


def encode_sampling(reqs: list[Request], vocab_size: int, key_of: Callable[[Request], int],
                    release: list[int], header: StepHeader) -> list[torch.Tensor]:
    """Payload parts of the sampling rows ``reqs``; sets the header's sampling fields."""
    params = [r.sampling_params for r in reqs]
    top_k = [vocab_size if p.top_k in (-1, 0) else min(p.top_k, vocab_size) for p in params]
    seeds = [-1 if p.seed is None else p.seed + r.index for p, r in zip(params, reqs,
                                                                       strict=True)]
    keys = [0 if p.seed is None else key_of(r) for p, r in zip(params, reqs, strict=True)]
    floats = [0.0 if p.greedy else p.temperature for p in params]
    for name in ("top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):
        floats += [getattr(p, name) for p in params]
    bias = [(row, tok, val) for row, p in enumerate(params)
            for tok, val in (p.logit_bias or {}).items() if 0 <= tok < vocab_size]
    parts = [torch.tensor(top_k + seeds + keys, dtype=torch.int64), _f64(floats),
             torch.tensor([b[0] for b in bias] + [b[1] for b in bias], dtype=torch.int64),
             _f64([b[2] for b in bias]), torch.tensor(release, dtype=torch.int64)]
    header.flags |= FLAG_SAMPLING
    if any(p.uses_penalties for p in params):
        header.flags |= FLAG_PENALTIES
        tokens = [r.all_token_ids for r in reqs]
        offsets = [0]
        for ids in tokens:
            offsets.append(offsets[-1] + len(ids))
        parts += [torch.tensor(offsets + [r.num_prompt_tokens for r in reqs], dtype=torch.int64),
                  torch.tensor([t for ids in tokens for t in ids], dtype=torch.int64)]
        header.num_penalty_tokens = offsets[-1]
    if any(r.grammar is not None for r in reqs):  # the mask is rank 0's: it owns the grammars
        header.flags |= FLAG_BITMASK
        bitmask = fill_token_bitmask([r.grammar for r in reqs],
                                     [r.output_token_ids for r in reqs], vocab_size)
        parts.append(bitmask.flatten().to(torch.int64))
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    header.num_sample_rows, header.num_bias, header.num_release = len(reqs), len(bias), len(release)
    header.max_logprobs = max(wanted) if wanted else -1
    return parts


def decode_sampling(header: StepHeader, payload: torch.Tensor, vocab_size: int,
                    device: torch.device, generators: dict[int, torch.Generator]
                    ) -> SamplingTensors:
    """SamplingTensors equal to ``build_sampling_tensors`` of the rows rank 0 encoded.

    ``generators`` (key -> generator of a seeded sequence) persists across steps on the
    sampling rank: created from the seed at a sequence's first sample, dropped when released.
    """
    h, n = header, header.num_sample_rows
    reader = _Reader(payload[batch_payload_len(header):])
    top_k, seeds, keys = reader.take(n), reader.take(n).tolist(), reader.take(n).tolist()
    temp, top_p, min_p, presence, frequency, repetition = (reader.floats(n) for _ in range(6))
    bias_rows, bias_ids, bias_vals = reader.take(h.num_bias), reader.take(h.num_bias), \
        reader.floats(h.num_bias)
    for key in reader.take(h.num_release).tolist():
        generators.pop(key, None)
    t = SamplingTensors(
        temperature=temp.float().to(device), top_k=top_k.to(device),
        top_p=top_p.float().to(device), min_p=min_p.float().to(device),
        all_greedy=bool((temp == 0.0).all()), need_top_k=bool((top_k < vocab_size).any()),
        need_top_p=bool((top_p < 1.0).any()), need_min_p=bool((min_p > 0.0).any()))
    if h.flags & FLAG_PENALTIES:
        offsets, prompt_lens = reader.take(n + 1).tolist(), reader.take(n).tolist()
        tokens = reader.take(h.num_penalty_tokens)
        rows = [tokens[offsets[i] : offsets[i + 1]] for i in range(n)]
        _penalties(t, rows, prompt_lens, repetition, presence, frequency, vocab_size, device)
    if h.flags & FLAG_BITMASK:
        width = bitmask_width(vocab_size)
        t.token_bitmask = reader.take(n * width).to(torch.int32).view(n, width).to(device)
    if h.num_bias:
        t.logit_bias = (bias_rows.to(device), bias_ids.to(device), bias_vals.float().to(device))
    if any(s >= 0 for s in seeds):
        t.generators = [None if s < 0 else _generator(generators, k, s, device)
                        for s, k in zip(seeds, keys, strict=True)]
    t.max_logprobs = h.max_logprobs
    return t


def _generator(generators: dict[int, torch.Generator], key: int, seed: int,
               device: torch.device) -> torch.Generator:
    if key not in generators:
        generators[key] = torch.Generator(device=device).manual_seed(seed)
    return generators[key]


def _penalties(t: SamplingTensors, rows: list[torch.Tensor], prompt_lens: list[int],
               repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor,
               vocab_size: int, device: torch.device) -> None:
    n = len(rows)
    if bool((repetition != 1.0).any()):
        t.repetition = repetition.float().to(device)
        seen = torch.zeros(n, vocab_size, dtype=torch.bool)
        for row, ids in enumerate(rows):
            seen[row, ids[ids < vocab_size]] = True
        t.seen_mask = seen.to(device)
    if bool((presence != 0.0).any() or (frequency != 0.0).any()):
        t.presence, t.frequency = presence.float().to(device), frequency.float().to(device)
        counts = torch.zeros(n, vocab_size)
        for row, ids in enumerate(rows):
            out = ids[prompt_lens[row]:]
            out = out[out < vocab_size]
            counts[row].index_add_(0, out, torch.ones(len(out)))
        t.output_counts = counts.to(device)


def result_len(num_rows: int, max_logprobs: int) -> int:
    """int64 elements of an encoded SamplerOutput."""
    if max_logprobs < 0:
        return num_rows
    return num_rows * (2 + 2 * max_logprobs)


def encode_result(out: SamplerOutput, max_logprobs: int) -> torch.Tensor:
    """Token ids, then (when asked) logprobs as float64 bits and top ids: one CPU tensor."""
    parts = [out.token_ids.to(torch.int64)]
    if max_logprobs >= 0:
        lps = [out.sampled_logprobs[:, None]]
        if max_logprobs > 0:
            lps.append(out.top_logprobs)
        parts.append(torch.cat(lps, dim=1).double().reshape(-1).view(torch.int64))
        if max_logprobs > 0:
            parts.append(out.top_ids.to(torch.int64).reshape(-1))
    return torch.cat([p.cpu() for p in parts])


def decode_result(t: torch.Tensor, num_rows: int, max_logprobs: int) -> SamplerOutput:
    """Inverse of ``encode_result`` (float32 logprobs, as the sampler returns them)."""
    reader = _Reader(t)
    out = SamplerOutput(token_ids=reader.take(num_rows))
    if max_logprobs >= 0:
        k = max_logprobs
        lps = reader.floats(num_rows * (1 + k)).float().view(num_rows, 1 + k)
        out.sampled_logprobs = lps[:, 0]
        if k > 0:
            out.top_logprobs = lps[:, 1:]
            out.top_ids = reader.take(num_rows * k).view(num_rows, k)
    return out
