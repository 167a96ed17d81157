"""Low-latency all-reduce of the tensor-parallel group for decode-sized messages (CUDA only).

A decode step of an 8B Llama runs 65 all-reduces of ``[batch, 4096]`` bf16; NCCL takes about
6 us for each inside the decode CUDA graph on 2 H100s, and each is followed by a residual add +
RMSNorm kernel. Here one kernel does all three (``fuselm.kernels.all_reduce``: every rank stores
its input straight into its peers' exchange buffers over NVLink/P2P and polls its own; no barrier,
no host synchronisation, captured in the graph like any other kernel and chained with
programmatic dependent launch, so that the next layer's GEMV streams its weights meanwhile).

The exchange buffers are PyTorch symmetric memory (peer-mapped; NVLink multicast is not used:
``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``, as everywhere in fuselm). Messages larger than
``max_bytes`` (prefill) and non-CUDA tensors go to NCCL.

Only built when the device is CUDA, the TP group has >= 2 ranks, all on this host, Triton is
there and symmetric memory can be set up; any failure at set-up leaves NCCL alone in charge (a
warning says why).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from fuselm.kernels import all_reduce as kernels

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 1 << 20  # 1 MiB: decode batches up to 128 x 4096 bf16; NCCL beyond
MAX_ROWS = 256  # one program a row; every program must be resident at once (they poll peers)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class CustomAllReduce:
    """One-shot sums over the TP group through peer-mapped exchange buffers.

    Every rank must make the same calls with the same shapes in the same order, as with any
    collective; ``should_use`` gives every rank the same answer for the same tensor.
    """

    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        self.dtype, self.max_bytes = dtype, max_bytes
        self.rank = dist.get_rank(group)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        self.max_numel = max_bytes // itemsize
        words = kernels.NUM_SLOTS * dist.get_world_size(group) * self.max_numel
        self.buffer = symm_mem.empty(words, dtype=kernels.word_dtype(dtype), device=device)
        self.buffer.fill_(kernels.empty_word(dtype))
        handle = symm_mem.rendezvous(self.buffer, group)
        ptrs = list(handle.buffer_ptrs)
        ptrs[self.rank] = self.buffer.data_ptr()  # the kernel stores at peers relative to this
        if any(p % 16 for p in ptrs):
            raise RuntimeError(f"exchange buffers must be 16-byte aligned, got {ptrs}")
        self.peers = torch.tensor(ptrs, dtype=torch.int64, device=device)
        self.state = torch.zeros(2, dtype=torch.int32, device=device)
        self._handle = handle  # keeps the peer mappings alive
        torch.cuda.synchronize(device)
        dist.barrier(group=group)  # every buffer is empty before any rank stores into it

    def should_use(self, x: torch.Tensor) -> bool:
        """True for a contiguous CUDA tensor of the buffer's dtype that fits the buffer."""
        return (x.is_cuda and x.dtype == self.dtype and 0 < x.numel() <= self.max_numel
                and x.dim() >= 1 and x.numel() // x.shape[-1] <= MAX_ROWS
                and x.is_contiguous())

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the TP group, shape and dtype of x (a new tensor)."""
        out = kernels.one_shot_all_reduce(x.view(-1, x.shape[-1]), self.peers, self.buffer,
                                          self.state, self.rank, self.max_numel)
        return out.view(x.shape)

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor,
                                weight: torch.Tensor, eps: float) -> None:
        """In place: ``residual += sum of x over the group``; ``x = rms_norm(residual)``."""
        kernels.one_shot_all_reduce_add_rms_norm(
            x.view(-1, x.shape[-1]), residual.view(-1, x.shape[-1]), weight, eps, self.peers,
            self.buffer, self.state, self.rank, self.max_numel)


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
    from fuselm.kernels import triton_utils

    if not triton_utils.triton_available():
        logger.warning("custom all-reduce off: it is a Triton kernel and Triton is missing")
        return None
    try:
        impl = CustomAllReduce(group, device, dtype)
    except Exception as exc:  # noqa: BLE001 - any set-up failure falls back to NCCL
        logger.warning("custom all-reduce off (%s); NCCL carries every all-reduce", exc)
        return None
    logger.info("custom one-shot all-reduce (+ add + RMSNorm) on for messages up to %d bytes",
                impl.max_bytes)
    return impl
