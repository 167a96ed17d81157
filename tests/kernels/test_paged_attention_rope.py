"""paged_attention_rope (decode with rotary + KV write fused in): the Triton kernel against the
reference pair (rotary_store_kv_ref, then paged_attention_ref) on fresh random inputs: output,
both caches, untouched q/k/v; split-KV partitions, padded rows, QKV views; the layer's switch."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close

from fuselm.kernels import available_backends
from fuselm.kernels.paged_attention import PagedAttentionWorkspace
from fuselm.kernels.paged_attention_rope import check_rope_args, paged_attention_rope_ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

needs_triton = pytest.mark.skipif("triton" not in available_backends("paged_attention"),
                                  reason="no triton")  # fmt: skip


def rope_table(max_pos: int, head_size: int, base: float = 10000.0) -> torch.Tensor:
    """float32 ``[max_pos, head_size]``: cosines, then sines, of the neox frequencies."""
    inv = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=-1).float()


def make_rope_inputs(seq_lens, heads, kv_heads, head_size, block_size, max_len, dtype,
                     device=DEVICE, seed=0, dead_slot=None):
    """Unrotated q/k/v as views of one QKV row per sequence, a paged cache in scattered blocks,
    positions = seq_len - 1 and the new token's slot (-1 for empty rows and ``dead_slot``)."""
    gen = torch.Generator().manual_seed(seed)
    num_seqs, max_blocks = len(seq_lens), -(-max_len // block_size)
    num_blocks = num_seqs * max_blocks + 3
    tables = torch.randperm(num_blocks, generator=gen)[: num_seqs * max_blocks]
    tables = tables.view(num_seqs, max_blocks).int()
    qkv = torch.randn(num_seqs, (heads + 2 * kv_heads) * head_size, generator=gen).to(dtype)
    q, k, v = qkv.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], dim=1)
    cache_shape = (num_blocks, block_size, kv_heads, head_size)
    key_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    value_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    positions = (lens.long() - 1).clamp(min=0)
    slots = torch.full((num_seqs,), -1, dtype=torch.int64)
    for i, n in enumerate(seq_lens):
        if n > 0 and i != dead_slot:
            slots[i] = int(tables[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size
    tensors = dict(q=q.view(num_seqs, heads, head_size), k=k.view(num_seqs, kv_heads, head_size),
                   v=v.view(num_seqs, kv_heads, head_size), positions=positions,
                   cos_sin_cache=rope_table(max_len, head_size), slot_mapping=slots,
                   key_cache=key_cache, value_cache=value_cache, block_tables=tables,
                   seq_lens=lens)
    return {name: t.to(device) for name, t in tensors.items()} | {"scale": head_size**-0.5}


def _ref_and_fused(inputs, heads, head_size, max_len, psize):
    ref_in = {n: (t.clone() if isinstance(t, torch.Tensor) else t) for n, t in inputs.items()}
    expected = paged_attention_rope_ref(**ref_in)
    num_seqs = inputs["q"].shape[0]
    ws = PagedAttentionWorkspace(num_seqs, heads, head_size, max_len, inputs["q"].device,
                                 partition_size=psize)
    before = {n: inputs[n].clone() for n in ("q", "k", "v")}
    actual = ws.rope(**inputs)
    for n, t in before.items():
        assert torch.equal(inputs[n], t), f"{n} was modified"
    return actual, expected, ref_in


# (seq_lens, heads, kv_heads, head_size, block_size, max_len, partition_size)
CASES = {
    # 4 partitions of 32: the new token in a partial, a full, the first and a one-token partition
    "split_gqa4": ([70, 20, 128, 0, 33], 8, 2, 64, 16, 128, 32),
    "split_gqa8_hd128": ([70, 1, 96], 8, 1, 128, 32, 128, 32),
    "one_partition_mha": ([5, 17, 0], 4, 4, 32, 16, 64, 64),
}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fused_matches_rotary_then_decode(case, dtype):
    seq_lens, heads, kv_heads, head_size, block_size, max_len, psize = CASES[case]
    inputs = make_rope_inputs(seq_lens, heads, kv_heads, head_size, block_size, max_len, dtype,
                              seed=len(case))
    actual, expected, ref_in = _ref_and_fused(inputs, heads, head_size, max_len, psize)
    assert_close(actual, expected, name=f"{case} output")
    assert_close(inputs["key_cache"], ref_in["key_cache"], name=f"{case} key cache")
    assert torch.equal(inputs["value_cache"], ref_in["value_cache"]), "value cache differs"


@needs_triton
def test_slot_minus_one_stores_nothing():
    """A live sequence whose slot is -1 (nothing to store) attends to the cache as it is."""
    inputs = make_rope_inputs([40, 9], 4, 2, 64, 16, 64, torch.float32, seed=3, dead_slot=0)
    caches = inputs["key_cache"].clone(), inputs["value_cache"].clone()
    actual, expected, ref_in = _ref_and_fused(inputs, 4, 64, 64, 16)
    assert_close(actual, expected, name="output")
    slot = int(inputs["slot_mapping"][1])
    changed = (inputs["key_cache"] != caches[0]).flatten(1).any(1).nonzero().flatten().tolist()
    assert changed == [slot // 16]  # only the live slot's block
    assert torch.equal(inputs["value_cache"], ref_in["value_cache"])


def test_bad_arguments_raise():
    inputs = make_rope_inputs([5], 4, 2, 64, 16, 32, torch.float32, device="cpu")
    args = [inputs[n] for n in ("q", "k", "v", "positions", "cos_sin_cache", "slot_mapping",
                                "key_cache", "value_cache")]
    check_rope_args(*args)
    half_table = args[:4] + [inputs["cos_sin_cache"][:, :32].contiguous()] + args[5:]
    with pytest.raises(ValueError, match="whole head"):
        check_rope_args(*half_table)
    fp16_cache = args[:6] + [inputs["key_cache"].half(), inputs["value_cache"].half()]
    with pytest.raises(ValueError, match="one dtype"):
        check_rope_args(*fp16_cache)
    cuda_ws = PagedAttentionWorkspace(1, 4, 64, 32, "cpu", backend="cuda")
    with pytest.raises(ValueError, match="triton workspace"):
        cuda_ws.rope(**inputs)


@needs_triton
def test_attention_layer_uses_the_fused_decode_when_set():
    """Attention.forward with ``set_decode_impl(ws, rope=ws.rope)`` gives the unfused layer's
    output and cache on a decode batch."""
    from fuselm.forward_batch import ForwardBatch
    from fuselm.layers.attention import Attention

    inputs = make_rope_inputs([37, 12], 8, 2, 64, 16, 64, torch.float32, seed=5)
    outs, caches = [], []
    for fused in (False, True):
        layer = Attention(8, 2, 64, inputs["scale"], inputs["cos_sin_cache"])
        layer.bind_kv_cache(inputs["key_cache"].clone(), inputs["value_cache"].clone())
        ws = PagedAttentionWorkspace(2, 8, 64, 64, DEVICE, partition_size=16)
        layer.set_decode_impl(ws, rope=ws.rope if fused else None)
        n = inputs["q"].shape[0]
        batch = ForwardBatch(
            query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=DEVICE),
            seq_lens=inputs["seq_lens"], slot_mapping=inputs["slot_mapping"],
            block_tables=inputs["block_tables"],
            logits_indices=torch.arange(n, device=DEVICE), max_query_len=1,
            max_seq_len=int(inputs["seq_lens"].max()))
        q, k, v = (inputs[n].clone() for n in ("q", "k", "v"))
        outs.append(layer(q, k, v, inputs["positions"], batch))
        caches.append(layer.key_cache)
    assert_close(outs[1], outs[0], name="layer output")
    assert_close(caches[1], caches[0], name="layer key cache")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", [(32, 8), (16, 4)], ids=["llama8b", "llama8b_tp2"])
@pytest.mark.parametrize("seq_lens", [[1], [384], [1000, 17, 0, 257]], ids=str)
def test_gpu_bf16_llama_shapes(layout, seq_lens):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    heads, kv_heads = layout
    inputs = make_rope_inputs(seq_lens, heads, kv_heads, 128, 16, 2048, torch.bfloat16,
                              seed=sum(seq_lens))
    ws_size = None  # the workspace's batch-size partition buckets, as in serving
    actual, expected, ref_in = _ref_and_fused(inputs, heads, 128, 2048, ws_size)
    assert_close(actual, expected, name="output")
    assert_close(inputs["key_cache"], ref_in["key_cache"], name="key cache")
    assert torch.equal(inputs["value_cache"], ref_in["value_cache"])
