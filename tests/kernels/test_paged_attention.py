"""paged_attention (decode): Triton and CUDA against the reference, including split-KV with
partial and empty partitions (merged in-kernel by the last partition to finish, with counters
that must be back at zero after every call), the preallocated workspace and a CUDA graph
replayed at a longer context than it was captured at."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tolerances import assert_close

from fuselm.kernels import available_backends, paged_attention, select
from fuselm.kernels.paged_attention import (
    PagedAttentionWorkspace,
    _allocate_workspace,
    make_paged_attention,
    merge_block,
    paged_attention_ref,
    paged_attention_triton,
    paged_attention_triton_out,
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
    # MHA (one query head per KV head) split over 4 partitions of 16
    "split_gqa1_hd64": ([64, 1, 0, 47, 16, 17], 4, 4, 64, 16, 64, 16),
    # 16 partitions of 16, merged 4 at a time (merge_block(16, 8, 128) == 4): the online
    # rescale between merge steps; one- and many-partition sequences and a 0 in one batch
    "split_16parts_gqa8_hd128": ([256, 200, 17, 16, 0, 129, 1], 8, 1, 128, 16, 256, 16),
    # group of 3 (padded to 4 in the merge), head size 80 (padded to 128), 6 of 8 partitions
    "split_gqa3_hd80": ([90, 3, 128, 33], 6, 2, 80, 16, 128, 16),
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
        assert int(ws.counters.abs().sum()) == 0, "merge counters not reset"
    assert_close(actual, expected, name=case)


def test_paged_triton_allocating_split():
    """The allocating path (per-call zeroed counters) with several partitions a sequence."""
    _require("triton")
    args = make_inputs([100, 5, 0, 128, 64], 8, 2, 64, 16, torch.float32, 128)
    assert_close(paged_attention_triton(*args, partition_size=16), paged_attention_ref(*args))


@pytest.mark.parametrize("block", [None, 1], ids=["merge_block", "one_a_step"])
def test_paged_triton_out_multi_step_merge_resets_counters(block, monkeypatch):
    """The launcher with its own buffers: 16 partitions merged 2 (``merge_block``) or 1 at a
    time (group 16); the counters it used are 0 afterwards, the ones past
    num_seqs * num_kv_heads never touched."""
    _require("triton")
    assert merge_block(16, 16, 128) == 2 and merge_block(2, 1, 64) == 2
    assert merge_block(64, 4, 128) == 8 and merge_block(8, 16, 256) == 1
    if block is not None:
        monkeypatch.setattr(paged_attention, "merge_block", lambda *_: block)
    args = make_inputs([256, 150, 1, 0, 33], 16, 1, 128, 16, torch.float32, 256, seed=3)
    q, num_parts = args[0], 16
    out = torch.full_like(q, float("nan"))
    tmp_out = torch.empty(5, 16, num_parts, 128)
    max_logits, exp_sums = torch.empty(5, 16, num_parts), torch.empty(5, 16, num_parts)
    counters = torch.zeros(5 + 3, dtype=torch.int32)
    counters[5:] = 7
    for _ in range(2):
        paged_attention_triton_out(out, tmp_out, max_logits, exp_sums, counters, *args, 16)
        assert counters[:5].tolist() == [0] * 5 and counters[5:].tolist() == [7] * 3
        assert_close(out, paged_attention_ref(*args))
    with pytest.raises(ValueError, match="counters"):
        paged_attention_triton_out(out, tmp_out, max_logits, exp_sums, counters[:4], *args, 16)


def test_paged_triton_merge_gated_by_counter():
    """Only the program that sees every other partition of its group counted merges: with a
    counter that starts far from 0 no one of a split sequence does (out keeps its NaNs), while a
    one-partition sequence is still written directly and its counter left alone."""
    _require("triton")
    args = make_inputs([40, 9], 4, 2, 64, 16, torch.float32, 64)
    out = torch.full_like(args[0], float("nan"))
    tmp_out, max_logits, exp_sums, counters, _ = _allocate_workspace(args[0], args[1], args[3],
                                                                     16)
    counters.fill_(100)
    paged_attention_triton_out(out, tmp_out, max_logits, exp_sums, counters, *args, 16)
    assert bool(out[0].isnan().all()) and counters.tolist() == [103, 103, 100, 100]
    assert_close(out[1], paged_attention_ref(*args)[1])


def test_paged_workspace_twice_counters_back_to_zero():
    """The same workspace called twice in a row on split sequences: the merge counters are 0
    after each call and the second call (new queries) is still right; the CUDA backend's
    workspace holds the same zeros."""
    _require("triton")
    args = list(make_inputs([128, 70, 0, 9, 100], 8, 2, 64, 16, torch.float32, 128, seed=1))
    ws = PagedAttentionWorkspace(5, 8, 64, 128, "cpu", partition_size=16)
    assert ws.counters.dtype == torch.int32 and ws.counters.numel() >= 5 * 2
    for call in range(2):
        args[0] = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(call))
        out = torch.full_like(args[0], float("nan"))
        ws(*args, out=out)
        assert int(ws.counters.abs().sum()) == 0, f"call {call}: counters not reset"
        assert_close(out, paged_attention_ref(*args), name=f"call {call}")


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
        assert int(ws.counters.abs().sum()) == 0
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
    op = select("paged_attention", "triton", DEVICE)
    assert op is torch.ops.fuselm.paged_attention.default
    assert_close(op(*args), paged_attention_ref(*args))
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    ws = PagedAttentionWorkspace(2, 4, 64, 64, DEVICE, partition_size=16)
    out = torch.empty_like(args[0])
    size, tmp_out, max_logits, exp_sums = ws.buffers(2)
    torch.library.opcheck(
        torch.ops.fuselm.paged_attention_out.default,
        (out, tmp_out, max_logits, exp_sums, ws.counters, *args, size),
        test_utils=("test_schema", "test_faketensor"))
    decode = make_paged_attention("triton", DEVICE, max_num_seqs=8, num_heads=4, head_size=64,
                                  max_model_len=64)
    assert isinstance(decode, PagedAttentionWorkspace)
    assert make_paged_attention("reference", DEVICE, max_num_seqs=8, num_heads=4, head_size=64,
                                max_model_len=64) is paged_attention_ref


def test_paged_workspace_rejects_misfit():
    _require("triton")
    args = make_inputs([5, 5, 5], 4, 2, 64, 16, torch.float32, 32)
    with pytest.raises(ValueError, match="does not fit"):
        PagedAttentionWorkspace(2, 4, 64, 32, "cpu")(*args)
    with pytest.raises(ValueError, match="power of 2"):
        PagedAttentionWorkspace(2, 4, 64, 32, "cpu", partition_size=48)


# The in-kernel merge's memory ordering, checked in the sm_90 PTX (no GPU needed; the
# interpreter runs programs one after another and cannot see it): every partial is stored, then
# a CTA barrier, then one acq_rel GPU-scope atomic; the merge reads the partials only after it,
# through L2 (.cg), and one 32-bit store resets the counter.
_SM90_MERGE_PTX = r"""
import re, sys, torch
torch.cuda.is_available = lambda: True
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fuselm.kernels import paged_attention as pa

fn = pa._paged_attention_kernel
consts = dict(GROUP=4, GROUP_PAD=16, MERGE_G_PAD=4, HEAD_SIZE=128, D_PAD=128,
              PARTITION_SIZE=512, BLOCK_N=64, MERGE_P=pa.merge_block(64, 4, 128),
              DOT_PRECISION="tf32", USE_PDL=True)
ptrs = dict(out_ptr="*bf16", tmp_out_ptr="*fp32", max_logits_ptr="*fp32", exp_sums_ptr="*fp32",
            counters_ptr="*i32", q_ptr="*bf16", kc_ptr="*bf16", vc_ptr="*bf16", bt_ptr="*i32",
            seq_lens_ptr="*i32", qk_scale="fp32")
sig = {n: ptrs.get(n, "i32") for n in fn.arg_names if n not in consts}
attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig)
         if n not in ("qk_scale", "block_size", "counters_ptr")}
src = ASTSource(fn, {**sig, **{k: "constexpr" for k in consts}}, consts, attrs)
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                     options={"num_warps": 4, "num_stages": 3}).asm["ptx"]
atoms = [m.start() for m in re.finditer(r"atom\.global\.gpu\.acq_rel\.add", ptx)]
if len(atoms) != 1 or len(re.findall(r"atom\.", ptx)) != 1:
    sys.exit(f"expected one acq_rel gpu atomic, got {re.findall(r'atom[.a-z0-9_]*', ptx)}")
before, after = ptx[: atoms[0]], ptx[atoms[0]:]
if before.rfind("bar.sync") < before.rfind("st.global"):
    sys.exit("no CTA barrier between the partial stores and the atomic")
if not re.search(r"(cp\.async\.cg|ld\.global\.cg)", after):
    sys.exit("the merge does not read the partials through L2 after the atomic")
if not re.search(r"st\.global\.b32", after):
    sys.exit("no counter reset after the atomic")
print("ok")
"""


def test_triton_merge_memory_ordering_in_sm90_ptx():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(Path(paged_attention.__file__).parents[2])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", _SM90_MERGE_PTX], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-4000:]}"


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
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
def test_paged_gpu_bf16(case, backend):
    _require(backend)
    seq_lens, heads, kv_heads, head_size, block_size, max_len, psize = GPU_CASES[case]
    args = make_inputs(seq_lens, heads, kv_heads, head_size, block_size, torch.bfloat16,
                       max_len, device="cuda")
    expected = paged_attention_ref(*args)
    assert_close(select("paged_attention", backend, DEVICE)(*args), expected, name="allocating")
    ws = PagedAttentionWorkspace(len(seq_lens), heads, head_size, max_len, DEVICE,
                                 backend=backend, partition_size=psize)
    assert_close(ws(*args), expected, name="workspace")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_paged_gpu_other_dtypes(backend, dtype):
    _require(backend)
    args = make_inputs([5, 1000, 2500], 32, 8, 128, 16, dtype, 4096, device="cuda")
    assert_close(select("paged_attention", backend, DEVICE)(*args), paged_attention_ref(*args))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_paged_cuda_graph_captured_short_replayed_long(backend):
    """Captured with every sequence at context 16, replayed at 4000 (and mixed lengths)."""
    _require(backend)
    batch, max_len = 8, 4096
    q, kc, vc, bt, seq_lens, scale = make_inputs([16] * batch, 32, 8, 128, 16, torch.bfloat16,
                                                 max_len, device="cuda")
    ws = PagedAttentionWorkspace(batch, 32, 128, max_len, DEVICE, backend=backend)
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
        assert int(ws.counters.abs().sum()) == 0
