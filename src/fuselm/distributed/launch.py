"""Starting the processes of a distributed engine and joining them into process groups.

Two ways in, one layout (``rank = pp_rank * tp_size + tp_rank``; rank 0 runs the engine):

- **spawned** (one node, no launcher): ``fuselm generate|serve --tensor-parallel-size 2`` hosts a
  TCP store on 127.0.0.1 at a port the OS picks, and starts ranks 1..N-1 itself
  (``multiprocessing`` spawn). Rank 0 watches its children's liveness directly.
- **torchrun** (one node or many): ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` and the rendezvous come
  from torchrun; rank 0 runs the command, every other rank runs the worker loop
  (``cli.main`` sends it to ``run_torchrun_worker``).

GPUs use NCCL for device tensors and gloo for the CPU control plane (``cpu:gloo,cuda:nccl``);
CPUs use gloo. NCCL's NVLink multicast (NVLS) and symmetric-memory multicast stay off.
Every collective is bounded by ``--distributed-timeout``; see ``monitor`` for dead ranks.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fuselm.config import EngineConfig, ModelConfig, ParallelConfig, check_parallel_fits
from fuselm.distributed.monitor import Monitor, hard_exit
from fuselm.envs import torchrun_env
from fuselm.parallel import parallel_state as ps

logger = logging.getLogger(__name__)

# Set in every rank before any NCCL or symmetric-memory use (children inherit them).
ENV_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
LOAD_TIMEOUT_S = 1800.0  # model loading may take longer than one collective may


@dataclass
class DistributedContext:
    """This process's place in the distributed engine and what watches it."""

    rank: int
    world_size: int
    local_rank: int
    tp_size: int
    pp_size: int
    device: torch.device
    timeout: float
    store: dist.Store
    monitor: Monitor
    layer_partition: list[int] | None = None
    use_custom_all_reduce: bool | None = None  # None: where it works; False: NCCL only
    procs: dict[int, Any] = field(default_factory=dict)

    def min_over_ranks(self, value: int) -> int:
        """The smallest ``value`` over all ranks (a collective)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def store_barrier(self, name: str, timeout: float) -> None:
        """Waits until every rank reached ``name`` (through the store: a slow rank, e.g. still
        loading weights, may take longer than a collective's timeout)."""
        key = f"barrier/{name}"
        self.store.add(key, 1)
        deadline = time.monotonic() + timeout
        while (count := self.store.add(key, 0)) < self.world_size:
            if self.monitor.failure is not None:
                raise RuntimeError(self.monitor.failure)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.world_size - count} ranks did not reach {name!r} "
                                   f"within {timeout:.0f} s")
            time.sleep(0.05)

    def prepare_runner(self, runner: Any, dtype: torch.dtype,
                       num_blocks: Callable[[Callable[[Any], Any]], int]) -> int:
        """After loading: custom all-reduce, then the KV block count every rank agrees on.

        ``num_blocks(execute)`` is the builder's sizing, given this stage's profiling step.
        """
        from fuselm.distributed.worker import stage_profile_execute
        from fuselm.parallel.custom_all_reduce import maybe_create_custom_all_reduce

        self.store_barrier("loaded", max(self.timeout, LOAD_TIMEOUT_S))
        ps.set_custom_all_reduce(maybe_create_custom_all_reduce(
            ps.get_tp_group(), self.device, dtype, self.store, self.rank,
            self.use_custom_all_reduce is not False))
        return self.min_over_ranks(num_blocks(stage_profile_execute(runner)))

    def shutdown(self) -> None:
        """Stops watching, joins spawned workers, destroys the process groups."""
        self.monitor.stop()
        deadline = time.monotonic() + min(self.timeout, 10.0)
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
        ps.destroy_model_parallel()
        if dist.is_initialized():
            _bounded(dist.destroy_process_group, seconds=min(self.timeout, 10.0))


def _bounded(fn: Any, seconds: float) -> None:
    """Runs ``fn`` in a daemon thread and waits at most ``seconds``: tearing down a NCCL
    communicator can block on a peer that already exited; the process then exits regardless."""
    done = threading.Thread(target=fn, name="fuselm-teardown", daemon=True)
    done.start()
    done.join(seconds)
    if done.is_alive():
        logger.warning("process-group teardown did not finish in %.0f s; exiting anyway",
                       seconds)


def world_size_of(parallel: ParallelConfig) -> int:
    """Ranks the configuration needs."""
    return parallel.tensor_parallel_size * parallel.pipeline_parallel_size


def is_torchrun_worker() -> bool:
    """True in a torchrun process other than rank 0 (it runs the worker loop, not the CLI)."""
    env = torchrun_env()
    return env is not None and env[0] != 0


def layer_partition(config: EngineConfig, model: ModelConfig) -> list[int] | None:
    """Checks tp x pp against the model (``config.check_parallel_fits``); returns the layer
    partition of ``--pipeline-layer-partition`` (None: an even split)."""
    check_parallel_fits(config, model)
    spec = config.parallel.pipeline_layer_partition
    return None if spec is None else [int(x) for x in spec.split(",")]


def _device_for(config: EngineConfig, local_rank: int) -> torch.device:
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r} requested but CUDA is not available")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} "
                         "visible); start one process per GPU")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(config: EngineConfig, model: ModelConfig) -> DistributedContext | None:
    """Joins (or, from a plain command, spawns) the ranks; None for a single process."""
    world = world_size_of(config.parallel)
    env = torchrun_env()
    if world == 1 and env is None:
        return None
    partition = layer_partition(config, model)
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if env is not None:
        rank, env_world, local_rank = env
        if env_world != world:
            raise ValueError(f"torchrun started {env_world} processes, but --tensor-parallel-size "
                             f"x --pipeline-parallel-size is {world}")
        return _join(config, rank, local_rank, None, {}, None, partition)
    timeout = timedelta(seconds=config.parallel.distributed_timeout)
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=timeout,
                          wait_for_workers=False)
    spawn = mp.get_context("spawn")
    procs = {}
    for rank in range(1, world):
        procs[rank] = spawn.Process(
            target=_spawned_worker_main, name=f"fuselm-rank{rank}", daemon=True,
            args=(config, rank, store.port, logging.getLogger().getEffectiveLevel()))
        procs[rank].start()
    return _join(config, 0, 0, store, procs, None, partition)


def _join(config: EngineConfig, rank: int, local_rank: int, store: dist.Store | None,
          procs: dict[int, Any], parent_pid: int | None,
          partition: list[int] | None) -> DistributedContext:
    """Process group + TP/PP groups over ``store`` (None: torchrun's env://), monitor started."""
    parallel = config.parallel
    world, timeout = world_size_of(parallel), parallel.distributed_timeout
    device = _device_for(config, local_rank)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    limit = timedelta(seconds=timeout)
    monitor_store = None
    if store is not None:
        monitor_store = dist.PrefixStore("fuselm/", store)
        monitor = Monitor(monitor_store, rank, world, timeout, procs, parent_pid)
        monitor.start()  # watches spawned children while the group forms
        dist.init_process_group(backend, store=dist.PrefixStore("pg/", store), rank=rank,
                                world_size=world, timeout=limit)
    else:
        dist.init_process_group(backend, timeout=limit)
        monitor_store = dist.PrefixStore("fuselm/", dist.distributed_c10d._get_default_store())
        monitor = Monitor(monitor_store, rank, world, timeout)
        monitor.start()
    ps.initialize_model_parallel(parallel.tensor_parallel_size, parallel.pipeline_parallel_size,
                                 timeout)
    monitor.arm()
    logger.info("rank %d/%d joined (pid %d, %s): tp rank %d, pp rank %d", rank, world,
                os.getpid(), device, ps.get_tp_rank(), ps.get_pp_rank())
    return DistributedContext(rank, world, local_rank, parallel.tensor_parallel_size,
                              parallel.pipeline_parallel_size, device, timeout, monitor_store,
                              monitor, partition, parallel.custom_all_reduce, procs)


def run_worker(config: EngineConfig, ctx: DistributedContext) -> None:
    """A worker rank's life: build its stage like rank 0 does, then serve plans until STOP."""
    from fuselm.distributed.worker import Worker
    from fuselm.engine.builder import build_engine_parts
    from fuselm.loading import loader

    source, model_config = loader.load_model_config(config)
    parts = build_engine_parts(config, source, model_config, ctx)
    Worker(parts.runner, model_config.vocab_size, not config.enforce_eager).run()
    ctx.shutdown()


def _worker_failed(rank: int, ctx: DistributedContext | None, exc: BaseException) -> None:
    traceback.print_exc()
    message = f"{type(exc).__name__}: {exc}"
    if ctx is not None:
        ctx.monitor.report_error(message)
        message = ctx.monitor.explain(exc)
    hard_exit(rank, f"failed: {message}")


def _spawned_worker_main(config: EngineConfig, rank: int, port: int, log_level: int) -> None:
    """Entry of a spawned rank (a child of rank 0)."""
    logging.basicConfig(level=log_level,
                        format=f"%(levelname)s rank{rank} %(name)s: %(message)s")
    ctx = None
    try:
        parent = os.getppid()
        world = world_size_of(config.parallel)
        timeout = timedelta(seconds=config.parallel.distributed_timeout)
        partition = layer_partition(config, _model_config(config))
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
        ctx = _join(config, rank, rank, store, {}, parent, partition)
        run_worker(config, ctx)
    except BaseException as exc:  # noqa: BLE001 - any failure: report it, exit non-zero
        _worker_failed(rank, ctx, exc)


def _model_config(config: EngineConfig) -> ModelConfig:
    from fuselm.loading import loader

    return loader.load_model_config(config)[1]


def run_torchrun_worker(config: EngineConfig) -> int:
    """Entry of a torchrun rank other than 0 (from ``cli.main``); its exit status."""
    env = torchrun_env()
    rank = env[0] if env else -1
    ctx = None
    try:
        ctx = init_distributed(config, _model_config(config))
        if ctx is None:
            raise RuntimeError("not a distributed configuration")
        run_worker(config, ctx)
    except BaseException as exc:  # noqa: BLE001
        _worker_failed(rank, ctx, exc)
    return 0
