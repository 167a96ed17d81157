"""Swap space and the prefix cache's CPU tier on a tiny random model (CPU: host and "device"
caches are both CPU memory, the copies still run): outputs identical with swap and with
recomputation, with the tier on and off; block copies hold exactly the KV they moved."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fuselm import LLM, SamplingParams
from fuselm.engine.kv_mover import KVBlockMover
from fuselm.engine.kv_tiers import KVCopies, TransferRates
from fuselm.errors import ConfigError
from tests.tiny_models import make_tiny_checkpoint

NEW_TOKENS = 12
SMALL = dict(num_gpu_blocks=12, block_size=8, max_num_batched_tokens=64, max_model_len=96)
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_k=20, seed=3, max_tokens=NEW_TOKENS,
                        ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint("llama3-gqa-scaled", tmp_path_factory.mktemp("kv-swap"))


@pytest.fixture(scope="module")
def prompts():
    """Mixed lengths; the last six share a 40-token prefix."""
    gen = torch.Generator().manual_seed(5)
    shared = torch.randint(0, 256, (40,), generator=gen).tolist()
    distinct = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (3, 60, 17, 1, 33)]
    return distinct + [shared + torch.randint(0, 256, (n,), generator=gen).tolist()
                       for n in (1, 5, 13, 20, 2, 8)]


def _run(path, prompts, prefer="swap", waves=2, **kwargs):
    """Token ids of each wave (the same prompts again: the second hits evicted prefixes)."""
    llm = LLM(str(path), device="cpu", **kwargs)
    llm.engine.scheduler.kv_rates.prefer = prefer
    waves_out = {}
    for params in (GREEDY, SEEDED):
        waves_out[params.seed] = [[o.outputs[0].token_ids for o in llm.generate(prompts, params)]
                                  for _ in range(waves)]
    return waves_out, llm.engine.stats()


@pytest.fixture(scope="module")
def reference(tiny, prompts):
    """A cache that never preempts nor evicts."""
    out, stats = _run(tiny, prompts, num_gpu_blocks=400, block_size=8)
    assert stats["num_preemptions_total"] == 0
    return out


@pytest.mark.parametrize("tier", [False, True])
@pytest.mark.parametrize("swap", [False, True])
def test_outputs_identical_with_swap_and_cpu_tier(tiny, prompts, reference, swap, tier):
    out, stats = _run(tiny, prompts, **SMALL, swap_space=0.01 if swap else 0.0,
                      kv_offloading_size=0.01 if tier else 0.0)
    assert out == reference
    assert stats["num_preemptions_total"] > 0
    assert (stats["num_swapped_preemptions_total"] > 0) == swap
    assert (stats["kv_swapped_in_bytes_total"] > 0) == swap
    assert (stats["recomputed_tokens_total"] == 0) == swap, "swap leaves nothing to recompute"
    assert (stats["cpu_prefix_cache_hits_total"] > 0) == tier
    assert (stats["kv_offloaded_bytes_total"] > 0) == tier
    if swap or tier:
        assert stats["kv_to_gpu_gb_per_s"] > 0 and stats["kv_to_cpu_gb_per_s"] > 0


def test_measured_choice_and_too_little_swap_space_fall_back_to_recompute(tiny, prompts,
                                                                          reference):
    out, stats = _run(tiny, prompts, prefer="recompute", waves=1, **SMALL, swap_space=0.01)
    assert out[None] == reference[None][:1]
    assert stats["num_swapped_preemptions_total"] == 0 and stats["recomputed_tokens_total"] > 0
    # one block of swap space (11 KiB here): victims holding more are recomputed
    out, stats = _run(tiny, prompts, waves=1, **SMALL, swap_space=12 * 1024 / 2**30)
    assert out[None] == reference[None][:1]
    assert stats["num_swapped_preemptions_total"] < stats["num_preemptions_total"]


def test_a_restored_block_holds_exactly_the_evicted_kv(tiny):
    llm = LLM(str(tiny), device="cpu", num_gpu_blocks=12, block_size=8, max_model_len=96,
              kv_offloading_size=0.01)
    engine, bm = llm.engine, llm.engine.block_manager
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (41,), generator=gen).tolist()
    llm.generate([a], SamplingParams(max_tokens=1))
    req_hashes = list(bm.hash_to_block)
    kept = {h: [t[bm.hash_to_block[h]].clone() for kv in engine.runner.kv_caches for t in kv]
            for h in req_hashes}
    llm.generate([torch.randint(0, 256, (90,), generator=gen).tolist()],
                 SamplingParams(max_tokens=1))  # takes every GPU block: a's are evicted
    assert not set(req_hashes) & set(bm.hash_to_block)
    before = engine.stats()
    llm.generate([a], SamplingParams(max_tokens=1))
    assert engine.stats()["kv_restored_blocks_total"] - before["kv_restored_blocks_total"] == 5
    for h, tensors in kept.items():
        now = [t[bm.hash_to_block[h]] for kv in engine.runner.kv_caches for t in kv]
        assert all(torch.equal(x, y) for x, y in zip(tensors, now, strict=True))


@settings(max_examples=30, deadline=None)
@given(data=st.data(), num_blocks=st.integers(2, 9), num_cpu=st.integers(1, 9))
def test_mover_copies_exact_blocks(data, num_blocks, num_cpu):
    """Random moves both ways; the expected caches come from per-block clones (no mover)."""
    gen = torch.Generator().manual_seed(num_blocks * 10 + num_cpu)
    caches = [tuple(torch.randn(num_blocks, 4, 2, 3, generator=gen) for _ in range(2))
              for _ in range(2)]
    mover = KVBlockMover(caches, num_cpu, TransferRates())
    for kv in mover.cpu_caches:
        for t in kv:
            t.copy_(torch.randn(t.shape, generator=gen))
    pair = st.tuples(st.integers(0, num_blocks - 1), st.integers(0, num_cpu - 1))
    to_cpu = data.draw(st.lists(pair, max_size=6))
    to_gpu = data.draw(st.lists(pair, max_size=6, unique_by=lambda p: p[0]))
    want_gpu = [[t.clone() for t in kv] for kv in caches]
    want_cpu = [[t.clone() for t in kv] for kv in mover.cpu_caches]
    for gpu, cpu in to_cpu:
        for wg, wc in zip(want_gpu, want_cpu, strict=True):
            for g, c in zip(wg, wc, strict=True):
                c[cpu] = g[gpu]
    for gpu, cpu in to_gpu:
        for wg, wc in zip(want_gpu, want_cpu, strict=True):
            for g, c in zip(wg, wc, strict=True):
                g[gpu] = c[cpu]
    mover.run(KVCopies(swap_out=to_cpu[:3], offload=to_cpu[3:], swap_in=to_gpu[:2],
                       restore=to_gpu[2:]))
    for got, want in ((caches, want_gpu), (mover.cpu_caches, want_cpu)):
        for g_kv, w_kv in zip(got, want, strict=True):
            assert all(torch.equal(g, w) for g, w in zip(g_kv, w_kv, strict=True))


def test_cpu_tier_without_prefix_caching_is_refused(tiny):
    with pytest.raises(ConfigError, match="--kv-offloading-size"):
        LLM(str(tiny), device="cpu", num_gpu_blocks=12, block_size=8, max_model_len=96,
            kv_offloading_size=0.01, enable_prefix_caching=False)


def test_swap_decision_from_measured_rates():
    rates = TransferRates()
    assert rates.swap_is_cheaper(10**9, 1), "unmeasured: swap"
    rates.observe_copy(10 * 10**9, 1.0)  # 10 GB/s
    rates.observe_prefill(10_000, 1.0)  # 10k tokens/s
    assert rates.swap_is_cheaper(10**9, 10_000)  # 0.2 s of copies < 1 s of prefill
    assert not rates.swap_is_cheaper(10**9, 1_000)  # 0.2 s > 0.1 s
    rates.prefer = "recompute"
    assert not rates.swap_is_cheaper(1, 10**9)


def test_metrics_export_the_tier_counters():
    from fuselm.server.metrics import ServerMetrics

    class Engine:
        def stats(self) -> dict[str, float]:
            return {"kv_restored_bytes_total": 7, "cpu_kv_cache_usage_perc": 0.5}

    text = ServerMetrics(Engine(), "m").render().decode()
    assert 'fuselm:kv_restored_bytes_total{model_name="m"} 7.0' in text
    assert 'vllm:cpu_cache_usage_perc{model_name="m"} 0.5' in text
