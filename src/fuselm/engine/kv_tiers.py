"""The CPU side of the KV cache, as bookkeeping: swap space and the prefix cache's CPU tier.

Both live in one pinned CPU cache of ``num_swap_blocks + num_tier_blocks`` blocks (the GPU
cache's block layout, per layer): ids ``[0, num_swap_blocks)`` are swap space, the rest the
prefix tier. No tensor is touched here: the block manager decides the moves, and the
``KVCopies`` of a step travel in its ``SchedulerOutput`` to the model runner, which copies them
before the step's forward (``fuselm.engine.kv_mover``).

Order inside a step: every GPU -> CPU copy (swap out, offload) runs before every CPU -> GPU
copy (swap in, restore). A GPU block evicted and handed out again in the same step is read
before it is rewritten, and a block offloaded and hit again in the same step is written before
it is read. A CPU block read by this step's restores or swap-ins stays pinned until the step's
copies are taken (``BlockManager.take_copies``), so that no later copy of the step reuses it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

BlockPair = tuple[int, int]  # (gpu_block, cpu_block)
DECAY = 0.8  # weight of the past in the measured rates, per new measurement


@dataclass
class KVCopies:
    """The block moves of one step, each a list of ``(gpu_block, cpu_block)``."""

    swap_out: list[BlockPair] = field(default_factory=list)
    """A preempted sequence's blocks, GPU -> CPU swap space."""
    offload: list[BlockPair] = field(default_factory=list)
    """Full prefix blocks evicted from the GPU, GPU -> CPU tier."""
    swap_in: list[BlockPair] = field(default_factory=list)
    """A resumed sequence's blocks, CPU swap space -> GPU."""
    restore: list[BlockPair] = field(default_factory=list)
    """CPU-tier prefix hits, CPU tier -> GPU."""

    @property
    def to_cpu(self) -> list[BlockPair]:
        """GPU -> CPU moves, in the order they were decided."""
        return self.swap_out + self.offload

    @property
    def to_gpu(self) -> list[BlockPair]:
        """CPU -> GPU moves."""
        return self.swap_in + self.restore

    def __bool__(self) -> bool:
        return bool(self.swap_out or self.offload or self.swap_in or self.restore)


class SwapSpace:
    """CPU blocks ``[start, start + num_blocks)`` that preempted sequences are swapped to."""

    def __init__(self, start: int, num_blocks: int) -> None:
        self.start, self.num_blocks = start, num_blocks
        self.free_ids: list[int] = list(range(start + num_blocks - 1, start - 1, -1))
        self._held: set[int] = set()
        self._released: list[int] = []  # read by this step's swap-ins: free at take time

    @property
    def num_free(self) -> int:
        """Blocks that a swap-out can take now."""
        return len(self.free_ids)

    def take(self, n: int) -> list[int]:
        """``n`` free blocks, lowest ids first (consecutive ids copy as one run)."""
        if n > len(self.free_ids):
            raise RuntimeError(f"swap space has {len(self.free_ids)} free blocks, not {n}")
        ids = [self.free_ids.pop() for _ in range(n)]
        self._held.update(ids)
        return ids

    def release(self, ids: list[int], deferred: bool) -> None:
        """Returns blocks; ``deferred``: they are read by copies not yet taken."""
        for block in ids:
            if block not in self._held:
                raise RuntimeError(f"swap block {block} freed twice")
            self._held.remove(block)
        if deferred:
            self._released.extend(ids)
        else:
            self._give_back(ids)

    def end_step(self) -> None:
        """The step's copies are taken: blocks its swap-ins read become free."""
        self._give_back(self._released)
        self._released = []

    def _give_back(self, ids: list[int]) -> None:
        self.free_ids.extend(ids)
        self.free_ids.sort(reverse=True)  # pop() takes the lowest id

    @property
    def held(self) -> set[int]:
        """Blocks that swapped-out sequences hold (a copy)."""
        return set(self._held)

    @property
    def num_held(self) -> int:
        """How many blocks swapped-out sequences hold."""
        return len(self._held)


class CpuPrefixTier:
    """Full prefix blocks kept on the CPU after the GPU evicted them: hash -> CPU block, in
    LRU order (oldest first); a block being read this step is pinned and never evicted."""

    def __init__(self, start: int, num_blocks: int) -> None:
        self.start, self.num_blocks = start, num_blocks
        self.lru: OrderedDict[bytes, int] = OrderedDict()
        self.hash_of: dict[int, bytes] = {}
        self.free_ids: list[int] = list(range(start + num_blocks - 1, start - 1, -1))
        self.pinned: set[int] = set()

    def lookup(self, block_hash: bytes) -> int | None:
        """The CPU block holding ``block_hash``, if cached."""
        return self.lru.get(block_hash)

    def pin(self, block: int) -> None:
        """Marks ``block`` read by this step (most recently used, not evictable)."""
        self.lru.move_to_end(self.hash_of[block])
        self.pinned.add(block)

    def end_step(self) -> None:
        """The step's copies are taken: nothing is pinned any more."""
        self.pinned.clear()

    def store(self, block_hash: bytes) -> int | None:
        """A CPU block to copy an evicted GPU block of ``block_hash`` into; None when the hash
        is kept already (it is touched) or every block is pinned (the block is dropped)."""
        if block_hash in self.lru:
            self.lru.move_to_end(block_hash)
            return None
        if self.free_ids:
            block = self.free_ids.pop()
        else:
            victim = next((h for h, b in self.lru.items() if b not in self.pinned), None)
            if victim is None:
                return None
            block = self.lru.pop(victim)
            del self.hash_of[block]
        self.lru[block_hash] = block
        self.hash_of[block] = block_hash
        return block

    def clear(self) -> None:
        """Forgets every hash but those of pinned blocks (read by this step's restores)."""
        for block in [b for b in self.hash_of if b not in self.pinned]:
            del self.lru[self.hash_of.pop(block)]
            self.free_ids.append(block)
        self.free_ids.sort(reverse=True)


@dataclass
class TransferRates:
    """Measured rates that decide, per preempted sequence, whether swapping its KV blocks out
    and back costs less than recomputing its tokens. ``prefer`` overrides the measurement
    ("swap" / "recompute": tests and benchmarks)."""

    copy_bytes: float = 0.0
    copy_seconds: float = 0.0
    prefill_tokens: float = 0.0
    prefill_seconds: float = 0.0
    prefer: Literal["measured", "swap", "recompute"] = "measured"

    def observe_copy(self, num_bytes: int, seconds: float) -> None:
        """Adds a measured copy batch (either direction); older ones weigh less."""
        self.copy_bytes = DECAY * self.copy_bytes + num_bytes
        self.copy_seconds = DECAY * self.copy_seconds + seconds

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        """Adds a measured forward of ``num_tokens`` tokens (steps with many prompt tokens);
        older ones weigh less, so that the first forwards (kernel compilation: the H200 run of
        bench_kv_tiers read 12k tokens/s from plain sums where an 8k prefill runs at 38k)
        fade out."""
        self.prefill_tokens = DECAY * self.prefill_tokens + num_tokens
        self.prefill_seconds = DECAY * self.prefill_seconds + seconds

    @property
    def copy_bytes_per_s(self) -> float | None:
        """Mean measured copy rate; None before any copy."""
        return self.copy_bytes / self.copy_seconds if self.copy_seconds > 0 else None

    @property
    def prefill_tokens_per_s(self) -> float | None:
        """Mean measured prefill rate; None before any measured step."""
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else None

    def swap_is_cheaper(self, num_bytes: int, num_tokens: int) -> bool:
        """True when copying ``num_bytes`` out and back beats recomputing ``num_tokens``.
        Without a measurement of one side, swap: a copy moves a token's KV (128 KiB at the
        Llama-3-8B shape) in ~2.4 us at 55 GB/s, while recomputing it takes ~30 us of an
        H200 at 8B (4k-token prefill, ~33k tokens/s); the first copy then measures itself."""
        if self.prefer != "measured":
            return self.prefer == "swap"
        copy, prefill = self.copy_bytes_per_s, self.prefill_tokens_per_s
        if copy is None or prefill is None:
            return True
        return 2 * num_bytes / copy < num_tokens / prefill
