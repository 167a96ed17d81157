"""How many KV blocks fit: measured free GPU memory after a profiling forward pass; on a CPU,
what the configured sequences need (or ``--cpu-kv-cache-gib``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from fuselm.config import CacheConfig
from fuselm.engine.model_runner import ModelRunner
from fuselm.engine.request import Request
from fuselm.engine.scheduler import ScheduledSequence, SchedulerOutput
from fuselm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

GRAPH_AND_SAMPLER_RESERVE = 512 * 2**20  # bytes kept back for CUDA graphs' private pool
CPU_KV_CACHE_CAP = 2**30  # bytes: the automatic CPU cache's bound (--cpu-kv-cache-gib lifts it)
# (the logits buffer that the decode graphs share is kept back on top: ModelRunner)


def _profile_batch(max_num_tokens: int, max_num_seqs: int, max_model_len: int,
                   vocab_size: int) -> SchedulerOutput:
    """The largest step the scheduler can produce: many prompts filling the token budget."""
    out = SchedulerOutput()
    num_seqs = min(max_num_seqs, max_num_tokens)
    per_seq = max(1, min(max_model_len, max_num_tokens // num_seqs))
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=1)
    for i in range(num_seqs):
        req = Request(f"profile-{i}", [i % vocab_size] * per_seq, params)
        out.sequences.append(ScheduledSequence(req, per_seq, True))
    return out


def profile_num_blocks(runner: ModelRunner, cache: CacheConfig, dtype: torch.dtype,
                       max_num_tokens: int, max_num_seqs: int, max_model_len: int,
                       execute: Callable[[SchedulerOutput], Any] | None = None) -> int:
    """Blocks that fit in ``gpu_memory_utilization`` of the card after a profiling step
    (``execute``: how to run it, the runner's own step by default; a pipeline stage's own)."""
    device = runner.device
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    runner.allocate_kv_cache(1, dtype)
    batch = _profile_batch(max_num_tokens, max_num_seqs, max_model_len, runner.vocab_size)
    for seq in batch.sequences:
        seq.request.block_ids = [0] * runner.max_blocks_per_seq
    if execute is None:
        runner.launch(batch).result()
    else:
        execute(batch)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    _, total = torch.cuda.mem_get_info(device)
    reserve = GRAPH_AND_SAMPLER_RESERVE + runner.graph_logits_bytes()
    budget = total * cache.gpu_memory_utilization - peak - reserve
    num_blocks = int(budget // runner.kv_bytes_per_block(dtype))
    logger.info("KV cache: %d blocks (peak %.2f GiB during profiling, %.2f GiB total)",
                num_blocks, peak / 2**30, total / 2**30)
    return num_blocks


def cpu_num_blocks(cache: CacheConfig, bytes_per_block: int, max_model_len: int,
                   max_num_seqs: int) -> int:
    """KV blocks of a CPU cache: ``cpu_kv_cache_gib`` when given; else enough for
    ``max_num_seqs`` sequences of ``max_model_len`` tokens, at most ``CPU_KV_CACHE_CAP`` bytes;
    always at least one sequence of ``max_model_len`` tokens."""
    per_seq = -(-max_model_len // cache.block_size)
    if cache.cpu_kv_cache_gib is not None:
        blocks = int(cache.cpu_kv_cache_gib * 2**30) // bytes_per_block
    else:
        blocks = min(per_seq * max_num_seqs, CPU_KV_CACHE_CAP // bytes_per_block)
    return max(blocks, per_seq)
