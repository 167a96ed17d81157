"""Kernel-test tolerances: the one table (STYLE.md), and comparisons that report mismatch counts.

Loosen per op only where the op's test says why.
"""

from __future__ import annotations

import torch

# dtype -> (atol, rtol)
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1.3e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
    # float64 references of low-precision kernels: callers pass the tolerance of the kernel's
    # own precision; this row only covers float64 compared with float64
    torch.float64: (1e-12, 1e-12),
}

# FP8 (e4m3) products (tests/kernels/test_fp8_matmul.py): the absolute error of a sum grows with
# sum_k |x_k w_k| (the dequantized operands), not with the result, so atol is that sum times
# these. "float32": float32 sums in another order (interpreter, CPU); "gpu": Hopper's FP8
# tensor cores accumulate without promotion to float32 (fast accumulation, cuBLASLt and Triton
# alike), plus a bf16 output checked by the bf16 row above.
FP8_SUM_ATOL = {"float32": 2e-6, "gpu": 2**-10}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for results of ``dtype``."""
    return TOLERANCES[dtype]


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    name: str = "output",
    atol: float | None = None,
    rtol: float | None = None,
) -> None:
    """Elementwise ``|a - e| <= atol + rtol |e|`` (NaN never passes); the message gives how many
    elements and which first mismatch."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    default_atol, default_rtol = tolerance(expected.dtype)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    a, e = actual.double(), expected.double()
    bad = ~((a - e).abs() <= atol + rtol * e.abs())
    num_bad = int(bad.sum())
    if num_bad:
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name}: {num_bad} of {bad.numel()} elements differ beyond atol={atol} rtol={rtol}; "
            f"max abs diff {(a - e).abs().nan_to_num(float('inf')).max().item():.3g}; "
            f"first at {idx}: {a[idx].item()} vs {e[idx].item()}"
        )


def count_cuda_kernels(fn, *args) -> int:
    """Kernels one call of ``fn(*args)`` launches, counted with the profiler (after a warm-up)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    return sum(1 for evt in prof.events() if evt.device_type == DeviceType.CUDA)
