"""The composition root: builds an engine with a local or a distributed executor.

A single process (tensor x pipeline parallel size 1, no torchrun) gets a ``LocalExecutor`` and
never imports ``fuselm.distributed``. Otherwise this process joins (or spawns) the other ranks,
builds its own stage like every rank does, and becomes rank 0 with a ``DistributedExecutor``;
the other ranks run ``fuselm.distributed.launch.run_worker``.
"""

from __future__ import annotations

from fuselm.config import EngineConfig
from fuselm.engine.builder import build_engine_parts
from fuselm.engine.engine import LLMEngine
from fuselm.engine.executor import Executor, LocalExecutor
from fuselm.envs import torchrun_env
from fuselm.loading import loader


def needs_ranks(config: EngineConfig) -> bool:
    """True when the configuration runs on several processes (or under torchrun)."""
    world = config.parallel.tensor_parallel_size * config.parallel.pipeline_parallel_size
    return world > 1 or torchrun_env() is not None


def build_engine(config: EngineConfig) -> LLMEngine:
    """Loads the model (on every rank) and returns this process's engine."""
    source, model_config = loader.load_model_config(config)
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
