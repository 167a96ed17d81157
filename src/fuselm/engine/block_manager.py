"""Paged KV blocks: reference counts, a free queue in LRU order, and prefix caching.

A full block is identified by the SHA-256 of its token ids chained with the previous block's hash,
so a hit implies an identical token prefix (Python's ``hash`` can be made to collide). Freed
blocks keep their hash and stay reusable until allocation evicts them, least recently freed first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from fuselm.engine.request import Request


@dataclass
class Block:
    """One KV block of ``block_size`` token slots."""

    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


def hash_block(prev_hash: bytes | None, token_ids: list[int]) -> bytes:
    """SHA-256 of the previous block's hash followed by this block's token ids."""
    digest = hashlib.sha256(prev_hash or b"")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class BlockManager:
    """Owns every KV block; requests hold block ids in ``Request.block_ids``."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
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
        """Cached blocks holding the longest prefix of the request's tokens (at least one token
        is left to compute). Counts the lookup in the hit statistics."""
        if not self.enable_prefix_caching:
            return []
        self._update_hashes(req)
        hits: list[int] = []
        for block_hash in req.block_hashes:
            block_id = self.hash_to_block.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        if hits and len(hits) * self.block_size >= req.num_tokens:
            hits.pop()
        self.prefix_queries += req.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits

    def allocate(self, req: Request, num_new_tokens: int,
                 cached_blocks: list[int] | None = None) -> bool:
        """Gives the request blocks for ``num_new_tokens`` more tokens (after its computed and
        cached ones); False, changing nothing, if too few blocks are free."""
        cached_blocks = cached_blocks or []
        num_tokens = req.num_computed_tokens + len(cached_blocks) * self.block_size
        needed = self.blocks_needed(num_tokens + num_new_tokens)
        num_new_blocks = needed - len(req.block_ids) - len(cached_blocks)
        reclaimed = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        if num_new_blocks > self.num_free_blocks - reclaimed:
            return False
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
            req.block_ids.append(block_id)
        if cached_blocks:
            self._num_hashed[id(req)] = len(req.block_ids)
        for _ in range(max(num_new_blocks, 0)):
            req.block_ids.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self.hash_to_block.get(block.block_hash) == block_id:
                del self.hash_to_block[block.block_hash]
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
        """Returns the request's blocks; the tail first, so that it is evicted first."""
        for block_id in reversed(req.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block_id} freed twice")
            if block.ref_count == 0:
                self.free_queue[block_id] = None
        req.block_ids = []
        self._num_hashed.pop(id(req), None)

    def reset_prefix_cache(self) -> None:
        """Forgets every cached hash (blocks in use keep their contents)."""
        for block in self.blocks:
            block.block_hash = None
        self.hash_to_block.clear()
