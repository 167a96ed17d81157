"""What the engine's startup did, one log line per fact: model and format, dtype, device and
kernel backend, weights (and what ``--cpu-offload-gb`` streams), KV cache, ``max_model_len``,
CUDA graphs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from fuselm.engine import weight_offload

if TYPE_CHECKING:
    from fuselm.config import EngineConfig, ModelConfig
    from fuselm.engine.builder import EngineParts
    from fuselm.loading.loader import ModelSource

logger = logging.getLogger("fuselm.startup")
GIB = 2**30


def timed(fn: Callable[[], object]) -> float:
    """Runs ``fn()`` and returns the seconds it took."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes, count) of the model's parameters, a tied one counted once."""
    params = list(model.parameters())  # parameters() yields a shared tensor once
    return sum(p.numel() * p.element_size() for p in params), sum(p.numel() for p in params)


def quantization_text(model: torch.nn.Module, mc: ModelConfig) -> str:
    """Which quantization ran and the linear + LM head bytes a decode step reads (this rank)."""
    from fuselm.layers.quantization import describe, weight_bytes_per_step

    quant = mc.quantization.describe() if mc.quantization is not None else "none"
    methods = f" [{describe(model)}]" if mc.quantization is not None else ""
    step = weight_bytes_per_step(model)
    return f"quantization {quant}{methods}; a decode step reads {step / GIB:.3f} GiB of weights"


def _format_line(source: ModelSource) -> str:
    if source.gguf is not None:
        types = ", ".join(f"{name} x{count}" for name, count in
                          sorted(source.gguf.quant_types.items(), key=lambda kv: -kv[1]))
        return f"gguf ({types})"
    return "hf safetensors"


def startup_lines(config: EngineConfig, source: ModelSource, parts: EngineParts,
                  graph_seconds: float | None = None) -> list[str]:
    """The report's lines (see the module docstring); ``graph_seconds``: how long the CUDA
    graph capture took, None when there was none."""
    mc, runner = parts.model_config, parts.runner
    num_bytes, num_params = weight_bytes(runner.model)
    num_blocks = parts.block_manager.num_blocks
    block_size = config.cache.block_size
    kv_bytes = num_blocks * runner.kv_bytes_per_block(parts.dtype)
    if runner.graphs:
        graphs = f"CUDA graphs: batch sizes {sorted(runner.graphs)}" + (
            f", captured in {graph_seconds:.1f} s" if graph_seconds is not None else "")
    else:
        why = "--enforce-eager" if config.enforce_eager else f"not used on {parts.device.type}"
        graphs = f"CUDA graphs: none ({why})"
    return [
        f"model: {parts.model_name} ({mc.architecture}, {mc.num_hidden_layers} layers, "
        f"hidden {mc.hidden_size}) from {source.path}",
        f"format: {_format_line(source)}, load format {config.load_format}",
        f"dtype: {str(parts.dtype).removeprefix('torch.')} (--dtype {config.dtype})",
        f"device: {parts.device}; kernel backend: {config.kernel_backend}",
        f"weights: {num_bytes / GIB:.2f} GiB ({num_params / 1e6:.1f}M parameters); "
        + quantization_text(runner.model, mc),
        *([weight_offload.summary(parts.weight_offload)] if parts.weight_offload else []),
        f"KV cache: {num_blocks} blocks x {block_size} tokens = {num_blocks * block_size} "
        f"tokens, {kv_bytes / GIB:.2f} GiB",
        f"max_model_len: {parts.max_model_len}",
        graphs,
        f"startup: {parts.startup_seconds:.1f} s",
    ]


def log_startup(config: EngineConfig, source: ModelSource, parts: EngineParts,
                graph_seconds: float | None = None, rank: int = 0) -> None:
    """Logs the startup report at INFO (rank 0 only: every rank of a distributed engine has
    built the same model)."""
    if rank != 0:
        return
    for line in startup_lines(config, source, parts, graph_seconds):
        logger.info("%s", line)
