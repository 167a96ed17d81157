"""Test helpers: running fuselm's model on prompts with logits at every position."""

from __future__ import annotations

import torch

from fuselm.engine.engine import LLMEngine
from fuselm.engine.request import Request
from fuselm.engine.scheduler import ScheduledSequence, SchedulerOutput
from fuselm.sampling_params import SamplingParams


@torch.inference_mode()
def all_position_logits(engine: LLMEngine, prompts: list[list[int]]) -> list[torch.Tensor]:
    """float32 logits ``[len(prompt), vocab]`` of every prompt, all prompts in ONE packed batch
    through the paged KV cache (blocks taken from and returned to the engine's manager)."""
    bm = engine.block_manager
    reqs = [Request(f"logits-{i}", list(p), SamplingParams()) for i, p in enumerate(prompts)]
    out = SchedulerOutput()
    for req in reqs:
        if not bm.allocate(req, req.num_tokens):
            raise RuntimeError("KV cache too small for the test prompts")
        out.sequences.append(ScheduledSequence(req, req.num_tokens, True))
    try:
        ids, pos, batch, _ = engine.runner.buffers.fill(out)
        hidden = engine.runner.model(ids, pos, batch)
        logits = engine.runner.model.compute_logits(hidden)
    finally:
        for req in reqs:
            bm.free(req)
    lengths = [len(p) for p in prompts]
    return list(torch.split(logits.float().cpu(), lengths))
