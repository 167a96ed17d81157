"""prefill_attention: the Triton kernel against the reference (varlen, causal, cached prefixes,
GQA, scattered blocks). CPU runs the Triton interpreter on small shapes; ``gpu`` tests run bf16 at
full size."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close

from fuselm.kernels import available_backends, resolve
from fuselm.kernels.prefill_attention import (
    PrefillConfig,
    prefill_attention_ref,
    prefill_attention_triton,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    "triton" not in available_backends("prefill_attention"), reason="triton unavailable")


def make_inputs(q_lens, ctx_lens, num_heads, num_kv_heads, head_size, block_size, dtype,
                device="cpu", seed=0):
    """Packed q/k/v (strided views of one QKV tensor) and a paged cache holding each sequence's
    prefix and new tokens in scattered blocks. Returns the kernel's positional arguments."""
    gen = torch.Generator().manual_seed(seed)
    num_seqs, num_tokens = len(q_lens), sum(q_lens)
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens, strict=True)]
    max_blocks = max(1, max(-(-s // block_size) for s in seq_lens))
    num_blocks = num_seqs * max_blocks + 3
    block_tables = torch.randperm(num_blocks, generator=gen)[: num_seqs * max_blocks]
    block_tables = block_tables.view(num_seqs, max_blocks).int()
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = torch.randn(shape, generator=gen).to(dtype)
    value_cache = torch.randn(shape, generator=gen).to(dtype)
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_size, generator=gen)
    qkv = qkv.to(dtype)
    q = qkv[:, :num_heads]
    k = qkv[:, num_heads : num_heads + num_kv_heads]
    v = qkv[:, num_heads + num_kv_heads :]
    starts = [0]
    for b, (q_len, ctx) in enumerate(zip(q_lens, ctx_lens, strict=True)):
        pos = torch.arange(ctx, ctx + q_len)  # the new tokens are in the cache too
        blocks = block_tables[b, pos // block_size].long()
        key_cache[blocks, pos % block_size] = k[starts[-1] : starts[-1] + q_len]
        value_cache[blocks, pos % block_size] = v[starts[-1] : starts[-1] + q_len]
        starts.append(starts[-1] + q_len)
    query_start_loc = torch.tensor(starts, dtype=torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    args = (q, k, v, key_cache, value_cache, query_start_loc, seq_lens_t, block_tables)
    return tuple(t.to(device) for t in args) + (head_size**-0.5,)


# (q_lens, ctx_lens, num_heads, num_kv_heads, head_size, block_size, config): few, chosen combos.
CASES = {
    "one_token": ([1], [0], 4, 4, 64, 16, None),
    "seq7_gqa3": ([7], [0], 3, 1, 128, 32, None),
    "mixed_prefix_gqa4": ([40, 1, 7], [0, 37, 16], 8, 2, 64, 16, None),
    "gqa4_two_heads_per_prog": ([40, 1, 7], [0, 37, 16], 8, 2, 64, 16, PrefillConfig(32, 16, 4, 1)),
    "gqa7_prefix": ([20, 3], [25, 0], 7, 1, 64, 32, None),
    "gqa8_hd128_bn32": ([33], [50], 8, 1, 128, 16, PrefillConfig(64, 32, 4, 1)),
    "hd80_empty_seq": ([9, 0, 18], [5, 10, 0], 2, 2, 80, 16, None),
    "one_head_per_prog": ([40, 1, 7], [0, 37, 16], 4, 2, 64, 16,
                          PrefillConfig(16, 16, 4, 1, max_heads_per_prog=1)),
    # The sweep's switches (prefix, unmasked and diagonal tiles, two heads a program):
    "fold_scale": ([40, 1, 7], [0, 37, 16], 8, 2, 64, 16, PrefillConfig(32, 16, 4, 1,
                                                                        fold_scale=True)),
    "narrow_offsets_bn32": ([33], [50], 8, 1, 128, 16, PrefillConfig(64, 32, 4, 1,
                                                                     narrow_offsets=True)),
    "lean_edges_hd80": ([9, 0, 18], [5, 10, 0], 2, 2, 80, 16, PrefillConfig(16, 16, 4, 1,
                                                                            lean_edges=True)),
    "all_switches": ([40, 1, 7], [0, 37, 16], 8, 2, 64, 16, PrefillConfig(
        32, 16, 4, 1, fold_scale=True, narrow_offsets=True, lean_edges=True)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_prefill_triton_matches_reference(case, dtype):
    q_lens, ctx_lens, heads, kv_heads, head_size, block_size, cfg = CASES[case]
    args = make_inputs(q_lens, ctx_lens, heads, kv_heads, head_size, block_size, dtype)
    expected = prefill_attention_ref(*args)
    actual = prefill_attention_triton(*args, config=cfg)
    # fp32: exp2 with a folded scale and a different summation order than the reference's
    # SDPA give ~5e-7 absolute on outputs of magnitude ~0.3; the table's atol covers that.
    assert_close(actual, expected, name=case)


def test_prefill_config_takes_switches_from_the_tuning_table(monkeypatch):
    """A tuned entry (bench output, JSON booleans) switches the options on for that bucket."""
    from fuselm.kernels import triton_utils
    from fuselm.kernels.prefill_attention import prefill_config

    tuned = {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 2,
             "fold_scale": True, "narrow_offsets": True, "lean_edges": True}
    monkeypatch.setattr(triton_utils, "tuned_triton_config", lambda *a: tuned)
    cfg = prefill_config(128, torch.bfloat16, torch.device("cuda", 0))
    assert cfg == PrefillConfig(128, 128, 8, 2, fold_scale=True, narrow_offsets=True,
                                lean_edges=True)


def test_prefill_registry_op_and_opcheck():
    args = make_inputs([5, 3], [4, 0], 4, 2, 64, 16, torch.float32, device=DEVICE)
    op = resolve("prefill_attention", "triton", DEVICE)
    assert op is torch.ops.fuselm.prefill_attention.default
    assert_close(op(*args), prefill_attention_ref(*args))
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_prefill_writes_into_out():
    args = make_inputs([6], [3], 2, 1, 64, 16, torch.float32)
    out = torch.full_like(args[0], float("nan"))
    assert prefill_attention_triton(*args, out=out) is out
    assert_close(out, prefill_attention_ref(*args))


def test_prefill_rejects_bad_shapes():
    with pytest.raises(ValueError, match="head_size"):
        prefill_attention_triton(*make_inputs([3], [0], 2, 2, 72, 16, torch.float32))
    q, kv, cache = torch.randn(3, 3, 64), torch.randn(3, 2, 64), torch.randn(2, 16, 2, 64)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        prefill_attention_triton(q, kv, kv, cache, cache, torch.tensor([0, 3]).int(),
                                 torch.tensor([3]).int(), torch.zeros(1, 1).int(), 0.125)


# ------------------------------------------------------------------------------------- GPU --

GPU_CASES = {
    "llama8b_mixed": ([1, 7, 300, 1024, 2048], [0, 100, 512, 0, 1000], 32, 8, 128, 16),
    "gqa1_hd64_bs32": ([513, 129, 1], [0, 64, 4000], 16, 16, 64, 32),
    "gqa3_hd128": ([777, 64], [33, 2000], 12, 4, 128, 16),
    "gqa7_hd64": ([1000, 5], [0, 1500], 28, 4, 64, 16),
    "hd96_gqa8": ([640], [300], 16, 2, 96, 32),
    "hd256": ([300, 257], [0, 129], 8, 4, 256, 16),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
def test_prefill_triton_gpu_bf16(case):
    q_lens, ctx_lens, heads, kv_heads, head_size, block_size = GPU_CASES[case]
    args = make_inputs(q_lens, ctx_lens, heads, kv_heads, head_size, block_size, torch.bfloat16,
                       device="cuda")
    expected = prefill_attention_ref(*args)
    actual = resolve("prefill_attention", "triton", torch.device("cuda"))(*args)
    assert_close(actual, expected, name=case)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [
    PrefillConfig(128, 64, 8, 3), PrefillConfig(128, 128, 8, 2),
    PrefillConfig(128, 64, 8, 3, max_heads_per_prog=1), PrefillConfig(64, 64, 4, 3),
    PrefillConfig(128, 64, 8, 3, fold_scale=True, narrow_offsets=True, lean_edges=True),
    PrefillConfig(128, 128, 8, 2, fold_scale=True, narrow_offsets=True, lean_edges=True),
    PrefillConfig(128, 128, 8, 3, fold_scale=True, narrow_offsets=True, lean_edges=True),
], ids=["n64", "n128", "hpp1", "m64", "n64_all_switches", "n128s2_fold_i32_lean",
        "n128s3_all_switches"])
def test_prefill_triton_gpu_configs(config):
    """Sweep candidates on a mixed batch: tiles that run past a sequence (into the next one or
    beyond num_tokens) must be masked."""
    args = make_inputs(*GPU_CASES["llama8b_mixed"], torch.bfloat16, device="cuda")
    assert_close(prefill_attention_triton(*args, config=config), prefill_attention_ref(*args))


@pytest.mark.gpu
def test_prefill_triton_gpu_fp16_and_fp32():
    for dtype in (torch.float16, torch.float32):
        args = make_inputs([100, 1, 250], [0, 300, 77], 8, 2, 128, 16, dtype, device="cuda")
        assert_close(prefill_attention_triton(*args), prefill_attention_ref(*args),
                     name=str(dtype))


@pytest.mark.parametrize("window", [1, 5, 17, 200])
@pytest.mark.parametrize("case", ["mixed_prefix_gqa4", "gqa8_hd128_bn32", "fold_scale"])
def test_prefill_sliding_window_matches_reference(case, window):
    """A query at position i sees keys j > i - window, in the cached prefix, left of the
    diagonal and on it; a window past every position masks nothing."""
    q_lens, ctx_lens, heads, kv_heads, head_size, block_size, cfg = CASES[case]
    args = make_inputs(q_lens, ctx_lens, heads, kv_heads, head_size, block_size, torch.float32,
                       seed=window)
    expected = prefill_attention_ref(*args, window)
    assert_close(prefill_attention_triton(*args, config=cfg, sliding_window=window), expected,
                 name=f"{case} window {window}")
    if window == 200:
        assert_close(expected, prefill_attention_ref(*args), name="window past the context")
    else:
        assert not torch.allclose(expected, prefill_attention_ref(*args))


# ---- FP8 (e4m3fn) caches: the cached prefix dequantized, the new tokens from k/v -------------

FP8_SCALES = {"k_scale": 0.37, "v_scale": 0.11}


def _fp8_args(args):
    from fp8_reference import to_fp8_cache

    q, k, v, kc, vc, qsl, lens, bt, scale = args
    return (q, k, v, to_fp8_cache(kc, FP8_SCALES["k_scale"]),
            to_fp8_cache(vc, FP8_SCALES["v_scale"]), qsl, lens, bt, scale)


def _prefill_f64(q, k, v, kc, vc, qsl, lens, bt, scale, window=0):
    """float64: keys = dequantized cached prefix, then the new tokens' own k/v (causal)."""
    from fp8_reference import attention_f64, gather_tokens

    out = torch.zeros(q.shape, dtype=torch.float64)
    starts = qsl.tolist()
    for b, n in enumerate(lens.tolist()):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        ctx = n - (hi - lo)
        keys = torch.cat((gather_tokens(kc, bt[b], ctx).double() * FP8_SCALES["k_scale"],
                          k[lo:hi].double()))
        values = torch.cat((gather_tokens(vc, bt[b], ctx).double() * FP8_SCALES["v_scale"],
                            v[lo:hi].double()))
        qpos = torch.arange(ctx, n)[:, None]
        kpos = torch.arange(n)[None, :]
        visible = (kpos <= qpos) & ((kpos > qpos - window) if window else True)
        out[lo:hi] = attention_f64(q[lo:hi], keys, values, scale, visible)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", ["mixed_prefix_gqa4", "gqa7_prefix", "fold_scale",
                                  "gqa8_hd128_bn32"])
def test_prefill_fp8_matches_float64(case, dtype):
    q_lens, ctx_lens, heads, kv_heads, head_size, block_size, cfg = CASES[case]
    args = _fp8_args(make_inputs(q_lens, ctx_lens, heads, kv_heads, head_size, block_size,
                                 dtype, seed=8))
    expected = _prefill_f64(*args).to(dtype)
    assert_close(prefill_attention_ref(*args, **FP8_SCALES), expected, name="reference")
    assert_close(prefill_attention_triton(*args, config=cfg, **FP8_SCALES), expected,
                 name="triton")
    assert not torch.allclose(prefill_attention_ref(*args).float(), expected.float(), atol=1e-2)


def test_prefill_fp8_sliding_window_opcheck_and_checks():
    q_lens, ctx_lens, heads, kv_heads, head_size, block_size, cfg = CASES["mixed_prefix_gqa4"]
    args = _fp8_args(make_inputs(q_lens, ctx_lens, heads, kv_heads, head_size, block_size,
                                 torch.float32, seed=9))
    assert_close(prefill_attention_triton(*args, config=cfg, sliding_window=17, **FP8_SCALES),
                 _prefill_f64(*args, window=17).float(), name="window 17")
    op = resolve("prefill_attention", "triton", DEVICE)
    small = _fp8_args(make_inputs([5, 3], [4, 0], 4, 2, 32, 16, torch.float32))
    torch.library.opcheck(op, (*small, 0, 0.37, 0.11), test_utils=("test_faketensor",))
    q, k, v, kc, vc, qsl, lens, bt, scale = args
    with pytest.raises(ValueError, match="v_scale"):
        prefill_attention_triton(*args, v_scale=0.0)
    with pytest.raises(ValueError, match="caches"):
        prefill_attention_triton(q, k, v, kc, vc.float(), qsl, lens, bt, scale)


@pytest.mark.gpu
def test_prefill_fp8_gpu_bf16():
    """bf16 over fp8 prefixes at the 8B shape: Triton vs the reference (same fp8 semantics)
    and a short case vs float64."""
    args = _fp8_args(make_inputs(*GPU_CASES["llama8b_mixed"], torch.bfloat16, device="cuda"))
    assert_close(prefill_attention_triton(*args, **FP8_SCALES),
                 prefill_attention_ref(*args, **FP8_SCALES))
    small = _fp8_args(make_inputs([70, 1], [200, 33], 32, 8, 128, 16, torch.bfloat16))
    got = prefill_attention_triton(*(t.cuda() if isinstance(t, torch.Tensor) else t
                                     for t in small), **FP8_SCALES)
    assert_close(got.cpu(), _prefill_f64(*small).to(torch.bfloat16))
