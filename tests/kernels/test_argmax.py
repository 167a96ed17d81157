"""argmax: the Triton backend against torch.argmax (the reference), ties, infinities and NaN."""

from __future__ import annotations

import pytest
import torch

from fuselm.kernels import argmax as am
from fuselm.kernels import available_backends, resolve

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU_DTYPES = [torch.float32, torch.float16]  # the interpreter's bf16 arithmetic is unreliable
NAN, INF = float("nan"), float("inf")

needs_triton = pytest.mark.skipif("triton" not in available_backends("argmax"),
                                  reason="no triton")  # fmt: skip


def _impl(backend: str):
    if backend not in available_backends("argmax"):
        pytest.skip(f"{backend} backend of argmax not available here")
    return resolve("argmax", backend, DEVICE)


def _check(fn, x: torch.Tensor) -> None:
    expected = torch.argmax(x, dim=-1)
    out = fn(x)
    assert out.dtype == torch.int64 and out.shape == expected.shape and out.device == x.device
    bad = (out != expected).nonzero().flatten().tolist()
    assert not bad, f"rows {bad} differ: {out[bad].tolist()} vs {expected[bad].tolist()}"


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("n", [1, 7, 4096, 4097, 10000])
@pytest.mark.parametrize("num_rows", [1, 3])
def test_random(dtype, n, num_rows):
    torch.manual_seed(n * 10 + num_rows)
    _check(_impl("triton"), 3 * torch.randn(num_rows, n, dtype=dtype, device=DEVICE))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("n", [7, 4097, 10000])
def test_random_ties(dtype, n):
    """Few distinct values: every row has its maximum many times (first index wins)."""
    torch.manual_seed(n)
    x = torch.randint(-3, 3, (3, n), device=DEVICE).to(dtype)
    _check(_impl("triton"), x)


def _row(n: int, fill: float, **at: float) -> torch.Tensor:
    row = torch.full((n,), fill)
    for pos, value in at.items():
        row[int(pos[1:])] = value
    return row


# Positions as "i<index>". BLOCK is 4096 for these n: index i and i + 4096 share a lane.
TIE_ROWS = {
    "same-lane-later-chunk": (9000, _row(9000, 0.0, i5=2.0, i4101=2.0, i8197=2.0), 5),
    "earlier-lane-later-chunk": (9000, _row(9000, 0.0, i4100=2.0, i100=2.0), 100),
    "later-lane-earlier-chunk": (9000, _row(9000, 0.0, i4097=2.0, i3000=2.0), 3000),
    "adjacent": (7, _row(7, -1.0, i2=1.0, i3=1.0, i6=1.0), 2),
    "all-equal": (4097, _row(4097, 0.5), 0),
    "all-minus-inf": (4097, _row(4097, -INF), 0),
    "minus-inf-and-one-value": (10000, _row(10000, -INF, i9999=-1e4), 9999),
    "plus-inf-twice": (10000, _row(10000, 1.0, i7000=INF, i4=5.0, i9000=INF), 7000),
    "signed-zeros": (10, _row(10, -1.0, i3=-0.0, i8=0.0), 3),
    "nan-first-of-two": (10000, _row(10000, 0.0, i8000=NAN, i300=NAN, i5=INF), 300),
    "nan-same-lane": (9000, _row(9000, 0.0, i4200=NAN, i104=NAN), 104),
    "nan-before-inf": (7, _row(7, 0.0, i1=NAN, i2=INF), 1),
    "nan-only": (3, _row(3, NAN), 0),
}


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", sorted(TIE_ROWS))
def test_ties_infinities_nan(case, dtype):
    """Expected indices are written out (and equal torch.argmax's): a kernel that kept the last
    index on ties, or the last NaN, fails."""
    n, row, expected = TIE_ROWS[case]
    x = torch.stack([row, _row(n, 0.0, **{f"i{n - 1}": 1.0})]).to(dtype).to(DEVICE)
    assert torch.argmax(x, dim=-1).tolist() == [expected, n - 1]
    out = _impl("triton")(x)
    assert out.tolist() == [expected, n - 1]


def test_rows_with_and_without_nan():
    """A NaN in one row does not leak into the others."""
    torch.manual_seed(1)
    x = torch.randn(3, 5000, device=DEVICE)
    x[1, 4321] = NAN
    x[1, 4999] = NAN
    _check(_impl("triton"), x)


def test_strided_rows_and_empty():
    fn = _impl("triton")
    torch.manual_seed(2)
    wide = torch.randn(4, 6000, device=DEVICE)
    _check(fn, wide[:, 3:5003])  # rows 6000 apart
    _check(fn, wide[1:3, :1])  # n = 1 (stride of the last dim irrelevant)
    assert fn(torch.randn(0, 10, device=DEVICE)).shape == (0,)


@needs_triton
@pytest.mark.parametrize("cfg", [(8, 1, 1), (64, 1, 3), (256, 2, 1), (4096, 8, 1), (512, 4, 4),
                                 (64, 1, 1, 128), (128, 2, 1, 128), (256, 2, 2, 512)])
def test_launch_configs(cfg):
    """Any config the tuning table could name; BLOCK smaller than n takes many chunks; a span
    cuts the row into programs merged by a second kernel (spans end inside ties and the NaN)."""
    torch.manual_seed(cfg[0])
    x = torch.randint(-5, 5, (3, 1000), device=DEVICE).float()
    x[2, 700] = NAN
    out = torch.full((3,), -1, dtype=torch.int64, device=DEVICE)
    am._launch_argmax(x, out, am._ArgmaxConfig(*cfg))
    assert out.tolist() == torch.argmax(x, dim=-1).tolist()


def test_config():
    cpu = torch.device("cpu")
    assert am._argmax_config(128256, cpu) == (4096, 8, 1, 4096)
    assert am._argmax_config(8192, cpu) == (4096, 8, 1, 0)
    assert am._argmax_config(7, cpu) == (8, 1, 1, 0)
    assert am._argmax_config(1000, cpu) == (1024, 2, 1, 0)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: torch.randn(2, 3, 4),
        lambda: torch.randn(5),
        lambda: torch.randn(2, 0),
        lambda: torch.randint(0, 5, (2, 7)),
        lambda: torch.randn(7, 2).t(),
    ],
    ids=["3d", "1d", "empty-last-dim", "int", "last-dim-strided"],
)
def test_bad_input(bad):
    fn = _impl("triton")
    with pytest.raises(ValueError):
        fn(bad().to(DEVICE))


def test_opcheck_triton_op():
    _impl("triton")
    x = torch.randn(3, 100, device=DEVICE)
    out = torch.ops.fuselm.argmax(x)
    assert out.tolist() == torch.argmax(x, dim=-1).tolist()
    torch.library.opcheck(torch.ops.fuselm.argmax.default, (x,))


def test_greedy_argmax_keeps_torch_on_cpu(monkeypatch):
    """CPU tensors never reach the Triton op (no interpreter in engine runs on CPU)."""

    def fail(x):
        raise AssertionError("the Triton op ran on a CPU tensor")

    monkeypatch.setattr(am, "_TRITON_OP", fail)
    x = torch.randn(4, 300)
    x[2, :] = 1.0
    out = am.greedy_argmax(x)
    assert out.dtype == torch.int64 and out.tolist() == torch.argmax(x, dim=-1).tolist()
    assert am.greedy_argmax(x[:, ::2]).tolist() == torch.argmax(x[:, ::2], dim=-1).tolist()


# ---- GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("num_rows", [1, 64])
def test_gpu_vocab(dtype, num_rows):
    torch.manual_seed(num_rows)
    x = 5 * torch.randn(num_rows, 128256, dtype=dtype, device=DEVICE)
    _check(_impl("triton"), x)
    x[:, 100000] = x.max() + 1  # a tie across the row's chunks and lanes: first index wins
    x[:, 70000] = x[0, 100000]
    _check(_impl("triton"), x)
    ties = torch.randint(-2, 2, (num_rows, 128256), device=DEVICE).to(dtype)
    _check(_impl("triton"), ties)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_greedy_argmax_uses_triton(monkeypatch, dtype):
    calls = []
    op = am._TRITON_OP
    monkeypatch.setattr(am, "_TRITON_OP", lambda x: calls.append(x) or op(x))
    x = torch.randn(1, 128256, dtype=dtype, device=DEVICE)
    assert am.greedy_argmax(x).tolist() == torch.argmax(x, dim=-1).tolist()
    assert len(calls) == 1


@pytest.mark.gpu
def test_gpu_two_launches_for_a_vocabulary():
    from tolerances import count_cuda_kernels

    x = torch.randn(1, 128256, device=DEVICE)
    assert count_cuda_kernels(am.argmax_triton, x) == 2  # the spans, then their merge
