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
from fuselm.engine import startup_report, weight_offload
from fuselm.engine.block_manager import BlockManager
from fuselm.engine.model_runner import ModelRunner
from fuselm.errors import ConfigError
from fuselm.kernels.kernel_set import KernelSet
from fuselm.kernels.kv_quant import kv_cache_torch_dtype
from fuselm.layers import quantization
from fuselm.layers.embedding import VocabParallelEmbedding
from fuselm.layers.quantization.config import QuantizationConfig
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
    weight_offload: weight_offload.WeightOffloader | None = None


def load_tokenizer(source: loader.ModelSource) -> Tokenizer:
    """The tokenizer of ``--tokenizer``, else the one that ships with the checkpoint."""
    return Tokenizer.from_source(source)


def use_cpu_gemv_layout(model: torch.nn.Module) -> None:
    """Gives every 2-D float weight transposed storage ([in, out] in memory, same [out, in]
    view) on CPU; called before the weights load, so no weight is ever held twice.

    MKL's fp32 GEMV streams the transposed layout 1.3-1.7x faster (2-core EPYC, SmolLM2 shapes:
    16 -> 23-27 GB/s), and batch-1 decode on a CPU is that GEMV. Fresh storage from
    ``torch.empty`` becomes resident only as the loader writes it.
    """
    for name, param in model.named_parameters():
        if param.dim() == 2 and param.is_floating_point() and "norm" not in name:
            rows, cols = param.shape
            param.data = torch.empty(cols, rows, dtype=param.dtype, device=param.device).t()


def keep_q8_tables(model: torch.nn.Module) -> None:
    """Lets a float32, unquantized CPU model keep vocabulary tables that arrive as GGUF Q8_0
    blocks in them (``layers/q8_table.py``: the same numbers in a quarter of the memory, and a
    faster LM head)."""
    if model.config.quantization is not None:
        return  # the int8 LM head quantizes from the float rows
    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding) and module.weight.dtype == torch.float32:
            module.keep_q8_table = True


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


def _load_model(config: EngineConfig, source: loader.ModelSource, model_config: ModelConfig,
                max_model_len: int, dtype: torch.dtype, device: torch.device,
                kernels: KernelSet, dist_ctx: RankContext | None,
                ) -> tuple[torch.nn.Module, weight_offload.WeightOffloader | None]:
    """The model with its weights (checkpoint or dummy) in their final layout; with
    ``--cpu-offload-gb`` built without allocating, the offloaded layers in host memory and
    streamed in by the returned offloader (installed)."""
    offload = config.cpu_offload_gb > 0
    with weight_offload.deferred_parameters(offload):
        model = loader.build_model(model_config, max(max_model_len, 1), dtype, device,
                                   dist_ctx.layer_partition if dist_ctx else None, kernels)
    offloader = weight_offload.materialize(model, config.cpu_offload_gb, device) \
        if offload else None
    if device.type == "cpu":
        use_cpu_gemv_layout(model)
        keep_q8_tables(model)
    if config.load_format == "dummy" and offloader is not None:
        weight_offload.init_dummy(model, offloader, config.seed, loader.init_dummy_weights)
    elif config.load_format == "dummy":
        loader.init_dummy_weights(model, config.seed)
    else:
        if model_config.quantization is not None and model_config.quantization.source not in (
                "online", "gguf"):
            from fuselm.loading.quant_formats import convert

            model.quant_convert = convert  # pre-quantized tensors -> canonical layouts
        loader.load_weights(model, source, progress=dist_ctx is None or dist_ctx.rank == 0)
    quantization.process_weights_after_loading(model)  # online quantization, repacking
    if device.type == "cpu":
        loader.release_freed_heap()
    if offloader is not None:
        offloader.install()
    return model, offloader


def _int4_group(model: ModelConfig, tp: int, preferred: int) -> int:
    """The int4 group: ``preferred`` (128) where it divides every linear layer's input width
    on a tensor-parallel rank, else the largest power of two below it that does (SmolLM2's
    576-wide layers take 64), as GPTQ/AWQ checkpoints of such models do."""
    widths = [model.hidden_size, model.num_attention_heads * model.head_dim // tp,
              model.intermediate_size // tp]
    group = preferred
    while group >= 16:
        if all(w % group == 0 for w in widths):
            return group
        group //= 2
    raise ConfigError(f"--quantization int4: no group size from {preferred} down to 16 divides "
                      f"the layer widths {widths} (per tensor-parallel rank)")


def _gguf_quantization(config: EngineConfig, model_config: ModelConfig,
                       source: loader.ModelSource) -> ModelConfig:
    """A .gguf model with ``--quantization gguf``: its linear weights stay packed blocks."""
    name = config.quantization
    if source.gguf is None:
        raise ConfigError("--quantization gguf applies to .gguf models; this checkpoint is "
                          f"{source.format}")
    from fuselm.loading.gguf_quantization import packed_quantization

    quant = packed_quantization(source.gguf, loader.resolve_device(config.device), name)
    return model_config.replace(quantization=quant) if quant else model_config


def with_quantization(config: EngineConfig, model_config: ModelConfig,
                      source: loader.ModelSource | None = None) -> ModelConfig:
    """The model config with the quantization its layers run: the checkpoint's
    ``quantization_config`` (parsed by ``loading.quant_formats``; an unknown method or field
    value refused by name) or ``--quantization NAME`` (the float weights quantized at load);
    both together, or either with ``--cpu-offload-gb``, are refused."""
    name = config.quantization
    if name == "gguf":
        if source is None:
            raise ConfigError("--quantization gguf needs the .gguf source")
        return _gguf_quantization(config, model_config, source)
    if model_config.quantization_config and model_config.quantization is None:
        from fuselm.loading.quant_formats import parse

        model_config = model_config.replace(
            quantization=parse(model_config.quantization_config))
    if name is not None and model_config.quantization is not None:
        raise ConfigError(f"--quantization {name}: the checkpoint is quantized already "
                          f"({model_config.quantization.describe()}); drop the flag")
    if name is not None:
        quant = QuantizationConfig.online(name)
        if quant.group_size:
            quant = dataclasses.replace(quant, group_size=_int4_group(
                model_config, config.parallel.tensor_parallel_size, quant.group_size))
        if config.quantization_calibration == "gptq":
            quant = dataclasses.replace(quant, rounding="gptq")
        model_config = model_config.replace(quantization=quant)
    if model_config.quantization is not None and config.cpu_offload_gb > 0:
        raise ConfigError("--cpu-offload-gb is not implemented with quantized weights yet")
    return model_config


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
    model_config = with_quantization(config, model_config, source)
    device = dist_ctx.device if dist_ctx else loader.resolve_device(config.device)
    dtype = loader.resolve_dtype(config.dtype, device)
    max_model_len = config.scheduler.max_model_len or model_config.max_position_embeddings
    tokenizer = load_tokenizer(source)
    sched = _scheduler_config(config, max_model_len)
    kernels = KernelSet(config.kernel_backend, device, max_num_seqs=sched.max_num_seqs,
                        max_model_len=max_model_len)
    calibrated = None
    quant = model_config.quantization
    if quant is not None and quant.rounding == "gptq":  # before this model loads: one at a time
        from fuselm.engine import calibration

        calibrated = calibration.gptq_fp8_weights(config)
    model, offloader = _load_model(config, source, model_config, max_model_len, dtype, device,
                                   kernels, dist_ctx)
    if calibrated is not None:
        calibration.apply_fp8_weights(model, calibrated)
        del calibrated
    log_kernels(kernels)
    runner = ModelRunner(model, model_config.vocab_size, device, sched.max_num_batched_tokens,
                         sched.max_num_seqs, max_model_len, config.cache.block_size, kernels)
    runner.kv_cache_dtype = kv_cache_torch_dtype(config.cache.kv_cache_dtype, dtype)
    if offloader is not None:
        weight_offload.warn_if_fits(offloader, runner.kv_bytes_per_block(dtype) *
                                    runner.max_blocks_per_seq, config.cache.gpu_memory_utilization)
    if dist_ctx is None:
        num_blocks = _num_blocks(config, runner, dtype, sched, max_model_len)
    else:  # the smallest over ranks, each profiling its own stage
        num_blocks = dist_ctx.prepare_runner(runner, dtype, lambda execute: _num_blocks(
            config, runner, dtype, sched, max_model_len, execute))
    capacity = num_blocks * config.cache.block_size
    if capacity < max_model_len:
        raise ConfigError(
            f"the KV cache holds {capacity} tokens, fewer than max_model_len {max_model_len}; "
            "raise --gpu-memory-utilization or --cpu-offload-gb, or lower --max-model-len")
    runner.allocate_kv_cache(num_blocks, dtype)
    graph_seconds = None
    if not config.enforce_eager and (dist_ctx is None or dist_ctx.pp_size == 1):
        # TP ranks capture together; stages: their StageRunner
        graph_seconds = startup_report.timed(runner.capture_cuda_graphs)
    block_manager = BlockManager(num_blocks, config.cache.block_size,
                                 config.cache.enable_prefix_caching)
    parts = EngineParts(model_config, sched, tokenizer, runner, block_manager, max_model_len,
                        source.name, device, dtype, time.perf_counter() - start, offloader)
    startup_report.log_startup(config, source, parts, graph_seconds,
                               dist_ctx.rank if dist_ctx else 0)
    return parts
