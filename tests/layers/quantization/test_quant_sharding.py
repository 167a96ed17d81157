"""Loading canonical quantized tensors into tensor-parallel layers (ranks emulated in one
process): each rank's stored shard dequantizes to its slice of the full weight; per-tensor
scales broadcast into their shard's rows; a merged layer's static input scale is the max;
misaligned shards are refused."""

from __future__ import annotations

import pytest
import torch

from fuselm.kernels.kernel_set import KernelSet
from fuselm.layers import linear
from fuselm.layers.quantization import linear_method
from fuselm.layers.quantization.config import QuantizationConfig
from tests.layers.quantization.test_quant_methods import int4_weight64, int8_weight64

FP8 = torch.float8_e4m3fn


@pytest.fixture
def tp(monkeypatch):
    """tp(rank, size): makes the next layers see that tensor-parallel rank."""
    def set_rank(rank: int, size: int) -> None:
        monkeypatch.setattr(linear.ps, "get_tp_rank", lambda: rank)
        monkeypatch.setattr(linear.ps, "get_tp_size", lambda: size)
    return set_rank


def _method(quant: QuantizationConfig):
    return linear_method(quant, KernelSet(), ("x",))


def test_row_parallel_int4_groups(tp) -> None:
    quant = QuantizationConfig("int4", source="awq", bits=4, group_size=32, zero_point=True)
    n, k, g = 12, 128, 32
    gen = torch.Generator().manual_seed(0)
    full = {"qweight": torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen),
            "scales": torch.rand(n, k // g, generator=gen) + 0.1,
            "zeros": torch.randint(0, 16, (n, k // g), dtype=torch.uint8, generator=gen)}
    want = None
    x = torch.randn(3, k, generator=gen)
    total = torch.zeros(3, n, dtype=torch.float64)
    for rank in range(2):
        tp(rank, 2)
        layer = linear.RowParallelLinear(k, n, reduce_results=False, dtype=torch.float32,
                                         method=_method(quant))
        for name, tensor in full.items():
            layer.weight_loader(getattr(layer, name), tensor)
        if want is None:
            tp(0, 1)
            whole = linear.ReplicatedLinear(k, n, False, torch.float32, method=_method(quant))
            for name, tensor in full.items():
                whole.weight_loader(getattr(whole, name), tensor)
            want = int4_weight64(whole)
        cols = slice(rank * k // 2, (rank + 1) * k // 2)
        assert torch.equal(int4_weight64(layer), want[:, cols])
        total += layer(x[:, cols]).double()
    torch.testing.assert_close(total, x.double() @ want.t(), rtol=1e-5, atol=1e-4)


def test_row_parallel_shard_must_hold_whole_groups(tp) -> None:
    tp(0, 2)
    quant = QuantizationConfig("int4", source="gptq", bits=4, group_size=64)
    with pytest.raises(ValueError, match="group size 64 does not divide the input width 32"):
        linear.RowParallelLinear(64, 8, dtype=torch.float32, method=_method(quant))


def test_merged_int8_column_shards(tp) -> None:
    quant = QuantizationConfig("int8", source="compressed-tensors", bits=8)
    gen = torch.Generator().manual_seed(1)
    parts = [(torch.randint(-127, 128, (8, 20), dtype=torch.int8, generator=gen),
              torch.rand(8, generator=gen)) for _ in range(2)]
    for rank in range(2):
        tp(rank, 2)
        layer = linear.MergedColumnParallelLinear(20, [8, 8], dtype=torch.float32,
                                                  method=_method(quant))
        for shard, (q, s) in enumerate(parts):
            layer.weight_loader(layer.qweight, q, shard)
            layer.weight_loader(layer.scales, s, shard)
        rows = slice(rank * 4, (rank + 1) * 4)
        want = torch.cat([q[rows].double() * s[rows, None].double() for q, s in parts])
        assert torch.equal(int8_weight64(layer), want)


def test_qkv_fp8_per_tensor_scales_and_static_input_scale(tp) -> None:
    quant = QuantizationConfig("fp8", source="compressed-tensors", activation_scheme="static")
    hidden, head = 16, 4  # 4 query heads, 2 KV heads over 2 ranks
    gen = torch.Generator().manual_seed(2)
    w = {s: torch.randn(rows, hidden, generator=gen).to(FP8) for s, rows in
         (("q", 16), ("k", 8), ("v", 8))}
    scale = {"q": torch.tensor([0.5]), "k": torch.tensor([2.0]), "v": torch.tensor([3.0])}
    in_scale = {"q": torch.tensor([0.1]), "k": torch.tensor([0.4]), "v": torch.tensor([0.2])}
    tp(1, 2)
    layer = linear.QKVParallelLinear(hidden, head, 4, 2, dtype=torch.float32,
                                     method=_method(quant))
    for s in "qkv":
        layer.weight_loader(layer.weight, w[s], s)
        layer.weight_loader(layer.weight_scale, scale[s], s)
        layer.weight_loader(layer.input_scale, in_scale[s], s)
    layer.method.process_weights_after_loading(layer)
    want_scale = torch.tensor([0.5] * 8 + [2.0] * 4 + [3.0] * 4)
    assert torch.equal(layer.weight_scale, want_scale)
    assert torch.equal(layer.input_scale, torch.tensor([0.4]))
    want_w = torch.cat([w["q"][8:], w["k"][4:], w["v"][4:]]).float()
    assert torch.equal(layer.weight.float(), want_w)


def test_block_fp8_scales_shard_by_blocks(tp) -> None:
    quant = QuantizationConfig("fp8", source="fp8", activation_scheme="dynamic",
                               weight_block=(128, 128))
    gen = torch.Generator().manual_seed(3)
    parts = [(torch.randn(256, 128, generator=gen).to(FP8), torch.rand(2, 1, generator=gen))
             for _ in range(2)]
    tp(1, 2)
    layer = linear.MergedColumnParallelLinear(128, [256, 256], dtype=torch.float32,
                                              method=_method(quant))
    assert layer.weight_scale.shape == (2, 1)
    for shard, (wt, sc) in enumerate(parts):
        layer.weight_loader(layer.weight, wt, shard)
        layer.weight_loader(layer.weight_scale, sc, shard)
    assert torch.equal(layer.weight_scale, torch.stack([parts[0][1][1], parts[1][1][1]]))
    tp(0, 4)  # 64 rows of a part per rank: not whole 128-row blocks
    small = linear.MergedColumnParallelLinear(128, [256, 256], dtype=torch.float32,
                                              method=_method(quant))
    with pytest.raises(ValueError, match="whole stored entries of 128"):
        small.weight_loader(small.weight_scale, parts[0][1], 0)
