"""Process groups of tensor and pipeline parallelism: the one place that holds them.

Ranks are laid out as ``rank = pp_rank * tp_size + tp_rank``: each pipeline stage is a
contiguous group of ``tp_size`` ranks. Without ``initialize_model_parallel`` every getter
answers as a single process (tp = pp = 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist


@dataclass
class _ParallelState:
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    tp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    world_group: dist.ProcessGroup | None = None
    custom_all_reduce: Any = None  # CustomAllReduce of the TP group, CUDA only


_STATE = _ParallelState()


def initialize_model_parallel(tp_size: int, pp_size: int, timeout: float | None = None) -> None:
    """Creates the TP and PP groups over an initialized default process group.

    ``timeout`` (seconds) bounds every collective of the new groups; None keeps torch's default.
    """
    global _STATE
    world = dist.get_world_size()
    if tp_size * pp_size != world:
        raise ValueError(f"tp_size {tp_size} x pp_size {pp_size} != world size {world}")
    rank = dist.get_rank()
    state = _ParallelState(tp_size=tp_size, pp_size=pp_size, world_group=dist.group.WORLD)
    state.tp_rank, state.pp_rank = rank % tp_size, rank // tp_size
    limit = timedelta(seconds=timeout) if timeout is not None else None
    for pp in range(pp_size):
        ranks = list(range(pp * tp_size, (pp + 1) * tp_size))
        group = dist.new_group(ranks, timeout=limit)
        if rank in ranks:
            state.tp_group = group
    for tp in range(tp_size):
        ranks = list(range(tp, world, tp_size))
        group = dist.new_group(ranks, timeout=limit)
        if rank in ranks:
            state.pp_group = group
    _STATE = state


def destroy_model_parallel() -> None:
    """Forgets the groups (the default process group is the caller's to destroy)."""
    global _STATE
    _STATE = _ParallelState()


def set_custom_all_reduce(impl: Any) -> None:
    """Installs (or, with None, removes) the low-latency all-reduce of the TP group."""
    _STATE.custom_all_reduce = impl


def get_custom_all_reduce() -> Any:
    """The TP group's CustomAllReduce, or None (NCCL/gloo only)."""
    return _STATE.custom_all_reduce


def get_tp_size() -> int:
    """Tensor-parallel world size."""
    return _STATE.tp_size


def get_tp_rank() -> int:
    """This process's rank inside its tensor-parallel group."""
    return _STATE.tp_rank


def get_pp_size() -> int:
    """Number of pipeline stages."""
    return _STATE.pp_size


def get_pp_rank() -> int:
    """This process's pipeline stage."""
    return _STATE.pp_rank


def get_tp_group() -> dist.ProcessGroup | None:
    """The tensor-parallel group (None when single-process)."""
    return _STATE.tp_group


def get_pp_group() -> dist.ProcessGroup | None:
    """The group of ranks with this tp_rank across stages (None when single-process)."""
    return _STATE.pp_group


def get_world_group() -> dist.ProcessGroup | None:
    """The default group of every rank (None when single-process)."""
    return _STATE.world_group


def is_first_pp_rank() -> bool:
    """True on the first pipeline stage."""
    return _STATE.pp_rank == 0


def is_last_pp_rank() -> bool:
    """True on the last pipeline stage."""
    return _STATE.pp_rank == _STATE.pp_size - 1
