"""Paged KV blocks: reference counts, a free queue in LRU order, and prefix caching.

A full block is identified by the SHA-256 of its token ids chained with the previous block's hash,
so a hit implies an identical token prefix (Python's ``hash`` can be made to collide). Freed
blocks keep their hash and stay reusable until allocation evicts them, least recently freed first.

Two optional CPU tiers (``fuselm.engine.kv_tiers``): swap space, which a preempted sequence's
blocks are copied to and back from (``swap_out`` / ``swap_in``), and a prefix tier, which keeps
the full blocks the GPU evicts (least recently used first) so that a later hit restores them
instead of recomputing. The moves are queued here and taken once per step (``take_copies``).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from fuselm.engine.kv_tiers import CpuPrefixTier, KVCopies, SwapSpace
from fuselm.engine.request import Request


@dataclass
class Block:
    """One KV block of ``block_size`` token slots."""

    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


@dataclass
class PrefixHit:
    """The cached blocks of a prefix, one per block position: ``gpu[i]`` a GPU block to share,
    or None where the CPU tier holds it (``cpu[i]``: the CPU block to restore)."""

    gpu: list[int | None] = field(default_factory=list)
    cpu: list[int | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.gpu)

    def pop(self) -> None:
        """Drops the last block."""
        self.gpu.pop()
        self.cpu.pop()


def hash_block(prev_hash: bytes | None, token_ids: list[int]) -> bytes:
    """SHA-256 of the previous block's hash followed by this block's token ids."""
    digest = hashlib.sha256(prev_hash or b"")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class BlockManager:
    """Owns every KV block; requests hold block ids in ``Request.block_ids``."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_swap_blocks: int = 0, num_cpu_tier_blocks: int = 0):
        """``num_swap_blocks`` / ``num_cpu_tier_blocks``: CPU blocks of swap space and of the
        prefix tier (CPU block ids: swap space first, then the tier)."""
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[bytes, int] = {}
        self._num_hashed: dict[int, int] = {}  # id(request) -> its blocks registered in the cache
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # prompt tokens found
        self.swap = SwapSpace(0, num_swap_blocks) if num_swap_blocks else None
        self.cpu_tier = (CpuPrefixTier(num_swap_blocks, num_cpu_tier_blocks)
                         if num_cpu_tier_blocks and enable_prefix_caching else None)
        self._copies = KVCopies()  # this step's moves so far
        # blocks moved, counted when a step takes its copies
        self.moved = {"swap_out": 0, "offload": 0, "swap_in": 0, "restore": 0}

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached ones included)."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def _update_hashes(self, req: Request) -> None:
        tokens = req.all_token_ids
        for i in range(len(req.block_hashes), len(tokens) // self.block_size):
            prev = req.block_hashes[-1] if req.block_hashes else None
            req.block_hashes.append(
                hash_block(prev, tokens[i * self.block_size : (i + 1) * self.block_size]))

    def find_cached_prefix(self, req: Request) -> list[int]:
        """GPU blocks holding the longest cached prefix of the request's tokens (the GPU tier
        only; see ``find_prefix``)."""
        return [b for b in self.find_prefix(req, use_cpu=False).gpu if b is not None]

    def find_prefix(self, req: Request, use_cpu: bool = True) -> PrefixHit:
        """Cached blocks, GPU or (``use_cpu``) CPU tier, holding the longest prefix of the
        request's tokens (at least one token is left to compute). Counts the lookup in the
        hit statistics."""
        hit = PrefixHit()
        if not self.enable_prefix_caching:
            return hit
        self._update_hashes(req)
        tier = self.cpu_tier if use_cpu else None
        for block_hash in req.block_hashes:
            block_id = self.hash_to_block.get(block_hash)
            cpu_block = None if block_id is not None or tier is None else tier.lookup(block_hash)
            if block_id is None and cpu_block is None:
                break
            hit.gpu.append(block_id)
            hit.cpu.append(cpu_block)
        if hit and len(hit) * self.block_size >= req.num_tokens:
            hit.pop()
        self.prefix_queries += req.num_tokens
        self.prefix_hits += len(hit) * self.block_size
        return hit

    def allocate(self, req: Request, num_new_tokens: int,
                 cached_blocks: list[int] | PrefixHit | None = None) -> bool:
        """Gives the request blocks for ``num_new_tokens`` more tokens (after its computed and
        cached ones); False, changing nothing, if too few blocks are free. Cached GPU blocks
        are shared; CPU-tier ones get a fresh block each and a queued restore."""
        hit = (cached_blocks if isinstance(cached_blocks, PrefixHit)
               else PrefixHit(list(cached_blocks or []), [None] * len(cached_blocks or [])))
        num_tokens = req.num_computed_tokens + len(hit) * self.block_size
        needed = self.blocks_needed(num_tokens + num_new_tokens)
        shared = [b for b in hit.gpu if b is not None]
        num_new_blocks = needed - len(req.block_ids) - len(shared)
        reclaimed = sum(1 for b in shared if self.blocks[b].ref_count == 0)
        if num_new_blocks > self.num_free_blocks - reclaimed:
            return False
        for block_id in shared:  # first: no fresh block may evict them
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
        for cpu_block in hit.cpu:
            if cpu_block is not None:
                self.cpu_tier.pin(cpu_block)  # type: ignore[union-attr]
        start = len(req.block_ids)
        for i, (block_id, cpu_block) in enumerate(zip(hit.gpu, hit.cpu, strict=True)):
            if block_id is None:
                block_id = self._restore_block(req.block_hashes[start + i], cpu_block)
            req.block_ids.append(block_id)
        if hit:
            self._num_hashed[id(req)] = len(req.block_ids)
        for _ in range(max(num_new_blocks - (len(hit) - len(shared)), 0)):
            req.block_ids.append(self._take_free_block())
        return True

    def _restore_block(self, block_hash: bytes, cpu_block: int | None) -> int:
        """A fresh GPU block that this step's restore fills from ``cpu_block``, registered
        under ``block_hash`` at once (the copy runs before any forward reads it)."""
        assert cpu_block is not None
        block_id = self._take_free_block()
        if block_hash not in self.hash_to_block:
            self.blocks[block_id].block_hash = block_hash
            self.hash_to_block[block_hash] = block_id
        self._copies.restore.append((block_id, cpu_block))
        return block_id

    def _take_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self.hash_to_block.get(block.block_hash) == block_id:
                del self.hash_to_block[block.block_hash]
                if self.cpu_tier is not None:  # evicted: keep it on the CPU
                    cpu_block = self.cpu_tier.store(block.block_hash)
                    if cpu_block is not None:
                        self._copies.offload.append((block_id, cpu_block))
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def cache_computed_blocks(self, req: Request) -> None:
        """Registers the request's newly computed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = req.num_computed_tokens // self.block_size
        start = self._num_hashed.get(id(req), 0)
        if num_full <= start:
            return
        self._update_hashes(req)
        for i in range(start, num_full):
            block = self.blocks[req.block_ids[i]]
            block_hash = req.block_hashes[i]
            if block.block_hash is None and block_hash not in self.hash_to_block:
                block.block_hash = block_hash
                self.hash_to_block[block_hash] = block.block_id
        self._num_hashed[id(req)] = num_full

    def free(self, req: Request) -> None:
        """Returns the request's blocks (the tail first, so that it is evicted first) and its
        swap space."""
        self._free_gpu(req)
        if req.swapped_block_ids:
            self.swap.release(req.swapped_block_ids, deferred=False)  # type: ignore[union-attr]
            req.swapped_block_ids = []
            req.num_swapped_tokens = 0

    def _free_gpu(self, req: Request) -> None:
        for block_id in reversed(req.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block_id} freed twice")
            if block.ref_count == 0:
                self.free_queue[block_id] = None
        req.block_ids = []
        self._num_hashed.pop(id(req), None)

    def can_swap_out(self, req: Request) -> int:
        """Blocks ``swap_out`` would copy (0: no swap space, or too little free)."""
        n = self.blocks_needed(min(req.num_computed_tokens, req.num_tokens - 1))
        return n if self.swap is not None and 0 < n <= self.swap.num_free else 0

    def swap_out(self, req: Request) -> None:
        """Queues the copy of the request's computed blocks to swap space and frees its GPU
        blocks; it keeps ``num_swapped_tokens`` (one token at least is left to compute)."""
        num_blocks = self.can_swap_out(req)
        if not num_blocks:
            raise RuntimeError(f"{req.request_id} cannot be swapped out")
        cpu_ids = self.swap.take(num_blocks)  # type: ignore[union-attr]
        self._copies.swap_out.extend(zip(req.block_ids[:num_blocks], cpu_ids, strict=True))
        req.swapped_block_ids = cpu_ids
        req.num_swapped_tokens = min(req.num_computed_tokens, req.num_tokens - 1)
        self._free_gpu(req)

    def swap_in(self, req: Request, num_new_tokens: int) -> bool:
        """Gives a swapped-out request fresh blocks for its swapped tokens plus
        ``num_new_tokens``, queueing the copies back; False, changing nothing, if too few
        blocks are free."""
        needed = self.blocks_needed(req.num_swapped_tokens + num_new_tokens)
        if needed > self.num_free_blocks:
            return False
        req.block_ids = [self._take_free_block() for _ in range(needed)]
        self._copies.swap_in.extend(zip(req.block_ids, req.swapped_block_ids, strict=False))
        self.swap.release(req.swapped_block_ids, deferred=True)  # type: ignore[union-attr]
        req.swapped_block_ids = []
        req.num_swapped_tokens = 0
        return True

    def take_copies(self) -> KVCopies | None:
        """The block moves queued since the last call (None: none), for the step about to
        run; the CPU blocks they read are reusable from now on."""
        copies, self._copies = self._copies, KVCopies()
        for name in self.moved:
            self.moved[name] += len(getattr(copies, name))
        if self.cpu_tier is not None:
            self.cpu_tier.end_step()
        if self.swap is not None:
            self.swap.end_step()
        return copies or None

    def reset_prefix_cache(self) -> None:
        """Forgets every cached hash, in both tiers (blocks in use keep their contents)."""
        for block in self.blocks:
            block.block_hash = None
        self.hash_to_block.clear()
        if self.cpu_tier is not None:
            self.cpu_tier.clear()
