"""Assembling the engine's parts from an EngineConfig: model, tokenizer, KV cache, graphs."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fuselm.config import EngineConfig, ModelConfig, SchedulerConfig
from fuselm.engine import startup_report
from fuselm.engine.block_manager import BlockManager
from fuselm.engine.model_runner import ModelRunner
from fuselm.errors import ConfigError
from fuselm.kernels.kernel_set import KernelSet
from fuselm.loading import loader
from fuselm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class EngineParts:
    """Everything ``LLMEngine`` is built from."""

    model_config: ModelConfig
    scheduler_config: SchedulerConfig
    tokenizer: Tokenizer
    runner: ModelRunner
    block_manager: BlockManager
    max_model_len: int
    model_name: str
    device: torch.device
    dtype: torch.dtype
    startup_seconds: float


def load_tokenizer(source: loader.ModelSource) -> Tokenizer:
    """The tokenizer of ``--tokenizer``, else the one that ships with the checkpoint."""
    return Tokenizer.from_source(source)


def use_cpu_gemv_layout(model: torch.nn.Module) -> None:
    """Stores every 2-D weight transposed ([in, out] in memory, same [out, in] view) on CPU.

    MKL's fp32 GEMV streams the transposed layout 1.3-1.7x faster (2-core EPYC, SmolLM2 shapes:
    16 -> 23-27 GB/s), and batch-1 decode on a CPU is that GEMV; the values are unchanged.
    """
    for name, param in model.named_parameters():
        if param.dim() == 2 and "norm" not in name:
            param.data = param.data.t().contiguous().t()


def _scheduler_config(config: EngineConfig, max_model_len: int) -> SchedulerConfig:
    sched = dataclasses.replace(config.scheduler, max_model_len=max_model_len)
    if not sched.enable_chunked_prefill and sched.max_num_batched_tokens < max_model_len:
        sched = dataclasses.replace(sched, max_num_batched_tokens=max_model_len)
    return sched


def _num_blocks(config: EngineConfig, runner: ModelRunner, dtype: torch.dtype,
                sched: SchedulerConfig, max_model_len: int,
                execute: Callable[[Any], Any] | None = None) -> int:
    cache = config.cache
    if cache.num_gpu_blocks is not None:
        return cache.num_gpu_blocks
    if runner.device.type == "cuda":
        from fuselm.engine.kv_sizing import profile_num_blocks

        return profile_num_blocks(runner, cache, dtype, sched.max_num_batched_tokens,
                                  sched.max_num_seqs, max_model_len, execute)
    from fuselm.engine.kv_sizing import cpu_num_blocks

    return cpu_num_blocks(cache, runner.kv_bytes_per_block(dtype), max_model_len,
                          sched.max_num_seqs)


def log_kernels(kernels: KernelSet) -> None:
    """One log line naming each op's eager and graph implementation."""
    parts = []
    for row in kernels.describe():
        choice = row["eager"] if row["eager"] == row["graph"] else \
            f"{row['eager']} | graph {row['graph']}"
        bucket = "" if row["bucket"] in ("default", "none") else f"[{row['bucket']}]"
        parts.append(f"{row['op']}{bucket}: {choice}")
    logger.info("kernels (%s on %s): %s", kernels.backend, kernels.device, "; ".join(parts))


class RankContext(Protocol):
    """What the builder needs of a rank of a distributed engine (``DistributedContext``)."""

    rank: int
    pp_size: int
    device: torch.device
    layer_partition: list[int] | None

    def prepare_runner(self, runner: ModelRunner, dtype: torch.dtype,
                       num_blocks: Callable[[Callable[[Any], Any]], int]) -> int:
        """The KV block count every rank agrees on, ``num_blocks(execute)`` measured here."""
        ...


def build_engine_parts(config: EngineConfig, source: loader.ModelSource,
                       model_config: ModelConfig,
                       dist_ctx: RankContext | None = None) -> EngineParts:
    """Loads the model and tokenizer, sizes and allocates the KV cache, captures CUDA graphs.

    ``dist_ctx``: this process's rank of a distributed engine (its TP shard of its PP stage);
    None for a single process. Pipeline stages capture their graphs in the stage runner.
    """
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    device = dist_ctx.device if dist_ctx else loader.resolve_device(config.device)
    dtype = loader.resolve_dtype(config.dtype, device)
    max_model_len = config.scheduler.max_model_len or model_config.max_position_embeddings
    tokenizer = load_tokenizer(source)
    sched = _scheduler_config(config, max_model_len)
    kernels = KernelSet(config.kernel_backend, device, max_num_seqs=sched.max_num_seqs,
                        max_model_len=max_model_len)
    model = loader.build_model(model_config, max(max_model_len, 1), dtype, device,
                               dist_ctx.layer_partition if dist_ctx else None, kernels)
    if config.load_format == "dummy":
        loader.init_dummy_weights(model, config.seed)
    else:
        loader.load_weights(model, source, progress=dist_ctx is None or dist_ctx.rank == 0)
    if device.type == "cpu":
        use_cpu_gemv_layout(model)
    log_kernels(kernels)
    runner = ModelRunner(model, model_config.vocab_size, device, sched.max_num_batched_tokens,
                         sched.max_num_seqs, max_model_len, config.cache.block_size, kernels)
    if dist_ctx is None:
        num_blocks = _num_blocks(config, runner, dtype, sched, max_model_len)
    else:  # the smallest over ranks, each profiling its own stage
        num_blocks = dist_ctx.prepare_runner(runner, dtype, lambda execute: _num_blocks(
            config, runner, dtype, sched, max_model_len, execute))
    capacity = num_blocks * config.cache.block_size
    if capacity < max_model_len:
        raise ConfigError(
            f"the KV cache holds {capacity} tokens, fewer than max_model_len {max_model_len}; "
            "raise --gpu-memory-utilization or lower --max-model-len")
    runner.allocate_kv_cache(num_blocks, dtype)
    graph_seconds = None
    if not config.enforce_eager and (dist_ctx is None or dist_ctx.pp_size == 1):
        # TP ranks capture together; stages: their StageRunner
        graph_seconds = startup_report.timed(runner.capture_cuda_graphs)
    block_manager = BlockManager(num_blocks, config.cache.block_size,
                                 config.cache.enable_prefix_caching)
    parts = EngineParts(model_config, sched, tokenizer, runner, block_manager, max_model_len,
                        source.name, device, dtype, time.perf_counter() - start)
    startup_report.log_startup(config, source, parts, graph_seconds,
                               dist_ctx.rank if dist_ctx else 0)
    return parts
