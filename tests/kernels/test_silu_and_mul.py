"""silu_and_mul: every backend against the reference."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close, count_cuda_kernels

from fuselm.kernels import available_backends, resolve
from fuselm.kernels import silu_and_mul as sm

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU_DTYPES = [torch.float32, torch.float16]


def _impl(backend: str):
    if backend not in available_backends("silu_and_mul"):
        pytest.skip(f"{backend} backend of silu_and_mul not available here")
    return resolve("silu_and_mul", backend, DEVICE)


def _check(fn, x):
    expected = sm.silu_and_mul_ref(x)
    out = fn(x)
    assert out.dtype == x.dtype
    assert_close(out, expected)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("d", [96, 1536, 100, 1])
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_silu_and_mul(backend, dtype, d, num_tokens):
    torch.manual_seed(d * 100 + num_tokens)
    x = 3 * torch.randn(num_tokens, 2 * d, dtype=dtype, device=DEVICE)
    _check(_impl(backend), x)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_strided_rows_leading_dims_and_empty(backend):
    fn = _impl(backend)
    torch.manual_seed(0)
    wide = torch.randn(5, 300, device=DEVICE)
    _check(fn, wide[:, 4:260])  # rows 300 apart, d = 128
    _check(fn, torch.randn(2, 3, 64, device=DEVICE))
    assert fn(torch.randn(0, 64, device=DEVICE)).shape == (0, 32)
    with pytest.raises(ValueError):
        fn(torch.randn(3, 63, device=DEVICE))


# ---- every Triton launch variant (the configs the bench sweeps and the tuning table names) ----

VARIANT_CONFIGS = [
    ("2d", 32, 1, 1),
    ("2d", 128, 4, 1),
    ("rows", 32, 1, 1),
    ("rows", 64, 2, 4),  # 4 rows a program: the last group of 7 or 33 rows is partly masked
    ("flat", 64, 1, 1),  # flat tiles straddle rows
    ("flat", 256, 2, 1),
    ("flat", 1024, 4, 1),  # one program covers several rows
]


@pytest.mark.skipif("triton" not in available_backends("silu_and_mul"), reason="no triton")
@pytest.mark.parametrize("cfg", VARIANT_CONFIGS, ids=lambda c: "{}-b{}w{}r{}".format(*c))
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("num_tokens,d,pad", [(1, 96, 0), (7, 36, 8), (33, 100, 0), (7, 576, 24)])
def test_launch_variants(cfg, dtype, num_tokens, d, pad):
    """x rows ``2d + pad`` apart (pad > 0: a strided view); d = 36, 100, 576: not powers of 2."""
    torch.manual_seed(d + num_tokens)
    wide = 3 * torch.randn(num_tokens, 2 * d + pad, dtype=dtype, device=DEVICE)
    x = wide[:, pad // 2 : pad // 2 + 2 * d]
    out = torch.full((num_tokens, d), float("nan"), dtype=dtype, device=DEVICE)
    sm._launch_silu_and_mul(x, out, sm.SiluConfig(*cfg))
    assert_close(out, sm.silu_and_mul_ref(x))


@pytest.mark.skipif("triton" not in available_backends("silu_and_mul"), reason="no triton")
def test_flat_int64_indices():
    """The WIDE path (int64 indices, taken past 2**31 offsets) on a small strided input."""
    wide = torch.randn(9, 2 * 48 + 16, device=DEVICE)
    x = wide[:, 16:]
    out = torch.empty(9, 48, device=DEVICE)
    sm._launch_flat(x, out, sm.SiluConfig("flat", 128, 2), wide=True)
    assert_close(out, sm.silu_and_mul_ref(x))


def test_config_default_and_tuned(monkeypatch):
    """No table (or one without "variant"): the "2d" heuristic; a table entry picks the variant;
    an unknown variant is ignored."""
    cuda = torch.device("cuda", 0)
    assert sm.silu_config(14336, 2, 16384, torch.device("cpu")) == ("2d", 2048, 4, 1)
    assert sm.silu_config(1536, 2, 16384, torch.device("cpu")) == ("2d", 512, 1, 1)
    tables = {
        "old": {"block": 1024, "num_warps": 8},
        "flat": {"variant": "flat", "block": 4096, "num_warps": 8},
        "rows": {"variant": "rows", "block": 2048, "num_warps": 8, "rows": 2},
        "bad": {"variant": "future", "block": 64, "num_warps": 1},
    }
    expected = {"old": ("2d", 1024, 8, 1), "flat": ("flat", 4096, 8, 1),
                "rows": ("rows", 2048, 8, 2), "bad": ("2d", 2048, 4, 1)}  # fmt: skip
    for name, table in tables.items():
        monkeypatch.setattr(sm.triton_utils, "tuned_triton_config", lambda *a, t=table: t)
        assert sm.silu_config(14336, 2, 16384, cuda) == expected[name], name
        assert sm.silu_config(14336, 2, 7, cuda) == ("2d", 2048, 4, 1)  # few tokens: no table


@pytest.mark.skipif("triton" not in available_backends("silu_and_mul"), reason="no triton")
def test_bench_sweep_configs_run_and_round_trip(monkeypatch):
    """Every config ``fuselm bench kernels`` sweeps has a distinct stable label, runs correctly
    (on a small input), and, written to the table, comes back from ``silu_config``."""
    from fuselm.bench.kernel_cases import _silu_cases

    case = next(c for c in _silu_cases("full") if c.shape == "16384x14336")
    x = torch.randn(5, 2 * 40, device=DEVICE)
    found = case.triton_variants((x,))
    assert 10 <= len(found) <= 16 and {"flat-b1024w4", "rows-r1b64w1", "b2048w4"} <= set(found)
    launched = []
    launch = sm._launch_silu_and_mul
    monkeypatch.setattr(sm, "_launch_silu_and_mul", lambda x2, o, c: launched.append(o) or
                        launch(x2, o.fill_(float("nan")), c))  # fmt: skip
    for label, (cfg, fn) in found.items():
        fn()
        assert_close(launched[-1], sm.silu_and_mul_ref(x), name=label)
        monkeypatch.setattr(sm.triton_utils, "tuned_triton_config", lambda *a, t=cfg: t)
        assert sm.silu_config(40, 4, 16384, torch.device("cuda", 0)) == sm.SiluConfig(**cfg)


def test_opcheck_triton_op():
    if "triton" not in available_backends("silu_and_mul"):
        pytest.skip("no triton")
    x = torch.randn(3, 2 * 96, device=DEVICE)
    torch.library.opcheck(torch.ops.fuselm.silu_and_mul.default, (x,))


# ---- GPU ------------------------------------------------------------------------------------

GPU_SHAPES = [(t, d) for t in (1, 7, 16384) for d in (1536, 14336, 28672)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("num_tokens,d", GPU_SHAPES)
def test_gpu_bf16(backend, num_tokens, d):
    x = 3 * torch.randn(num_tokens, 2 * d, dtype=torch.bfloat16, device=DEVICE)
    _check(_impl(backend), x)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens,d", [(7, 576), (1000, 14336), (300, 1536)])
def test_gpu_bf16_sweep_configs(num_tokens, d):
    """Every config the bench sweeps (the tuning table may name any of them), in bf16."""
    from fuselm.bench.kernel_cases import _silu_label, _silu_sweep

    x = 3 * torch.randn(num_tokens, 2 * d, dtype=torch.bfloat16, device=DEVICE)
    expected = sm.silu_and_mul_ref(x)
    for cfg in _silu_sweep(d, x.element_size()):
        out = torch.full_like(expected, float("nan"))
        sm._launch_silu_and_mul(x, out, cfg)
        assert_close(out, expected, name=_silu_label(cfg))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_one_launch(backend):
    x = torch.randn(4096, 2 * 14336, dtype=torch.bfloat16, device=DEVICE)
    assert count_cuda_kernels(_impl(backend), x) == 1


@pytest.mark.gpu
def test_gpu_opcheck_cuda_op():
    if "cuda" not in available_backends("silu_and_mul"):
        pytest.skip("CUDA extension not loaded")
    x = torch.randn(5, 2 * 1536, dtype=torch.bfloat16, device=DEVICE)
    out = torch.empty(5, 1536, dtype=torch.bfloat16, device=DEVICE)
    torch.library.opcheck(torch.ops.fuselm_C.silu_and_mul.default, (out, x))
    torch.library.opcheck(torch.ops.fuselm.silu_and_mul.default, (x,))
