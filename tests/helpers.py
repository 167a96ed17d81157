"""Test helpers: running fuselm's model on prompts with logits at every position; replaying a
captured CUDA graph on fresh inputs."""

from __future__ import annotations

from collections.abc import Callable

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


def replay_on_fresh_input(step: Callable[[], None], x: torch.Tensor) -> None:
    """Runs ``step`` eagerly, captures it in a CUDA graph, refills ``x`` with new random values
    and replays the graph once (synchronized): what the graph wrote is then what it computed
    from the new ``x``, not what the eager run left behind."""
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
