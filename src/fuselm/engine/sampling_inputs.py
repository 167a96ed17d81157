"""Per-step SamplingTensors from the sequences that sample this step."""

from __future__ import annotations

import torch

from fuselm.engine.request import Request
from fuselm.layers.sampler import SamplingTensors
from fuselm.structured.bitmask import fill_token_bitmask
from fuselm.structured.compiler import bitmask_width


def _device_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` on ``device`` without waiting for it: through pinned memory on CUDA (a copy
    from pageable memory would first wait for the forward queued before it)."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def _penalty_inputs(reqs: list[Request], vocab_size: int, device: torch.device,
                    t: SamplingTensors) -> None:
    params = [r.sampling_params for r in reqs]
    if any(p.repetition_penalty != 1.0 for p in params):
        t.repetition = torch.tensor([p.repetition_penalty for p in params], device=device)
        seen = torch.zeros(len(reqs), vocab_size, dtype=torch.bool)
        for row, req in enumerate(reqs):
            ids = torch.tensor(req.all_token_ids, dtype=torch.int64)
            seen[row, ids[ids < vocab_size]] = True
        t.seen_mask = seen.to(device)
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        t.presence = torch.tensor([p.presence_penalty for p in params], device=device)
        t.frequency = torch.tensor([p.frequency_penalty for p in params], device=device)
        counts = torch.zeros(len(reqs), vocab_size)
        for row, req in enumerate(reqs):
            ids = torch.tensor(req.output_token_ids, dtype=torch.int64)
            ids = ids[ids < vocab_size]
            counts[row].index_add_(0, ids, torch.ones(len(ids)))
        t.output_counts = counts.to(device)


def _logit_bias(reqs: list[Request], vocab_size: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    rows, ids, bias = [], [], []
    for row, req in enumerate(reqs):
        for token, value in (req.sampling_params.logit_bias or {}).items():
            if 0 <= token < vocab_size:
                rows.append(row)
                ids.append(token)
                bias.append(value)
    if not rows:
        return None
    return (_device_tensor(rows, torch.int64, device), _device_tensor(ids, torch.int64, device),
            _device_tensor(bias, torch.float32, device))


def _token_bitmask(reqs: list[Request], vocab_size: int,
                   device: torch.device) -> torch.Tensor | None:
    grammars = [r.grammar for r in reqs]
    if all(g is None for g in grammars):
        return None
    # pinned through torch's caching host allocator, which keeps a block from reuse until
    # the copy that reads it has run
    host = torch.empty(len(reqs), bitmask_width(vocab_size), dtype=torch.int32,
                       pin_memory=device.type == "cuda")
    fill_token_bitmask(grammars, [r.output_token_ids for r in reqs], vocab_size, host)
    return host.to(device, non_blocking=True)


def build_sampling_tensors(reqs: list[Request], vocab_size: int,
                           device: torch.device) -> SamplingTensors:
    """Stacks the sampling parameters of ``reqs`` (one row each) on ``device``; advances the
    structured-output grammars of ``reqs`` by their new tokens and builds their token bitmask.

    Nothing here waits for the device, so the host work (the mask fill first) overlaps the
    forward queued before it."""
    bitmask = _token_bitmask(reqs, vocab_size, device)
    params = [r.sampling_params for r in reqs]
    temps = [0.0 if p.greedy else p.temperature for p in params]
    top_ks = [vocab_size if p.top_k in (-1, 0) else min(p.top_k, vocab_size) for p in params]
    # one pinned copy for the four per-row parameters (top_k is exact in float32 below 2**24)
    rows = _device_tensor([temps, top_ks, [p.top_p for p in params], [p.min_p for p in params]],
                          torch.float32, device)
    t = SamplingTensors(
        temperature=rows[0], top_k=rows[1].long(), top_p=rows[2], min_p=rows[3],
        all_greedy=all(x == 0.0 for x in temps),
        need_top_k=any(k < vocab_size for k in top_ks),
        need_top_p=any(p.top_p < 1.0 for p in params),
        need_min_p=any(p.min_p > 0.0 for p in params),
    )
    _penalty_inputs(reqs, vocab_size, device, t)
    t.logit_bias = _logit_bias(reqs, vocab_size, device)
    if any(r.generator is not None for r in reqs):
        t.generators = [r.generator for r in reqs]
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    t.max_logprobs = max(wanted) if wanted else -1
    t.token_bitmask = bitmask
    return t
