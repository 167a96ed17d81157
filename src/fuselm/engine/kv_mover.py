"""Copies KV blocks between the device cache and a pinned CPU cache of the same block layout,
and measures the copy and prefill rates that the scheduler's swap decision reads.

The CPU cache holds ``[num_cpu_blocks, block_size, kv_heads, head_size]`` K and V per layer
(the device cache's layout and dtype), swap space and prefix tier in one id space
(``fuselm.engine.kv_tiers``). A step's ``KVCopies`` run before its forward, on the device's
current stream: the forward needs every one of them (restored blocks are read, evicted ones
are overwritten), so a second stream would only add an event wait. Per layer tensor and
direction: one gather (``index_select``) or scatter (``index_copy_``) on the device through a
staging buffer, and one copy per run of consecutive CPU block ids (the tiers hand out
consecutive ids, so an evicted or restored prefix is one run). On a CPU device the same copies
run between two CPU tensors.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from fuselm.config import CacheConfig
from fuselm.engine.block_manager import BlockManager
from fuselm.engine.kv_tiers import BlockPair, KVCopies, TransferRates
from fuselm.errors import ConfigError

if TYPE_CHECKING:
    from fuselm.engine.model_runner import ModelRunner
    from fuselm.engine.scheduler import Scheduler

logger = logging.getLogger(__name__)

GIB = 1 << 30
# Forwards of at least this many tokens measure the prefill rate: shorter ones are dominated
# by per-step costs that a recomputation of a whole sequence (one long chunk) does not pay.
PREFILL_MIN_TOKENS = 128


def cpu_block_counts(cache: CacheConfig, bytes_per_block: int) -> tuple[int, int]:
    """(swap-space blocks, prefix-tier blocks) that ``--swap-space`` and
    ``--kv-offloading-size`` (GiB) hold, one block being ``bytes_per_block`` over all layers."""
    return (int(cache.swap_space * GIB // bytes_per_block),
            int(cache.kv_offloading_size * GIB // bytes_per_block))


def _movable(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _runs(cpu_ids: list[int]) -> list[tuple[int, int, int]]:
    """(first cpu id, offset in the list, length) of each run of consecutive ids."""
    runs: list[tuple[int, int, int]] = []
    for offset, block in enumerate(cpu_ids):
        if runs and runs[-1][0] + runs[-1][2] == block:
            start, off, n = runs[-1]
            runs[-1] = (start, off, n + 1)
        else:
            runs.append((block, offset, 1))
    return runs


class KVBlockMover:
    """The pinned CPU KV cache and the block copies to and from the device cache.

    ``kv_caches``: the device cache, ``(k, v)`` per layer, each
    ``[num_blocks, block_size, kv_heads, head_size]``; read and written in place.
    """

    def __init__(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], num_cpu_blocks: int,
                 rates: TransferRates) -> None:
        if num_cpu_blocks < 1:
            raise ValueError("the CPU KV cache needs at least one block")
        # one-byte (fp8) caches move as uint8 views: index ops need no fp8 kernels
        self.kv_caches = [tuple(_movable(t) for t in kv) for kv in kv_caches]
        self.rates = rates
        self.device = kv_caches[0][0].device
        pin = self.device.type == "cuda"
        self.cpu_caches = [tuple(torch.empty((num_cpu_blocks, *t.shape[1:]), dtype=t.dtype,
                                             pin_memory=pin) for t in kv)
                           for kv in self.kv_caches]
        self.bytes_per_block = sum(t[0].numel() * t.element_size() for kv in self.kv_caches
                                   for t in kv)
        self.bytes = {"to_cpu": 0, "to_gpu": 0}  # measured copies
        self.seconds = {"to_cpu": 0.0, "to_gpu": 0.0}
        self._pending: list[tuple[str, int, torch.cuda.Event, torch.cuda.Event]] = []

    @property
    def cpu_bytes(self) -> int:
        """Bytes of the CPU cache."""
        return sum(t.numel() * t.element_size() for kv in self.cpu_caches for t in kv)

    def gb_per_s(self, direction: str) -> float:
        """Measured rate of ``to_cpu`` or ``to_gpu`` copies (GB/s, 1e9 bytes), 0 before any."""
        self.poll()
        secs = self.seconds[direction]
        return self.bytes[direction] / secs / 1e9 if secs > 0 else 0.0

    def run(self, copies: KVCopies) -> None:
        """Queues the step's copies: every GPU -> CPU one, then every CPU -> GPU one."""
        self.poll()
        if copies.to_cpu:
            with self._timed("to_cpu", len(copies.to_cpu) * self.bytes_per_block):
                self._to_cpu(copies.to_cpu)
        if copies.to_gpu:
            with self._timed("to_gpu", len(copies.to_gpu) * self.bytes_per_block):
                self._to_gpu(copies.to_gpu)

    def _index(self, ids: list[int]) -> torch.Tensor:
        idx = torch.tensor(ids, dtype=torch.int64)
        if self.device.type != "cuda":
            return idx
        # pinned + non_blocking: a pageable copy would wait for the steps in flight
        return idx.pin_memory().to(self.device, non_blocking=True)

    def _to_cpu(self, pairs: list[BlockPair]) -> None:
        last = {cpu: gpu for gpu, cpu in pairs}  # a CPU block written twice keeps the later
        cpu_ids = sorted(last)
        gpu_idx = self._index([last[c] for c in cpu_ids])
        runs = _runs(cpu_ids)
        staging: torch.Tensor | None = None
        for kv, cpu_kv in zip(self.kv_caches, self.cpu_caches, strict=True):
            for src, dst in zip(kv, cpu_kv, strict=True):
                if staging is None or staging.shape[1:] != src.shape[1:]:
                    staging = torch.empty((len(cpu_ids), *src.shape[1:]), dtype=src.dtype,
                                          device=self.device)
                torch.index_select(src, 0, gpu_idx, out=staging)  # [n, block, heads, dim]
                for start, off, n in runs:
                    dst[start : start + n].copy_(staging[off : off + n], non_blocking=True)

    def _to_gpu(self, pairs: list[BlockPair]) -> None:
        by_gpu = dict(pairs)  # a GPU block written twice keeps the later
        order = sorted(by_gpu, key=lambda g: by_gpu[g])  # GPU ids in CPU-id order
        cpu_ids = [by_gpu[g] for g in order]
        gpu_idx = self._index(order)
        runs = _runs(cpu_ids)
        staging: torch.Tensor | None = None
        for kv, cpu_kv in zip(self.kv_caches, self.cpu_caches, strict=True):
            for dst, src in zip(kv, cpu_kv, strict=True):
                if staging is None or staging.shape[1:] != dst.shape[1:]:
                    staging = torch.empty((len(order), *dst.shape[1:]), dtype=dst.dtype,
                                          device=self.device)
                for start, off, n in runs:
                    staging[off : off + n].copy_(src[start : start + n], non_blocking=True)
                dst.index_copy_(0, gpu_idx, staging)

    @contextlib.contextmanager
    def _timed(self, kind: str, amount: int) -> Iterator[None]:
        """Times the work queued inside: ``amount`` bytes copied or tokens of a forward."""
        if self.device.type != "cuda":
            start = time.perf_counter()
            yield
            self._record(kind, amount, time.perf_counter() - start)
            return
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        yield
        end.record()
        self._pending.append((kind, amount, begin, end))

    @contextlib.contextmanager
    def timed_forward(self, num_tokens: int) -> Iterator[None]:
        """Measures a forward of ``num_tokens`` tokens into the prefill rate (long ones only)."""
        if num_tokens < PREFILL_MIN_TOKENS:
            yield
            return
        with self._timed("prefill", num_tokens):
            yield

    def _record(self, kind: str, amount: int, seconds: float) -> None:
        if kind == "prefill":
            self.rates.observe_prefill(amount, seconds)
            return
        self.bytes[kind] += amount
        self.seconds[kind] += seconds
        self.rates.observe_copy(amount, seconds)

    def poll(self) -> None:
        """Reads the timings of device copies and forwards that have completed."""
        still = []
        for kind, amount, begin, end in self._pending:
            if end.query():
                self._record(kind, amount, begin.elapsed_time(end) / 1000)
            else:
                still.append((kind, amount, begin, end))
        self._pending = still


def with_cpu_tiers(cache: CacheConfig, block_manager: BlockManager,
                   runner: ModelRunner) -> BlockManager:
    """The engine's block manager with ``--swap-space`` and ``--kv-offloading-size`` CPU
    blocks (the runner's CPU cache allocated to match); ``block_manager`` when both are 0."""
    if cache.swap_space <= 0 and cache.kv_offloading_size <= 0:
        return block_manager
    if cache.kv_offloading_size > 0 and not cache.enable_prefix_caching:
        raise ConfigError("--kv-offloading-size is a tier of the prefix cache: it needs "
                          "--enable-prefix-caching")
    bytes_per_block = sum(t[0].numel() * t.element_size() for kv in runner.kv_caches
                          for t in kv)
    num_swap, num_tier = cpu_block_counts(cache, bytes_per_block)
    for flag, gib, n in (("--swap-space", cache.swap_space, num_swap),
                         ("--kv-offloading-size", cache.kv_offloading_size, num_tier)):
        if gib > 0 and n == 0:
            raise ConfigError(f"{flag} {gib} GiB holds no KV block ({bytes_per_block} bytes "
                              "each); raise it")
    runner.allocate_cpu_kv_cache(num_swap + num_tier)
    logger.info("CPU KV cache: %d swap blocks + %d prefix-tier blocks (%.2f GiB pinned)",
                num_swap, num_tier, (num_swap + num_tier) * bytes_per_block / GIB)
    return BlockManager(block_manager.num_blocks, block_manager.block_size,
                        block_manager.enable_prefix_caching, num_swap, num_tier)


def kv_tier_stats(block_manager: BlockManager, mover: KVBlockMover | None,
                  scheduler: Scheduler) -> dict[str, float]:
    """Swap and CPU-tier counters for ``LLMEngine.stats`` (zeros without a CPU cache)."""
    per_block = mover.bytes_per_block if mover is not None else 0
    moved = block_manager.moved
    swap, tier = block_manager.swap, block_manager.cpu_tier
    num_cpu = (swap.num_blocks if swap else 0) + (tier.num_blocks if tier else 0)
    used = (swap.num_held if swap else 0) + (len(tier.lru) if tier else 0)
    return {
        "num_swapped_preemptions_total": scheduler.num_swapped_preemptions,
        "recomputed_tokens_total": scheduler.num_recomputed_tokens,
        "kv_swapped_out_bytes_total": moved["swap_out"] * per_block,
        "kv_swapped_in_bytes_total": moved["swap_in"] * per_block,
        "kv_offloaded_bytes_total": moved["offload"] * per_block,
        "kv_restored_bytes_total": moved["restore"] * per_block,
        "kv_restored_blocks_total": moved["restore"],
        "cpu_prefix_cache_hits_total": moved["restore"] * block_manager.block_size,
        "kv_to_gpu_gb_per_s": mover.gb_per_s("to_gpu") if mover else 0.0,
        "kv_to_cpu_gb_per_s": mover.gb_per_s("to_cpu") if mover else 0.0,
        "cpu_kv_cache_usage_perc": used / num_cpu if num_cpu else 0.0,
    }
