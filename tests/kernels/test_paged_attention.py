"""paged_attention (decode): Triton and CUDA against the reference, including split-KV with
partial and empty partitions, the preallocated workspace and a CUDA graph replayed at a longer
context than it was captured at."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close

from fuselm.kernels import KernelSet, available_backends, resolve
from fuselm.kernels.paged_attention import (
    PagedAttentionWorkspace,
    paged_attention_ref,
    paged_attention_triton,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _require(backend: str) -> None:
    if backend not in available_backends("paged_attention"):
        pytest.skip(f"{backend} backend of paged_attention not available here")


def make_inputs(seq_lens, num_heads, num_kv_heads, head_size, block_size, dtype, max_len,
                device="cpu", seed=0):
    """q, a paged cache in scattered blocks and full-width block tables (max_len tokens a row)."""
    gen = torch.Generator().manual_seed(seed)
    num_seqs, max_blocks = len(seq_lens), -(-max_len // block_size)
    num_blocks = num_seqs * max_blocks + 5
    block_tables = torch.randperm(num_blocks, generator=gen)[: num_seqs * max_blocks]
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    args = (
        torch.randn(num_seqs, num_heads, head_size, generator=gen).to(dtype),
        torch.randn(shape, generator=gen).to(dtype),
        torch.randn(shape, generator=gen).to(dtype),
        block_tables.view(num_seqs, max_blocks).int(),
        torch.tensor(seq_lens, dtype=torch.int32),
    )
    return tuple(t.to(device) for t in args) + (head_size**-0.5,)


# (seq_lens, num_heads, num_kv_heads, head_size, block_size, max_len, partition_size)
# partition_size None: the allocating path (one 512-token partition at these sizes).
CASES = {
    "lens_1_7_40_0_gqa1": ([1, 7, 40, 0], 4, 4, 64, 16, 64, None),
    "gqa3_hd128_bs32": ([33, 5], 6, 2, 128, 32, 64, None),
    "gqa7_bs32": ([50, 1, 17], 7, 1, 64, 32, 64, None),
    # 4 partitions of 32: 70 = 2 full + 1 partial + 1 empty; 20 fits one (direct write);
    # 128 fills all; 0 gives zeros; 33 = 1 full + 1 of one token + 2 empty.
    "split_gqa4": ([70, 20, 128, 0, 33], 8, 2, 64, 16, 128, 32),
    "split_gqa8_hd128_bs32": ([70, 20, 128, 0, 33], 8, 1, 128, 32, 128, 32),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_paged_triton_matches_reference(case, dtype):
    _require("triton")
    seq_lens, heads, kv_heads, head_size, block_size, max_len, psize = CASES[case]
    args = make_inputs(seq_lens, heads, kv_heads, head_size, block_size, dtype, max_len)
    expected = paged_attention_ref(*args)
    if psize is None:
        actual = paged_attention_triton(*args)
    else:
        ws = PagedAttentionWorkspace(len(seq_lens), heads, head_size, max_len, "cpu",
                                     partition_size=psize)
        assert ws.max_partitions >= 3
        actual = ws(*args)
    assert_close(actual, expected, name=case)


def test_paged_workspace_reuse_out_and_longer_context():
    """One workspace, a short then a long context with the same block tables (what a CUDA graph
    replays), writing into a caller's ``out``."""
    _require("triton")
    args = list(make_inputs([16, 3], 8, 2, 64, 16, torch.float32, max_len=128))
    ws = PagedAttentionWorkspace(4, 8, 64, 128, "cpu", partition_size=32)
    out = torch.full_like(args[0], float("nan"))
    for seq_lens in ([16, 3], [100, 128]):
        args[4] = torch.tensor(seq_lens, dtype=torch.int32)
        assert ws(*args, out=out) is out
        assert_close(out, paged_attention_ref(*args), name=str(seq_lens))


def test_paged_workspace_batch_dependent_partitions():
    """The default workspace picks smaller partitions for smaller batches (short contexts still
    spread over the SMs); each batch size, short and long contexts, matches the reference."""
    _require("triton")
    ws = PagedAttentionWorkspace(40, 8, 64, 256, "cpu")
    assert ws.partition_size_for_batch(1) < ws.partition_size_for_batch(40)
    for seq_lens in ([16, 3], [100, 256], [5] * 9 + [200], [1] * 33 + [130]):
        args = make_inputs(seq_lens, 8, 2, 64, 16, torch.float32, max_len=256)
        assert_close(ws(*args), paged_attention_ref(*args), name=f"{len(seq_lens)} seqs")


def test_paged_registry_opcheck_and_factory():
    _require("triton")
    args = make_inputs([9, 40], 4, 2, 64, 16, torch.float32, 64, device=DEVICE)
    op = resolve("paged_attention", "triton", DEVICE)
    assert op is torch.ops.fuselm.paged_attention.default
    assert_close(op(*args), paged_attention_ref(*args))
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    ws = PagedAttentionWorkspace(2, 4, 64, 64, DEVICE, partition_size=16)
    out = torch.empty_like(args[0])
    size, tmp_out, max_logits, exp_sums = ws.buffers(2)
    torch.library.opcheck(
        torch.ops.fuselm.paged_attention_out.default,
        (out, tmp_out, max_logits, exp_sums, *args, size),
        test_utils=("test_schema", "test_faketensor"))
    kernels = KernelSet("triton", DEVICE, max_num_seqs=8, max_model_len=64)
    decode = kernels.decode_attention(4, 64)
    assert isinstance(decode.fn, PagedAttentionWorkspace)
    assert kernels.decode_attention(4, 64) is decode  # one workspace for every layer
    assert KernelSet("reference", DEVICE).decode_attention(4, 64).fn is paged_attention_ref
    with pytest.raises(ValueError, match="max_num_seqs"):
        KernelSet("triton", DEVICE).decode_attention(4, 64)  # cannot size its workspace


def test_paged_workspace_rejects_misfit():
    _require("triton")
    args = make_inputs([5, 5, 5], 4, 2, 64, 16, torch.float32, 32)
    with pytest.raises(ValueError, match="does not fit"):
        PagedAttentionWorkspace(2, 4, 64, 32, "cpu")(*args)
    with pytest.raises(ValueError, match="power of 2"):
        PagedAttentionWorkspace(2, 4, 64, 32, "cpu", partition_size=48)


# ------------------------------------------------------------------------------------- GPU --

GPU_CASES = {
    # (seq_lens, num_heads, num_kv_heads, head_size, block_size, max_len, partition_size)
    "llama8b_mixed": ([1, 7, 511, 512, 513, 4000, 4096, 0, 1500], 32, 8, 128, 16, 4096, None),
    "gqa1_hd64_bs32": ([1, 100, 3000], 16, 16, 64, 32, 3072, None),
    "gqa3_hd128": ([700, 2], 12, 4, 128, 16, 1024, 128),
    "gqa7_hd64": ([1025, 77], 28, 4, 64, 16, 2048, None),
    "gqa16_hd128": ([300, 2049], 32, 2, 128, 16, 4096, 256),
    "hd256": ([1, 600], 8, 4, 256, 16, 1024, 256),
    "long_32k": ([32768], 32, 8, 128, 16, 32768, None),
}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
def test_paged_gpu_bf16(case, backend):
    _require(backend)
    seq_lens, heads, kv_heads, head_size, block_size, max_len, psize = GPU_CASES[case]
    args = make_inputs(seq_lens, heads, kv_heads, head_size, block_size, torch.bfloat16,
                       max_len, device="cuda")
    expected = paged_attention_ref(*args)
    assert_close(resolve("paged_attention", backend, DEVICE)(*args), expected, name="allocating")
    ws = PagedAttentionWorkspace(len(seq_lens), heads, head_size, max_len, DEVICE,
                                 partition_size=psize)
    assert_close(ws(*args), expected, name="workspace")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_paged_gpu_other_dtypes(backend, dtype):
    _require(backend)
    args = make_inputs([5, 1000, 2500], 32, 8, 128, 16, dtype, 4096, device="cuda")
    assert_close(resolve("paged_attention", backend, DEVICE)(*args), paged_attention_ref(*args))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton"])
def test_paged_cuda_graph_captured_short_replayed_long(backend):
    """Captured with every sequence at context 16, replayed at 4000 (and mixed lengths)."""
    _require(backend)
    batch, max_len = 8, 4096
    q, kc, vc, bt, seq_lens, scale = make_inputs([16] * batch, 32, 8, 128, 16, torch.bfloat16,
                                                 max_len, device="cuda")
    ws = PagedAttentionWorkspace(batch, 32, 128, max_len, DEVICE)
    out = torch.empty_like(q)
    ws(q, kc, vc, bt, seq_lens, scale, out=out)  # warm-up: compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ws(q, kc, vc, bt, seq_lens, scale, out=out)
    for lens in ([16] * batch, [4000] * batch, [4000, 1, 0, 513, 2048, 16, 3999, 4096]):
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, paged_attention_ref(q, kc, vc, bt, seq_lens, scale), name=str(lens))


@pytest.mark.parametrize("window", [1, 10, 40, 300])
def test_paged_sliding_window_matches_reference(window):
    """Only the last ``window`` tokens of a sequence: partitions before the window contribute
    nothing (split-KV), a window past the context masks nothing."""
    _require("triton")
    seq_lens, heads, kv_heads, head_size, block_size, max_len, psize = CASES["split_gqa4"]
    args = make_inputs(seq_lens, heads, kv_heads, head_size, block_size, torch.float32, max_len,
                       seed=window)
    expected = paged_attention_ref(*args, window)
    ws = PagedAttentionWorkspace(len(seq_lens), heads, head_size, max_len, "cpu",
                                 partition_size=psize)
    assert_close(ws(*args, window), expected, name=f"workspace, window {window}")
    assert_close(paged_attention_triton(*args, window), expected, name=f"window {window}")
    full = paged_attention_ref(*args)
    assert torch.allclose(expected, full) == (window == 300)


# ---- FP8 (e4m3fn) caches: against float64 attention over the dequantized cache ---------------

FP8_SCALES = (0.37, 0.11)  # k_scale, v_scale: neither 1.0 nor a power of 2


def _fp8_args(args, k_scale=FP8_SCALES[0], v_scale=FP8_SCALES[1]):
    from fp8_reference import to_fp8_cache

    q, kc, vc, bt, lens, scale = args
    return q, to_fp8_cache(kc, k_scale), to_fp8_cache(vc, v_scale), bt, lens, scale


def _decode_f64(q, kc, vc, bt, lens, scale, window=0, k_scale=FP8_SCALES[0],
                v_scale=FP8_SCALES[1]):
    """float64 decode attention over ``cache.double() * scale``, token by token."""
    from fp8_reference import attention_f64, gather_tokens

    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, n in enumerate(lens.tolist()):
        if n == 0:
            continue
        keys = gather_tokens(kc.cpu(), bt[b].cpu(), n).double() * k_scale
        values = gather_tokens(vc.cpu(), bt[b].cpu(), n).double() * v_scale
        visible = torch.arange(n)[None, :] >= (n - window if window else 0)
        out[b] = attention_f64(q[b : b + 1].cpu(), keys, values, scale, visible)[0]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", ["lens_1_7_40_0_gqa1", "gqa3_hd128_bs32", "split_gqa4"])
def test_paged_fp8_matches_float64(case, dtype):
    """Reference and Triton (allocating and split-KV workspace) on fp8 caches against float64
    attention over the dequantized values."""
    _require("triton")
    seq_lens, heads, kv_heads, head_size, block_size, max_len, psize = CASES[case]
    args = _fp8_args(make_inputs(seq_lens, heads, kv_heads, head_size, block_size, dtype,
                                 max_len, seed=3))
    expected = _decode_f64(*args).to(dtype)
    scales = dict(zip(("k_scale", "v_scale"), FP8_SCALES, strict=True))
    assert_close(paged_attention_ref(*args, **scales), expected, name="reference")
    assert_close(paged_attention_triton(*args, **scales), expected, name="triton")
    ws = PagedAttentionWorkspace(len(seq_lens), heads, head_size, max_len, "cpu",
                                 partition_size=psize or 32)
    assert_close(ws(*args, **scales), expected, name="workspace")
    unscaled = paged_attention_ref(*args)  # the scales matter: a case that can fail
    assert not torch.allclose(unscaled.float(), expected.float(), atol=1e-2)


@pytest.mark.parametrize("fp8", [False, True], ids=["fp16", "fp8"])
def test_paged_partition_scale_and_register_cap(fp8):
    """A config whose partition is 2 or 4 of the workspace's (fewer partials than the workspace
    has room for; 128 = one partition: the direct write) and a register cap (ignored by the
    interpreter) matches the reference over partial, empty and full partitions."""
    from fuselm.kernels.paged_attention import DecodeConfig, paged_attention_triton_out

    _require("triton")
    seq_lens, heads, kv_heads, head_size, block_size, max_len, psize = CASES["split_gqa4"]
    args = make_inputs(seq_lens, heads, kv_heads, head_size, block_size, torch.float16,
                       max_len, seed=5)
    scales = {}
    if fp8:
        args = _fp8_args(args)
        scales = dict(zip(("k_scale", "v_scale"), FP8_SCALES, strict=True))
    expected = paged_attention_ref(*args, **scales)
    ws = PagedAttentionWorkspace(len(seq_lens), heads, head_size, max_len, "cpu",
                                 partition_size=psize)
    size, tmp_out, max_logits, exp_sums = ws.buffers(len(seq_lens))
    for partition_scale in (2, 4):
        out = torch.full_like(args[0], float("nan"))
        cfg = DecodeConfig(16, 4, 1, max_regs=128, partition_scale=partition_scale)
        paged_attention_triton_out(out, tmp_out, max_logits, exp_sums, *args, size, cfg,
                                   **scales)
        assert_close(out, expected, name=f"partition_scale {partition_scale}")


def test_paged_fp8_sliding_window_and_checks():
    _require("triton")
    seq_lens, heads, kv_heads, head_size, block_size, max_len, psize = CASES["split_gqa4"]
    args = _fp8_args(make_inputs(seq_lens, heads, kv_heads, head_size, block_size,
                                 torch.float32, max_len, seed=4))
    scales = dict(zip(("k_scale", "v_scale"), FP8_SCALES, strict=True))
    ws = PagedAttentionWorkspace(len(seq_lens), heads, head_size, max_len, "cpu",
                                 partition_size=psize)
    expected = _decode_f64(*args, window=40).float()
    assert_close(ws(*args, 40, **scales), expected, name="window 40")
    q, kc, vc, bt, lens, scale = args
    with pytest.raises(ValueError, match="k_scale"):
        paged_attention_triton(*args, k_scale=-1.0)
    with pytest.raises(ValueError, match="caches"):
        paged_attention_triton(q, kc, vc.float(), bt, lens, scale)


def test_paged_fp8_opcheck():
    _require("triton")
    args = _fp8_args(make_inputs([5, 20], 4, 2, 32, 16, torch.float32, 32))
    torch.library.opcheck(torch.ops.fuselm.paged_attention.default, (*args, 0, 0.37, 0.11),
                          test_utils=("test_faketensor", "test_autograd_registration"))


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["llama8b_mixed", "long_32k"])
def test_paged_gpu_fp8_bf16(case):
    """bf16 q over fp8 caches at the 8B shape: reference and workspace vs float64 (a sample of
    rows: the float64 loop is slow)."""
    _require("triton")
    seq_lens, heads, kv_heads, head_size, block_size, max_len, psize = GPU_CASES[case]
    args = _fp8_args(make_inputs(seq_lens, heads, kv_heads, head_size, block_size,
                                 torch.bfloat16, max_len, device="cuda"))
    scales = dict(zip(("k_scale", "v_scale"), FP8_SCALES, strict=True))
    ws = PagedAttentionWorkspace(len(seq_lens), heads, head_size, max_len, DEVICE,
                                 partition_size=psize)
    got, ref = ws(*args, **scales), paged_attention_ref(*args, **scales)
    assert_close(got, ref, name="workspace vs reference")
    rows = [0, len(seq_lens) - 1]
    q, kc, vc, bt, lens, scale = args
    expected = _decode_f64(q[rows], kc, vc, bt[rows], lens[rows], scale)
    assert_close(got[rows].cpu(), expected.to(torch.bfloat16), name="vs float64")


@pytest.mark.gpu
def test_paged_gpu_fp8_cuda_graph_replayed_longer():
    _require("triton")
    batch, max_len = 8, 4096
    args = _fp8_args(make_inputs([16] * batch, 32, 8, 128, 16, torch.bfloat16, max_len,
                                 device="cuda"))
    q, kc, vc, bt, seq_lens, scale = args
    scales = dict(zip(("k_scale", "v_scale"), FP8_SCALES, strict=True))
    ws = PagedAttentionWorkspace(batch, 32, 128, max_len, DEVICE)
    out = torch.empty_like(q)
    ws(*args, out=out, **scales)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ws(*args, out=out, **scales)
    seq_lens.copy_(torch.tensor([4000, 1, 0, 513, 2048, 16, 3999, 4096], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, paged_attention_ref(*args, **scales))
