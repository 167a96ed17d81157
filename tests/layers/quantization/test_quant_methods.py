"""Each linear method against an independent float64 dequantize-then-matmul on seeded random
inputs at odd shapes, online quantization's error bounds, and the GPU rows at the Llama-3-8B
layer shapes (bf16)."""

from __future__ import annotations

import pytest
import torch

from fuselm.kernels import quant_gemv
from fuselm.kernels.kernel_set import KernelSet
from fuselm.layers.linear import ReplicatedLinear
from fuselm.layers.quantization import linear_method
from fuselm.layers.quantization.config import QuantizationConfig
from tests.tolerances import FP8_SUM_ATOL, assert_close

FP8_MAX = 448.0
INT4_G32 = QuantizationConfig("int4", bits=4, group_size=32, zero_point=True)


def _layer(quant: QuantizationConfig, k: int, n: int, weight: torch.Tensor,
           bias: torch.Tensor | None = None, device: str = "cpu") -> ReplicatedLinear:
    """An online-quantized replicated linear holding ``weight``."""
    kernels = KernelSet("auto", device)
    with torch.device(device):
        layer = ReplicatedLinear(k, n, bias is not None, weight.dtype, kernels,
                                 method=linear_method(quant, kernels, ("x",)))
    layer.weight_loader(layer.weight, weight)
    if bias is not None:
        layer.weight_loader(layer.bias, bias)
    layer.method.process_weights_after_loading(layer)
    return layer


def int8_weight64(layer) -> torch.Tensor:
    """Independent dequantization of the int8 layout, float64."""
    return layer.qweight.double() * layer.scales.double()[:, None]


def int4_weight64(layer) -> torch.Tensor:
    """Independent dequantization of the int4 layout (arithmetic nibbles, gathered groups)."""
    packed = layer.qweight.to(torch.int64)
    n, half = packed.shape
    q = torch.empty(n, 2 * half, dtype=torch.int64)
    q[:, 0::2], q[:, 1::2] = packed % 16, packed // 16
    group = torch.arange(2 * half) // layer.group_size
    return (q - layer.zeros.to(torch.int64)[:, group]).double() * \
        layer.scales.double()[:, group]


def fp8_weight64(layer) -> torch.Tensor:
    return layer.weight.double() * layer.weight_scale.double()[:, None]


def _sum_atol(x: torch.Tensor, w: torch.Tensor, per: float) -> float:
    return per * float((x.double().abs() @ w.abs().t()).max()) + 1e-7


@pytest.mark.parametrize(("m", "k", "n"), [(1, 67, 29), (5, 130, 3), (3, 2, 17)])
def test_int8_apply_and_bound(m, k, n) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    w = torch.randn(n, k, generator=gen)
    w[0] = 0.0  # an all-zero row (vocabulary padding) stays exact
    x, b = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
    layer = _layer(QuantizationConfig.online("int8"), k, n, w, b)
    assert layer.qweight.dtype == torch.int8 and "weight" not in dict(layer.named_parameters())
    w64 = int8_weight64(layer)
    err = (w64 - w.double()).abs()
    assert bool((err <= layer.scales.double()[:, None] / 2 * (1 + 1e-6)).all())
    assert bool((w64[0] == 0).all())
    want = x.double() @ w64.t() + b.double()
    assert_close(layer(x), want.float(), atol=_sum_atol(x, w64, 2e-6), rtol=1e-5)


@pytest.mark.parametrize(("m", "k", "n"), [(1, 96, 37), (4, 160, 5), (7, 32, 64)])
def test_int4_apply_and_bound(m, k, n) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    w = torch.randn(n, k, generator=gen) + 0.5  # groups not centred on zero: zero points work
    x = torch.randn(m, k, generator=gen)
    layer = _layer(INT4_G32, k, n, w)
    assert layer.qweight.shape == (n, k // 2) and layer.zeros.shape == (n, k // 32)
    assert int(layer.zeros.max()) <= 15
    w64 = int4_weight64(layer)
    group = torch.arange(k) // 32
    bound = layer.scales.double()[:, group] / 2 * (1 + 1e-5)
    assert bool(((w64 - w.double()).abs() <= bound).all())
    assert_close(layer(x), (x.double() @ w64.t()).float(), atol=_sum_atol(x, w64, 2e-6),
                 rtol=1e-5)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_dense_from_m_path(name) -> None:
    """From ``dense_from_m`` rows on, the layer dequantizes and runs a dense matmul: the same
    product as its kernel below that, against the float64 reference."""
    gen = torch.Generator().manual_seed(7)
    k, n = 96, 21
    w = torch.randn(n, k, generator=gen)
    quant = INT4_G32 if name == "int4" else QuantizationConfig.online("int8")
    layer = _layer(quant, k, n, w, torch.randn(n, generator=gen))
    w64 = int4_weight64(layer) if name == "int4" else int8_weight64(layer)
    layer.dense_from_m = 3
    for m in (2, 3, 5):
        x = torch.randn(m, k, generator=gen)
        want = x.double() @ w64.t() + layer.bias.double()
        assert_close(layer(x), want.float(), atol=_sum_atol(x, w64, 2e-6), rtol=1e-5)


def test_int4_online_g128_default() -> None:
    quant = QuantizationConfig.online("int4")
    assert (quant.group_size, quant.zero_point, quant.lm_head_bits) == (128, True, 8)
    layer = _layer(quant, 256, 8, torch.randn(8, 256, generator=torch.Generator().manual_seed(1)))
    assert layer.scales.shape == (8, 2)
    with pytest.raises(ValueError, match="group size 128 does not divide the input width 64"):
        _layer(quant, 64, 8, torch.randn(8, 64))


def _fp8_ref(x: torch.Tensor, w64: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Per-token dynamic activation quantization, then the float64 product."""
    s = (x.double().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    xq = (x.double() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).double() * s
    out = xq @ w64.t()
    return out if b is None else out + b.double()


@pytest.mark.parametrize(("m", "k", "n"), [(1, 70, 33), (6, 129, 2), (3, 16, 48)])
def test_fp8_apply_and_bound(m, k, n) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    w, x, b = (torch.randn(n, k, generator=gen), torch.randn(m, k, generator=gen),
               torch.randn(n, generator=gen))
    layer = _layer(QuantizationConfig.online("fp8"), k, n, w, b)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (n,)
    w64 = fp8_weight64(layer)
    scale = layer.weight_scale.double()[:, None]
    bound = 2**-4 * w.double().abs() + 2**-10 * scale  # 3 mantissa bits; subnormals
    assert bool(((w64 - w.double()).abs() <= bound).all())
    atol = _sum_atol(x, w64, FP8_SUM_ATOL["float32"])
    assert_close(layer(x), _fp8_ref(x, w64, b).float(), atol=atol, rtol=1e-5)


def _row_sse64(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 squared error per row of ``w`` rounded to e4m3 under ``scale`` (no saturation:
    every candidate maps max|w| to at most 448)."""
    q = (w.double() / scale.double()[:, None]).to(torch.float8_e4m3fn).double()
    return (q * scale.double()[:, None] - w.double()).square().sum(dim=1)


def test_fp8_scale_search_never_worse_than_amax() -> None:
    """Weights on 4-bit levels (as the default model's Q4_1 blocks): each row's searched scale
    lies in [amax / 448, 2 amax / 448), its error is at most the amax scale's, and in total
    clearly below it."""
    from fuselm.layers.quantization.fp8 import quantize_fp8_per_channel

    gen = torch.Generator().manual_seed(17)
    n, k = 48, 256
    d = torch.rand(n, k // 32, 1, generator=gen) * 0.01 + 0.002
    m = -8 * d * (1 + 0.2 * torch.rand(n, k // 32, 1, generator=gen))
    w = (torch.randint(0, 16, (n, k // 32, 32), generator=gen) * d + m).reshape(n, k)
    q, scale = quantize_fp8_per_channel(w)
    amax = w.double().abs().amax(dim=1) / FP8_MAX
    assert bool((scale.double() >= amax * (1 - 1e-6)).all() and (scale.double() < 2 * amax).all())
    assert torch.equal(q, (w / scale[:, None]).to(torch.float8_e4m3fn))
    searched, plain = _row_sse64(w, scale), _row_sse64(w, amax.float())
    assert bool((searched <= plain * (1 + 1e-9)).all())
    assert float(searched.sum()) < 0.95 * float(plain.sum())


def test_dense_unchanged() -> None:
    gen = torch.Generator().manual_seed(3)
    w, x = torch.randn(9, 13, generator=gen), torch.randn(2, 13, generator=gen)
    kernels = KernelSet()
    layer = ReplicatedLinear(13, 9, False, kernels=kernels)
    assert layer.method.is_dense and layer.gemv.fn is None  # CPU: F.linear
    layer.weight_loader(layer.weight, w)
    assert_close(layer(x), (x.double() @ w.double().t()).float())
    assert layer.method.weight_bytes(layer) == 9 * 13 * 4


# Llama-3-8B layer shapes (N, K): qkv, o, gate_up, down
SHAPES_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["int8", "int4", "fp8"])
@pytest.mark.parametrize(("n", "k"), SHAPES_8B)
@pytest.mark.parametrize("m", [1, 16, 256, 600])
def test_methods_8b_shapes_gpu(name, n, k, m) -> None:
    """The KernelSet's kernels (auto) on the 8B shapes in bf16 against the float64 reference
    of the stored layout (600 rows: int4's dense_from_m path on the H200)."""
    gen = torch.Generator(device="cuda").manual_seed(n + k + m)
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).bfloat16()
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    layer = _layer(QuantizationConfig.online(name), k, n, w, device="cuda")
    layer = layer.cpu()
    w64 = {"int8": int8_weight64, "int4": int4_weight64, "fp8": fp8_weight64}[name](layer)
    layer = layer.cuda()
    got = layer(x).double().cpu()
    # fp8 at decode batches runs the W8A16 GEMV (x not quantized) where the extension is built
    w8a8 = name == "fp8" and not (m <= quant_gemv.FP8_MAX_M and quant_gemv.available())
    want = _fp8_ref(x.cpu(), w64, None) if w8a8 else x.cpu().double() @ w64.t()
    per = FP8_SUM_ATOL["gpu"] if w8a8 else 2**-9  # bf16 output, fp32 accumulation
    atol = _sum_atol(x.cpu(), w64, per)
    assert_close(got, want, atol=atol, rtol=1.6e-2, name=f"{name} m{m} n{n} k{k}")
