"""The two-tier block manager (GPU blocks + CPU swap space and prefix tier), driven by the
scheduler and a fake model that records, for every KV slot of either tier, the whole token prefix
whose KV it holds; the scheduler's block moves are applied to that record as the runner applies
them to tensors (every GPU -> CPU move, then every CPU -> GPU one, then the forward's writes)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuselm.config import SchedulerConfig
from fuselm.engine.block_manager import BlockManager
from fuselm.engine.kv_tiers import CpuPrefixTier, KVCopies, SwapSpace
from fuselm.engine.request import Request, RequestStatus
from fuselm.engine.scheduler import Scheduler
from fuselm.sampling_params import SamplingParams

BLOCK = 4
Slots = dict[tuple[int, int], tuple[int, ...]]


def move(src: Slots, dst: Slots, pairs: list[tuple[int, int]], to_cpu: bool) -> None:
    """Copies whole blocks of the fake record: ``(gpu, cpu)`` pairs, in order."""
    for gpu, cpu in pairs:
        a, b = (gpu, cpu) if to_cpu else (cpu, gpu)
        for off in range(BLOCK):
            if (a, off) in src:
                dst[(b, off)] = src[(a, off)]
            else:
                dst.pop((b, off), None)


class TierSimulation:
    """Scheduler + two-tier block manager + fake KV record of both tiers."""

    def __init__(self, num_blocks: int, num_swap: int, num_tier: int, budget: int,
                 prefer: str) -> None:
        self.bm = BlockManager(num_blocks, BLOCK, True, num_swap, num_tier)
        self.sched = Scheduler(SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=budget),
                               self.bm)
        self.sched.kv_rates.prefer = prefer  # type: ignore[assignment]
        self.sched.kv_block_bytes = 1
        self.gpu: Slots = {}
        self.cpu: Slots = {}
        self.content: dict[bytes, list[tuple[int, ...]]] = {}  # hash -> its block's slots
        self.live: list[Request] = []
        self.finished: list[Request] = []
        self.rng = random.Random(0)
        self.ids = 0
        self.moves = Counter()

    def add(self, prompt: list[int], max_tokens: int) -> None:
        req = Request(f"r{self.ids}", prompt, SamplingParams(max_tokens=max_tokens),
                      max_tokens=max_tokens)
        self.ids += 1
        self.sched.add(req)
        self.live.append(req)

    def step(self) -> None:
        out = self.sched.schedule()
        if out.kv_copies is not None:
            self._apply(out.kv_copies)
        for seq in out.sequences:
            self._check_computed_prefix(seq.request)
        for seq in out.sequences:
            req, tokens = seq.request, seq.request.all_token_ids
            for pos in range(req.num_computed_tokens, req.num_computed_tokens + seq.num_new_tokens):
                self.gpu[(req.block_ids[pos // BLOCK], pos % BLOCK)] = tuple(tokens[: pos + 1])
        sampled = [self.rng.randrange(6) if s.sample else None for s in out.sequences]
        for req in self.sched.update(out, sampled):
            self.live.remove(req)
            self.finished.append(req)
        for req in (s.request for s in out.sequences):  # what each hash's block must hold
            tokens = req.all_token_ids
            for i, block_hash in enumerate(req.block_hashes):
                self.content.setdefault(block_hash, [tuple(tokens[: i * BLOCK + off + 1])
                                                     for off in range(BLOCK)])

    def _apply(self, copies: KVCopies) -> None:
        move(self.gpu, self.cpu, copies.to_cpu, to_cpu=True)
        move(self.cpu, self.gpu, copies.to_gpu, to_cpu=False)
        for name in ("swap_out", "offload", "swap_in", "restore"):
            self.moves[name] += len(getattr(copies, name))

    def abort(self, index: int) -> None:
        if self.live:
            req = self.live.pop(index % len(self.live))
            self.sched.finish([req], RequestStatus.FINISHED_ABORTED)
            self.finished.append(req)

    def _check_computed_prefix(self, req: Request) -> None:
        """Every token counted as computed has the KV of exactly its own prefix."""
        tokens = req.all_token_ids
        for pos in range(req.num_computed_tokens):
            got = self.gpu.get((req.block_ids[pos // BLOCK], pos % BLOCK))
            assert got == tuple(tokens[: pos + 1]), f"{req.request_id} pos {pos}: {got}"

    def _block(self, slots: Slots, block: int) -> list[tuple[int, ...] | None]:
        return [slots.get((block, off)) for off in range(BLOCK)]

    def check_invariants(self) -> None:
        bm = self.bm
        held = Counter(b for r in self.live for b in r.block_ids)
        for block in bm.blocks:
            assert block.ref_count == held[block.block_id], f"ref count of {block.block_id}"
        free = list(bm.free_queue)
        assert len(free) == len(set(free))
        assert set(free) == {b.block_id for b in bm.blocks if b.ref_count == 0}
        for req in self.finished:
            assert req.block_ids == [] and req.swapped_block_ids == []
        self._check_swap(bm.swap)
        self._check_tier(bm.cpu_tier)
        if bm._copies:  # moves not run yet: the record is not up to date
            return
        for block_hash, block_id in bm.hash_to_block.items():
            assert bm.blocks[block_id].block_hash == block_hash
            assert self._block(self.gpu, block_id) == self.content[block_hash]
        for block_hash, cpu_block in bm.cpu_tier.lru.items():
            assert self._block(self.cpu, cpu_block) == self.content[block_hash], "tier block"
        for req in self.live:
            tokens = req.all_token_ids
            for pos in range(req.num_swapped_tokens):
                got = self.cpu.get((req.swapped_block_ids[pos // BLOCK], pos % BLOCK))
                assert got == tuple(tokens[: pos + 1]), "swapped KV"

    def _check_swap(self, swap: SwapSpace) -> None:
        owned = [b for r in self.live for b in r.swapped_block_ids]
        assert len(owned) == len(set(owned)), "a swap block owned twice"
        assert set(owned) == swap.held
        free = swap.free_ids + swap._released
        assert len(free) == len(set(free)) and not set(free) & swap.held
        assert len(free) + len(swap.held) == swap.num_blocks, "a swap block leaked"
        for req in self.live:
            if req.swapped_block_ids:
                assert req.status is RequestStatus.PREEMPTED and req.block_ids == []
                assert req.num_computed_tokens == 0

    def _check_tier(self, tier: CpuPrefixTier) -> None:
        cached = list(tier.lru.values())
        assert len(cached) == len(set(cached))
        assert {tier.hash_of[b]: b for b in cached} == dict(tier.lru)
        assert not set(tier.free_ids) & set(cached)
        assert len(tier.free_ids) + len(cached) == tier.num_blocks, "a tier block leaked"
        assert not tier.pinned, "pins outlive the step"


ops = st.lists(st.tuples(st.sampled_from(["add", "add", "step", "step", "step", "abort"]),
                         st.integers(0, 10**6)), min_size=5, max_size=70)


@settings(max_examples=50, deadline=None)
@given(ops=ops, num_blocks=st.integers(8, 24), num_swap=st.integers(1, 16),
       num_tier=st.integers(1, 12), budget=st.integers(8, 48),
       prefer=st.sampled_from(["swap", "recompute"]))
def test_two_tiers_random_arrivals_aborts_completions(ops, num_blocks, num_swap, num_tier,
                                                      budget, prefer):
    sim = TierSimulation(num_blocks, num_swap, num_tier, budget, prefer)
    prefixes = [[1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5], [2, 2, 2, 2, 3, 3, 3, 3]]
    for op, x in ops:
        if op == "add":
            rng = random.Random(x)
            prompt = list(prefixes[x % 2])[: rng.randrange(0, 13)]
            prompt += [rng.randrange(6) for _ in range(rng.randrange(1, 10))]
            sim.add(prompt, max_tokens=rng.randrange(1, 12))
        elif op == "step":
            sim.step()
        else:
            sim.abort(x)
        sim.check_invariants()
    for _ in range(600):
        if not sim.sched.has_unfinished():
            break
        sim.step()
        sim.check_invariants()
    assert not sim.sched.has_unfinished()
    assert sim.bm.num_free_blocks == num_blocks
    assert sim.bm.swap.num_free == num_swap


def test_storm_swaps_restores_and_finishes():
    """A crowded cache with both tiers: every kind of move happens, outputs complete."""
    sim = TierSimulation(num_blocks=10, num_swap=12, num_tier=12, budget=32, prefer="swap")
    for i in range(8):
        sim.add([1, 2, 3, 4, 5, 6, 7, 8] + [i % 6] * 3, max_tokens=14)
    for _ in range(1000):
        if not sim.sched.has_unfinished():
            break
        sim.step()
        sim.check_invariants()
    assert not sim.sched.has_unfinished()
    assert all(len(r.output_token_ids) == 14 for r in sim.finished)
    assert sim.sched.num_swapped_preemptions > 0
    assert all(sim.moves[k] > 0 for k in ("swap_out", "swap_in", "offload", "restore")), sim.moves


def _computed(bm: BlockManager, req: Request) -> None:
    req.num_computed_tokens = req.num_tokens
    bm.cache_computed_blocks(req)


def test_evicted_blocks_go_to_the_cpu_tier_and_come_back():
    bm = BlockManager(4, BLOCK, True, num_cpu_tier_blocks=8)
    a = Request("a", list(range(9)), SamplingParams())
    assert bm.allocate(a, 9) and a.block_ids == [0, 1, 2]
    _computed(bm, a)
    bm.free(a)
    assert bm.take_copies() is None
    b = Request("b", [50 + i for i in range(16)], SamplingParams())
    assert bm.allocate(b, 16)  # takes 3, then 2, 1, 0 (a's tail first): 1 and 0 are full
    assert b.block_ids == [3, 2, 1, 0]
    copies = bm.take_copies()
    assert copies.offload == [(1, 0), (0, 1)], "evicted tail first, to consecutive CPU ids"
    bm.free(b)
    c = Request("c", list(range(8)) + [99], SamplingParams())
    hit = bm.find_prefix(c)
    assert hit.gpu == [None, None] and hit.cpu == [1, 0]
    assert bm.find_cached_prefix(c) == [], "the GPU-only view sees no hit"
    assert bm.allocate(c, 1, hit)
    copies = bm.take_copies()
    assert [cpu for _, cpu in copies.restore] == [1, 0]
    assert [gpu for gpu, _ in copies.restore] == c.block_ids[:2]
    other = Request("d", list(range(4)) + [7, 7, 7, 7, 7], SamplingParams())
    assert bm.find_prefix(other).gpu == [c.block_ids[0]], "restored blocks hit on the GPU"
    assert bm.moved["restore"] == 2 and bm.moved["offload"] == 2


def test_tier_evicts_least_recently_used_and_never_a_pinned_block():
    tier = CpuPrefixTier(start=10, num_blocks=2)
    assert tier.store(b"x") == 10 and tier.store(b"y") == 11
    assert tier.store(b"x") is None, "kept already: touched, not copied"
    assert tier.store(b"z") == 11, "y is the least recently used"
    tier.pin(10)
    tier.pin(11)
    assert tier.store(b"w") is None, "everything pinned: the block is dropped"
    tier.end_step()
    assert tier.store(b"w") == 10 and tier.lookup(b"x") is None


def test_swap_out_and_in_exact_blocks():
    bm = BlockManager(6, BLOCK, True, num_swap_blocks=4)
    a = Request("a", list(range(10)), SamplingParams())
    assert bm.allocate(a, 10)
    a.num_computed_tokens = 10
    a.output_token_ids.append(3)  # decoding: 11 tokens, 10 computed
    assert bm.can_swap_out(a) == 3
    gpu_blocks = list(a.block_ids)
    bm.swap_out(a)
    assert a.block_ids == [] and a.swapped_block_ids == [0, 1, 2] and a.num_swapped_tokens == 10
    assert bm.take_copies().swap_out == list(zip(gpu_blocks, [0, 1, 2], strict=True))
    assert bm.swap.num_free == 1
    b = Request("b", list(range(30)), SamplingParams())
    assert not bm.can_swap_out(b), "no computed tokens: nothing to swap"
    assert bm.swap_in(a, 1)
    assert len(a.block_ids) == 3 and a.swapped_block_ids == []
    copies = bm.take_copies()
    assert copies.swap_in == list(zip(a.block_ids, [0, 1, 2], strict=True))
    assert bm.swap.num_free == 4, "swap blocks are free once the step took its copies"
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.swap.release([0], deferred=False)
