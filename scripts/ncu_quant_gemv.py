"""Launches one CUDA weight-only GEMV (csrc/quant_gemv.cu) a few times on random weights, for
Nsight Compute to profile: ``ncu --clock-control none -k regex:quant_gemv python
scripts/ncu_quant_gemv.py int4 28672 4096 1 8 4``."""

from __future__ import annotations

import argparse

import torch

from fuselm.kernels import quant_gemv


def main() -> None:
    """Parses ``kind n k m num_warps num_stages`` and launches the kernel ``--iters`` times."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=["int4", "int8"])
    for name in ("n", "k", "m", "num_warps", "num_stages"):
        p.add_argument(name, type=int)
    p.add_argument("--iters", type=int, default=3)
    a = p.parse_args()
    dev = torch.device("cuda")
    x = torch.randn(a.m, a.k, device=dev, dtype=torch.bfloat16)
    out = torch.empty(a.m, a.n, device=dev, dtype=torch.bfloat16)
    if a.kind == "int4":
        q = torch.randint(0, 256, (a.n, a.k // 2), device=dev, dtype=torch.uint8)
        s = torch.rand(a.n, a.k // 128, device=dev).to(torch.bfloat16)
        z = torch.randint(0, 16, (a.n, a.k // 128), device=dev, dtype=torch.uint8)
        for _ in range(a.iters):
            assert quant_gemv.launch_int4_gemv(x, q, s, z, 128, out, 16, a.num_warps,
                                               a.num_stages, False)
    else:
        q = torch.randint(-128, 128, (a.n, a.k), device=dev, dtype=torch.int8)
        s = torch.rand(a.n, device=dev).to(torch.bfloat16)
        for _ in range(a.iters):
            assert quant_gemv.launch_int8_gemv(x, q, s, out, 16, a.num_warps, a.num_stages,
                                               False)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
