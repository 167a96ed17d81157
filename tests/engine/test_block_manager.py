"""Block manager and scheduler invariants, checked against the test's own record of KV writes."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from fuselm.config import SchedulerConfig
from fuselm.engine.block_manager import BlockManager, hash_block
from fuselm.engine.request import Request, RequestStatus
from fuselm.engine.scheduler import Scheduler
from fuselm.sampling_params import SamplingParams

BLOCK = 4


class Simulation:
    """Scheduler + block manager driven by a fake model; records what each KV slot holds."""

    def __init__(self, num_blocks: int, budget: int, max_seqs: int, caching: bool) -> None:
        self.bm = BlockManager(num_blocks, BLOCK, caching)
        self.sched = Scheduler(SchedulerConfig(max_num_seqs=max_seqs,
                                               max_num_batched_tokens=budget), self.bm)
        self.slots: dict[tuple[int, int], int] = {}  # (block, offset) -> token whose KV is there
        self.live: list[Request] = []
        self.finished: list[Request] = []
        self.rng = random.Random(0)
        self.ids = 0
        self.max_seqs_in_step = 0
        self.hits = 0

    def add(self, prompt: list[int], max_tokens: int) -> None:
        req = Request(f"r{self.ids}", prompt, SamplingParams(max_tokens=max_tokens),
                      max_tokens=max_tokens)
        self.ids += 1
        self.sched.add(req)
        self.live.append(req)

    def step(self) -> None:
        out = self.sched.schedule()
        self.max_seqs_in_step = max(self.max_seqs_in_step, len(out.sequences))
        for seq in out.sequences:
            self._check_computed_prefix(seq.request)
            self.hits += seq.request.num_cached_tokens > 0
        for seq in out.sequences:  # the fake model writes KV of the new tokens
            req = seq.request
            tokens = req.all_token_ids
            for pos in range(req.num_computed_tokens, req.num_computed_tokens + seq.num_new_tokens):
                block = req.block_ids[pos // BLOCK]
                self.slots[(block, pos % BLOCK)] = tokens[pos]
        sampled = [self.rng.randrange(8) if s.sample else None for s in out.sequences]
        for req in self.sched.update(out, sampled):
            self.live.remove(req)
            self.finished.append(req)

    def abort(self, index: int) -> None:
        if self.live:
            req = self.live.pop(index % len(self.live))
            self.sched.finish([req], RequestStatus.FINISHED_ABORTED)
            self.finished.append(req)

    def _check_computed_prefix(self, req: Request) -> None:
        """Every token the request counts as computed has its own KV at its slot."""
        tokens = req.all_token_ids
        for pos in range(req.num_computed_tokens):
            got = self.slots.get((req.block_ids[pos // BLOCK], pos % BLOCK))
            assert got == tokens[pos], f"{req.request_id} pos {pos}: KV of {got}, not {tokens[pos]}"

    def check_invariants(self) -> None:
        held = Counter(b for r in self.live for b in r.block_ids)
        for req in self.live:
            assert len(set(req.block_ids)) == len(req.block_ids), "a block held twice"
        for req in self.finished:
            assert req.block_ids == [], f"{req.request_id} finished but holds blocks"
        for block in self.bm.blocks:
            assert block.ref_count == held[block.block_id], f"ref count of {block.block_id}"
        free = list(self.bm.free_queue)
        assert len(free) == len(set(free))
        assert set(free) == {b.block_id for b in self.bm.blocks if b.ref_count == 0}
        for block_hash, block_id in self.bm.hash_to_block.items():
            assert self.bm.blocks[block_id].block_hash == block_hash
        for req in self.sched.waiting:
            assert req.block_ids == [] and req.num_computed_tokens == 0


ops = st.lists(st.tuples(st.sampled_from(["add", "step", "step", "step", "abort"]),
                         st.integers(0, 10**6)), min_size=5, max_size=80)


@settings(max_examples=60, deadline=None)
@given(ops=ops, caching=st.booleans(), num_blocks=st.integers(12, 40),
       budget=st.integers(8, 64))
def test_random_arrivals_aborts_completions(ops, caching, num_blocks, budget):
    sim = Simulation(num_blocks, budget, max_seqs=6, caching=caching)
    prefixes = [[1, 2, 3, 4, 5, 6, 7, 1], [2, 2, 2, 2, 3, 3, 3, 3]]
    for op, x in ops:
        if op == "add":
            rng = random.Random(x)
            prompt = list(prefixes[x % 2])[: rng.randrange(0, 9)]
            prompt += [rng.randrange(8) for _ in range(rng.randrange(1, 12))]
            sim.add(prompt, max_tokens=rng.randrange(1, 10))
        elif op == "step":
            sim.step()
        else:
            sim.abort(x)
        sim.check_invariants()
    for _ in range(500):  # drain: every request finishes, nothing leaks
        if not sim.sched.has_unfinished():
            break
        sim.step()
        sim.check_invariants()
    assert not sim.sched.has_unfinished()
    assert sim.bm.num_free_blocks == num_blocks


def test_tiny_cache_preempts_and_finishes_everything():
    sim = Simulation(num_blocks=10, budget=32, max_seqs=8, caching=True)
    for i in range(8):
        sim.add([i % 8] * 6, max_tokens=20)
    for _ in range(2000):
        if not sim.sched.has_unfinished():
            break
        sim.step()
        sim.check_invariants()
    assert not sim.sched.has_unfinished()
    assert sim.sched.num_preemptions > 0
    assert sim.max_seqs_in_step > 1
    assert all(len(r.output_token_ids) == 20 for r in sim.finished)


def test_prefix_hit_exact_blocks_and_refcounts():
    bm = BlockManager(8, BLOCK, True)
    a = Request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], SamplingParams())
    assert bm.allocate(a, a.num_tokens)
    assert a.block_ids == [0, 1, 2]
    a.num_computed_tokens = 9
    bm.cache_computed_blocks(a)
    b = Request("b", [1, 2, 3, 4, 5, 6, 7, 8, 42], SamplingParams())
    hits = bm.find_cached_prefix(b)
    assert hits == [0, 1]
    assert bm.allocate(b, 1, hits)
    assert b.block_ids == [0, 1, 3]
    assert [bm.blocks[i].ref_count for i in range(4)] == [2, 2, 1, 1]
    c = Request("c", [1, 2, 3, 4, 5, 6, 7, 9, 9], SamplingParams())
    assert bm.find_cached_prefix(c) == [0], "a different token must end the shared prefix"
    bm.free(a)
    bm.free(b)
    assert list(bm.free_queue) == [4, 5, 6, 7, 2, 3, 1, 0], "tails are evicted before heads"


def test_full_prompt_hit_leaves_a_token_to_compute():
    bm = BlockManager(8, BLOCK, True)
    a = Request("a", list(range(8)), SamplingParams())
    bm.allocate(a, 8)
    a.num_computed_tokens = 8
    bm.cache_computed_blocks(a)
    b = Request("b", list(range(8)), SamplingParams())
    assert bm.find_cached_prefix(b) == [0]


def test_hash_chains_previous_block():
    assert hash_block(None, [1, 2]) != hash_block(hash_block(None, [0]), [1, 2])
    assert len(hash_block(None, [1, 2])) == 32
