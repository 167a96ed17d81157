"""`n > 1`: the siblings of a request share the prompt's KV blocks, so the prompt is prefilled
once (plus, per sibling, the tokens of its last partial block), with or without prefix caching.
Scheduler and block manager on CPU (exact block ids and ref counts), then the default model: the
n greedy siblings equal the n = 1 output."""

from __future__ import annotations

import random

import pytest

from fuselm import SamplingParams
from fuselm.config import SchedulerConfig
from fuselm.engine.block_manager import BlockManager
from fuselm.engine.request import Request
from fuselm.engine.scheduler import Scheduler

BLOCK = 16


def _siblings(n: int, prompt: list[int], max_tokens: int = 4) -> list[Request]:
    params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens)
    return [Request(f"r#{i}", list(prompt), params, max_tokens=max_tokens, parent_id="r",
                    index=i) for i in range(n)]


def _run(scheduler: Scheduler, steps: int, rng: random.Random) -> list[int]:
    """Runs `steps` steps with random sampled tokens; the prompt tokens scheduled per step."""
    per_step = []
    for _ in range(steps):
        out = scheduler.schedule()
        if out.is_empty:
            break
        per_step.append(sum(min(s.num_new_tokens,
                                s.request.num_prompt_tokens - s.request.num_computed_tokens)
                            for s in out.sequences
                            if s.request.num_computed_tokens < s.request.num_prompt_tokens))
        scheduler.update(out, [rng.randrange(1000) if s.sample else None
                               for s in out.sequences])
    return per_step


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("prompt_len", [40, 48, 7])
def test_sixteen_siblings_prefill_the_prompt_once(prefix_caching: bool, prompt_len: int) -> None:
    rng = random.Random(prompt_len)
    prompt = [rng.randrange(1000) for _ in range(prompt_len)]
    bm = BlockManager(num_blocks=256, block_size=BLOCK, enable_prefix_caching=prefix_caching)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=4096), bm)
    n = 16
    seqs = _siblings(n, prompt)
    for seq in seqs:
        scheduler.add(seq)
    per_step = _run(scheduler, 2, rng)
    # Full blocks of the prompt that a sibling can share (one token is always left to compute).
    num_shared = (prompt_len - 1) // BLOCK
    tail = prompt_len - num_shared * BLOCK
    if num_shared:
        assert per_step == [prompt_len, (n - 1) * tail]
    else:  # nothing to share: no sibling waits
        assert per_step[0] == n * prompt_len
    assert scheduler.num_prompt_tokens_computed == prompt_len + (n - 1) * tail
    shared = seqs[0].block_ids[:num_shared]
    for seq in seqs[1:]:
        assert seq.block_ids[:num_shared] == shared
        assert seq.num_cached_tokens == num_shared * BLOCK
    for block_id in shared:
        assert bm.blocks[block_id].ref_count == n
    tails = [seq.block_ids[num_shared] for seq in seqs]
    assert len(set(tails)) == n, "each sibling writes its own partial block"
    _run(scheduler, 10, rng)
    assert not scheduler.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks, "a sibling leaked a block"
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_other_requests_are_admitted_while_siblings_wait() -> None:
    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=BLOCK)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=4096), bm)
    seqs = _siblings(4, [rng.randrange(1000) for _ in range(33)])
    other = Request("o#0", [rng.randrange(1000) for _ in range(5)], SamplingParams(max_tokens=2),
                    max_tokens=2, parent_id="o")
    for seq in [*seqs, other]:
        scheduler.add(seq)
    first = scheduler.schedule()
    assert [s.request for s in first.sequences] == [seqs[0], other]


def test_n_greedy_siblings_equal_one_request(default_llm) -> None:
    words = random.Random().sample(["rivers", "mountains", "cities", "forests", "deserts",
                                    "oceans", "valleys", "islands"], 5)
    prompt = default_llm.tokenizer.apply_chat_template(  # fresh, so nothing is cached yet
        [{"role": "user", "content": f"Write a long sentence about {', '.join(words)}."}])
    sched = default_llm.engine.scheduler
    before = sched.num_prompt_tokens_computed
    many = default_llm.generate([prompt], SamplingParams(n=4, temperature=0.0, max_tokens=3,
                                                         ignore_eos=True))[0]
    computed = sched.num_prompt_tokens_computed - before
    one = default_llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=3,
                                                        ignore_eos=True))[0]
    num_prompt = len(one.prompt_token_ids)
    assert computed <= num_prompt + 3 * default_llm.engine.block_manager.block_size
    assert [c.token_ids for c in many.outputs] == [one.outputs[0].token_ids] * 4
