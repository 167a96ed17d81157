"""Low-latency all-reduce of the tensor-parallel group for decode-sized messages (CUDA only).

A decode step of an 8B Llama runs 64 all-reduces of ``[batch, 4096]`` bf16 (16 KiB at batch 2);
NCCL takes about 42 us for one such message on 2 H100s in an eager loop (issue 7), which alone
eats most of what TP=2 saves. A one-shot all-reduce does it in one kernel: every rank copies its
input into a buffer of symmetric memory (peer-mapped over NVLink/P2P), a barrier on the signal
pads, then every rank reads all peers' buffers and sums them locally. It needs no host
synchronisation, so it is captured in the decode CUDA graph like any other kernel.

The implementation is PyTorch's ``symm_mem::one_shot_all_reduce_copy`` on the CUDA symmetric
memory backend, with NVLink multicast disabled (``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``: multicast
objects are what NCCL's NVLS uses too, and they are off everywhere in fuselm). Messages larger
than ``max_bytes`` (prefill) and non-CUDA tensors go to NCCL.

Only built when the device is CUDA, the TP group has >= 2 ranks, all on this host, and the
symm_mem ops exist; any failure at set-up leaves NCCL alone in charge (a warning says why).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 1 << 20  # 1 MiB: decode batches up to 128 x 4096 bf16; NCCL beyond
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)  # what symm_mem's one-shot kernel dispatches


class CustomAllReduce:
    """One-shot sum over the TP group through a symmetric-memory staging buffer.

    ``all_reduce(x)`` returns a new tensor (the caller's ``x`` is not written). Every rank must
    call it with the same shapes in the same order, as with any collective.
    """

    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        self.group_name = group.group_name
        self.device, self.dtype, self.max_bytes = device, dtype, max_bytes
        itemsize = torch.empty(0, dtype=dtype).element_size()
        self.max_numel = max_bytes // itemsize
        self.buffer = symm_mem.empty(self.max_numel, dtype=dtype, device=device)
        self.handle = symm_mem.rendezvous(self.buffer, group)
        self._op = torch.ops.symm_mem.one_shot_all_reduce_copy
        self.num_calls = 0

    def should_use(self, x: torch.Tensor) -> bool:
        """True for a contiguous CUDA tensor of the buffer's dtype that fits the buffer (in
        whole 16-byte vectors, as the kernel reads them)."""
        return (x.is_cuda and x.dtype == self.dtype and x.numel() <= self.max_numel
                and x.is_contiguous() and (x.numel() * x.element_size()) % 16 == 0)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the TP group, shape and dtype of x."""
        self.num_calls += 1
        staging = self.buffer[: x.numel()]
        out = self._op(staging, x.view(-1), "sum", self.group_name)
        return out.view(x.shape)


def _tp_ranks_on_this_host(group: dist.ProcessGroup, store: dist.Store, rank: int) -> bool:
    import socket

    host = socket.gethostname()
    store.set(f"host/{rank}", host)
    peers = dist.get_process_group_ranks(group)
    return all(store.get(f"host/{r}").decode() == host for r in peers)


def maybe_create_custom_all_reduce(group: dist.ProcessGroup | None, device: torch.device,
                                   dtype: torch.dtype, store: dist.Store, rank: int,
                                   enabled: bool = True) -> CustomAllReduce | None:
    """A CustomAllReduce for the TP group where it can work, else None (NCCL fallback).

    Collective over the TP group: every TP rank must call it (with the same arguments).
    """
    if not enabled or group is None or device.type != "cuda" or dtype not in SUPPORTED_DTYPES:
        return None
    if dist.get_world_size(group) < 2 or not _tp_ranks_on_this_host(group, store, rank):
        return None
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy"):
        logger.warning("custom all-reduce off: this torch build has no symm_mem ops")
        return None
    try:
        impl = CustomAllReduce(group, device, dtype)
    except Exception as exc:  # noqa: BLE001 - any set-up failure falls back to NCCL
        logger.warning("custom all-reduce off (%s); NCCL carries every all-reduce", exc)
        return None
    logger.info("custom one-shot all-reduce on for messages up to %d bytes", impl.max_bytes)
    return impl
