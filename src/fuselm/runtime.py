"""The composition root: builds an engine with a local or a distributed executor.

A single process (tensor x pipeline parallel size 1, no torchrun) gets a ``LocalExecutor`` and
never imports ``fuselm.distributed``. Otherwise this process joins (or spawns) the other ranks,
builds its own stage like every rank does, and becomes rank 0 with a ``DistributedExecutor``;
the other ranks run ``fuselm.distributed.launch.run_worker``.
"""

from __future__ import annotations

import importlib.util

import torch

from fuselm.config import (
    EngineConfig,
    check_cache_fits,
    check_implemented,
    check_parallel_fits,
)
from fuselm.engine.builder import build_engine_parts
from fuselm.engine.engine import LLMEngine
from fuselm.engine.executor import Executor, LocalExecutor
from fuselm.envs import torchrun_env, triton_interpret
from fuselm.errors import ConfigError
from fuselm.loading import loader


def needs_ranks(config: EngineConfig) -> bool:
    """True when the configuration runs on several processes (or under torchrun)."""
    world = config.parallel.tensor_parallel_size * config.parallel.pipeline_parallel_size
    return world > 1 or torchrun_env() is not None


def check_device(config: EngineConfig) -> None:
    """Raises ConfigError naming the flag when the device, the kernel backend or the number of
    ranks cannot run on this machine."""
    device, has_cuda = config.device, torch.cuda.is_available()
    num_gpus = torch.cuda.device_count() if has_cuda else 0
    if device.startswith("cuda") and not has_cuda:
        raise ConfigError(f"--device {device}: no CUDA device is available here (torch "
                          f"{torch.__version__}); use --device cpu or auto")
    if device.startswith("cuda:") and int(device[5:]) >= num_gpus:
        raise ConfigError(f"--device {device}: only {num_gpus} CUDA device(s) are visible")
    on_cuda = device.startswith("cuda") or (device == "auto" and has_cuda)
    backend = config.kernel_backend
    if backend == "cuda" and not on_cuda:
        raise ConfigError("--kernel-backend cuda needs a CUDA device; this run is on the CPU "
                          "(use auto or reference)")
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        raise ConfigError("--kernel-backend triton needs the triton package, not installed")
    if backend == "triton" and not on_cuda and not triton_interpret():
        raise ConfigError("--kernel-backend triton needs a CUDA device; this run is on the CPU, "
                          "where only Triton's interpreter (TRITON_INTERPRET=1, slow) runs it")
    if config.parallel.custom_all_reduce and not on_cuda:
        raise ConfigError("--custom-all-reduce needs CUDA devices (it is a one-shot all-reduce "
                          "over peer-mapped GPU memory); this run is on the CPU")
    world = config.parallel.tensor_parallel_size * config.parallel.pipeline_parallel_size
    if on_cuda and world > num_gpus and torchrun_env() is None:
        raise ConfigError(f"--tensor-parallel-size x --pipeline-parallel-size is {world}, but "
                          f"only {num_gpus} CUDA device(s) are visible")


def build_engine(config: EngineConfig) -> LLMEngine:
    """Loads the model (on every rank) and returns this process's engine."""
    check_device(config)  # first: it needs not even the model's config
    check_implemented(config)
    source, model_config = loader.load_model_config(config)  # checks --load-format too
    check_parallel_fits(config, model_config)
    check_cache_fits(config, model_config)
    executor: Executor
    if not needs_ranks(config):
        parts = build_engine_parts(config, source, model_config)
        executor = LocalExecutor(parts.runner)
        return LLMEngine(config, parts, executor)
    from fuselm.distributed.executor import DistributedExecutor
    from fuselm.distributed.launch import init_distributed

    ctx = init_distributed(config, model_config)
    if ctx is None:  # torchrun with a single rank
        parts = build_engine_parts(config, source, model_config)
        return LLMEngine(config, parts, LocalExecutor(parts.runner))
    parts = build_engine_parts(config, source, model_config, ctx)
    use_async = (parts.device.type == "cuda" if config.async_scheduling is None
                 else config.async_scheduling)
    executor = DistributedExecutor(parts.runner, ctx, model_config.vocab_size,
                                   capture_graphs=not config.enforce_eager,
                                   async_scheduling=use_async)
    return LLMEngine(config, parts, executor)
