"""Tensor, pipeline and hybrid parallelism on CPU (gloo): the same tokens as one process.

Each configuration runs ``dist_driver.py`` as rank 0 in a subprocess (it spawns the other ranks)
on a tiny random checkpoint, with chunked prefill and prefix caching on, and compares every
sequence's tokens and logprobs with the same workload run in this process on one rank.
"""

from __future__ import annotations

import pytest

from tests.distributed.dist_helpers import assert_same_outputs, run_driver
from tests.tiny_models import TINY_CONFIGS

CASES = [  # (checkpoint, tp, pp)
    ("llama3-gqa-scaled", 2, 1),
    ("llama3-gqa-scaled", 1, 2),
    ("llama3-gqa-scaled", 2, 2),
    ("llama3-gqa-scaled", 4, 1),  # 2 KV heads over 4 ranks: each KV head on two ranks
    ("qwen2-gqa-tied-bias", 2, 1),
    ("qwen2-gqa-tied-bias", 1, 2),
    ("qwen2-gqa-tied-bias", 2, 2),
    ("llama-linear-tied", 2, 1),  # 1 KV head over 2 ranks
]


@pytest.mark.parametrize(("name", "tp", "pp"), CASES, ids=[f"{n}-tp{t}-pp{p}" for n, t, p in CASES])
def test_parallel_matches_one_process(checkpoint, reference, name, tp, pp):
    want = reference(name)
    got = run_driver(checkpoint(name), tp, pp)
    assert_same_outputs(got["outputs"], want["outputs"])
    stats = got["stats"]
    assert got["world_size"] == tp * pp
    assert stats["num_partial_prefills_total"] > 0, "no prompt was chunked"
    assert stats["prefix_cache_hits_total"] > 0, "the prefix cache never hit"
    assert stats["generation_tokens_total"] == want["stats"]["generation_tokens_total"]
    num_kv_heads = TINY_CONFIGS[name]["num_key_value_heads"]
    assert got["rank0_kv_heads"] == max(1, num_kv_heads // tp)  # only this rank's heads
    assert got["rank0_layers"] == [0, 2 // pp]  # the tiny models have 2 layers
    if pp > 1:
        assert got["max_in_flight_seen"] == pp, "micro-batches never overlapped"


def test_tensor_parallel_async_scheduling_matches_one_process(checkpoint, reference):
    """Rank 0 plans each greedy decode step before reading the previous one's tokens; every
    rank feeds its own argmax back: the same tokens as one synchronous process."""
    name = "llama3-gqa-scaled"
    got = run_driver(checkpoint(name), 2, 1, async_scheduling=True)
    assert_same_outputs(got["outputs"], reference(name)["outputs"])
    assert got["num_pipelined_steps"] > 0, "no step was planned ahead"
