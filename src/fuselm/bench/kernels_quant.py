"""Weight-only INT8 / INT4 matmuls against bf16 cuBLAS on the Llama-3-8B layer shapes.

For each weight shape (qkv, o, gate_up, down; the LM head for int8) and batch 1, 4, 16, 64,
256 the benchmark times, the way a decode step runs them (inside one CUDA graph, back to back
over enough distinct weight copies, >= 256 MB, that nothing is served from L2): bf16
``torch.mm`` (the same-run baseline) and every swept config of ``fuselm::int8_matmul`` /
``fuselm::int4_matmul`` (``gemv``, ``gemm``, ``dequant`` = dequantize then cuBLAS). It prints
the bytes a call reads (packed weights + scales + zeros + activations + output), GB/s and %
of the copy bandwidth measured in the same run, and the speed-up over bf16; the batch-1 sum
over a decoder layer; an estimate of the 32-layer decode step's matmul time. It writes
``int8_matmul.json`` / ``int4_matmul.json`` (the fastest config per shape and batch bucket)
into ``--configs-dir`` (default ``<output-dir>/configs``; into the package only with
``--write-package-configs``).

    python -m fuselm.bench.kernels_quant --output-dir out/quant --configs-dir out/quant/configs

Budget: about 3-4 minutes on an H200, most of it Triton compiling the swept configs
(``--quick`` times the heuristic configs and the CUDA GEMV launches only; ``--budget-s`` stops
sweeping past it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fuselm.bench import common
from fuselm.bench.kernels import add_configs_arguments, resolve_configs_dir
from fuselm.kernels.int4_matmul import QuantMatmulConfig as Cfg

LLAMA3_8B = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096),
             ("down", 4096, 14336)]
LM_HEAD = ("lm_head", 128256, 4096)
BATCHES = (1, 4, 16, 64, 256)
NUM_LAYERS = 32  # Llama-3-8B
GROUP = 128

# gemv bases (block_n, block_k, warps, stages) x modes (bit 0 XVEC, bit 1 NEXT: int8_matmul)
_GEMV4_BASES = [(8, 1024, 2, 1), (8, 2048, 4, 1), (16, 512, 2, 1), (16, 1024, 4, 1)]
_GEMV8_BASES = [(8, 1024, 4, 1), (16, 1024, 8, 1), (32, 512, 4, 1), (8, 512, 2, 1)]
GEMV4 = [Cfg("gemv", *b, 16, mode) for mode in (1, 3, 0, 2) for b in _GEMV4_BASES]
GEMV4 += [Cfg("gemv", 32, 1024, 4, 1, 16, 3), Cfg("gemv", 4, 1024, 1, 1, 16, 3),
          Cfg("gemv", 8, 1024, 2, 2, 16, 1), Cfg("gemv", 16, 512, 2, 3, 16, 1)]
GEMV8 = [Cfg("gemv", *b, 16, mode) for mode in (1, 3, 0, 2) for b in _GEMV8_BASES]


def cuda_gemv_sweep(m: int) -> list[Cfg]:
    """The CUDA GEMV launches (K-splitting warps x weight stream) that take batch m: no
    compiling, so ``--quick`` times them too."""
    from fuselm.kernels import quant_gemv

    return [Cfg("cuda_gemv", 16, 0, w, s) for s in quant_gemv.STAGES for w in (2, 4, 8, 16)
            if m <= quant_gemv.max_rows(s)]


def gemm_sweep(m: int, max_k: int) -> list[Cfg]:
    """Tensor-core configs tried at batch m (block_k at most ``max_k``: the group for int4):
    (block_m, block_n, block_k, warps, stages[, mode, split_k])."""
    k1, k2 = max_k, max_k // 2
    # small block_n: enough programs for N = 4096 (block_n 64 gave 64 programs: 1/2 the SMs);
    # split K multiplies the programs of the narrow shapes (N = 4096 / 6144: 96-192 tiles)
    if m <= 16:
        cands = [(16, 16, k1, 1, 3), (16, 32, k1, 2, 3), (16, 32, k2, 2, 4), (16, 64, k1, 4, 3),
                 (16, 16, k2, 1, 4)]
        cands += [(16, bn, k1, bn // 16, 3, 0, sk) for bn in (32, 64) for sk in (2, 4, 8)]
    elif m <= 64:
        cands = [(64, 32, k1, 4, 3), (32, 32, k1, 2, 3), (64, 64, k1, 4, 3), (32, 64, k1, 4, 3),
                 (64, 16, k1, 2, 3), (64, 32, k1, 4, 3, 0, 4), (32, 32, k1, 2, 3, 0, 4),
                 (64, 128, k1, 8, 3, 1, 2), (64, 128, k1, 8, 3, 1, 4), (64, 64, k1, 4, 4, 1, 4),
                 (64, 32, k1, 4, 4, 1, 4), (64, 64, k2, 4, 4, 1, 4)]
        cands += [(64, bn, k1, 4, 3, 1, sk) for bn in (32, 64) for sk in (2, 4, 8)]
    else:
        cands = [(128, 64, k1, 4, 3), (64, 64, k1, 4, 3), (128, 32, k1, 4, 3),
                 (128, 128, k1, 8, 3), (256, 64, k2, 8, 3)]  # split K: <= 3 % here (H200)
    return [Cfg("gemm", c[1], c[2], c[3], c[4], c[0], *c[5:]) for c in cands]


class Case:
    """One quantized weight format on one shape: ``copies`` distinct weights and how to run
    a config on copy i."""

    def __init__(self, kind: str, n: int, k: int, device: torch.device, scales_dtype: torch.dtype,
                 seed: int) -> None:
        self.kind, self.n, self.k = kind, n, k
        gen = torch.Generator(device=device).manual_seed(seed)
        if kind == "int4":
            per_copy = n * k // 2 + n * (k // GROUP) * (scales_dtype.itemsize + 1)
        else:
            per_copy = n * k + n * scales_dtype.itemsize
        self.weight_bytes = per_copy
        self.copies = max(2, -(-(256 << 20) // per_copy))
        self.weights = []
        for _ in range(self.copies):
            if kind == "int4":
                q = torch.randint(0, 256, (n, k // 2), device=device, dtype=torch.uint8,
                                  generator=gen)
                s = (torch.rand(n, k // GROUP, device=device, generator=gen) * 0.02 + 0.005)
                z = torch.randint(0, 16, (n, k // GROUP), device=device, dtype=torch.uint8,
                                  generator=gen)
                self.weights.append((q, s.to(scales_dtype), z))
            else:
                q = torch.randint(-128, 128, (n, k), device=device, dtype=torch.int8,
                                  generator=gen)
                s = torch.rand(n, device=device, generator=gen) * 0.002 + 0.0005
                self.weights.append((q, s.to(scales_dtype)))

    def launch(self, x: torch.Tensor, i: int, out: torch.Tensor, cfg: Cfg) -> None:
        """Runs ``cfg`` on weight copy ``i``."""
        if self.kind == "int4":
            from fuselm.kernels.int4_matmul import launch_int4_matmul

            q, s, z = self.weights[i]
            launch_int4_matmul(x, q, s, z, GROUP, out, cfg)
        else:
            from fuselm.kernels.int8_matmul import launch_int8_matmul

            q, s = self.weights[i]
            launch_int8_matmul(x, q, s, out, cfg)

    def expected(self, x: torch.Tensor) -> torch.Tensor:
        """float32 reference output of the last copy."""
        if self.kind == "int4":
            from fuselm.kernels.int4_matmul import int4_dequantize_ref

            w = int4_dequantize_ref(*self.weights[-1], GROUP)
        else:
            from fuselm.kernels.int8_matmul import int8_dequantize_ref

            w = int8_dequantize_ref(*self.weights[-1])
        return x.float() @ w.t()

    def configs(self, m: int, quick: bool) -> list[Cfg]:
        """The heuristic config of batch m first, then (unless ``quick``) the sweep."""
        device = self.weights[0][0].device
        if self.kind == "int4":
            from fuselm.kernels import int4_matmul as mod

            base = [mod.config_for(self.n, self.k, GROUP, m, device),
                    mod.default_config(self.n, self.k, GROUP, m)]
            sweep = (GEMV4 if m <= 4 else []) + gemm_sweep(m, GROUP)
            sweep = [c for c in sweep if mod.valid_config(c, GROUP)]
        else:
            from fuselm.kernels import int8_matmul as mod

            base = [mod.config_for(self.n, self.k, m, device),
                    mod.default_config(self.n, self.k, m)]
            sweep = (GEMV8 if m <= 4 else []) + gemm_sweep(m, 128)
            sweep = [c for c in sweep if mod.valid_config(c, self.k)]  # e.g. refused swap-AB
        dequant = [Cfg("dequant", 0, 0, 4)]
        cuda = cuda_gemv_sweep(m)
        return list(dict.fromkeys(base + cuda + (dequant if quick else sweep + dequant)))


def bf16_times(n: int, k: int, device: torch.device, replays: int,
               batches: tuple[int, ...] = BATCHES) -> dict[int, float]:
    """us a call of bf16 ``torch.mm`` per batch, over >= 256 MB of distinct weights."""
    copies = max(2, -(-(256 << 20) // (2 * n * k)))
    ws = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * k**-0.5 for _ in range(copies)]
    times = {}
    for m in batches:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        outs = [torch.empty(m, n, device=device, dtype=torch.bfloat16) for _ in range(copies)]

        def body(x=x, outs=outs) -> None:
            for w, o in zip(ws, outs, strict=True):
                torch.mm(x, w.t(), out=o)

        times[m] = common.graph_time_us(body, copies, replays)
    return times


def measure(case: Case, m: int, bf16_us: float, copy_gbs: float, replays: int, quick: bool,
            budget_s: float, compiled: dict[str, float]) -> dict[str, Any]:
    """Every config of ``case`` at batch m; the row of the fastest (a wrong one is skipped).
    ``compiled``: label -> seconds its first timing took (the compile); once a format has spent
    ``budget_s`` so, only configs timed before run."""
    device = case.weights[0][0].device
    x = torch.randn(m, case.k, device=device, dtype=torch.bfloat16)
    outs = [torch.empty(m, case.n, device=device, dtype=torch.bfloat16)
            for _ in range(case.copies)]
    expected = case.expected(x)
    scale = expected.abs().max().item()
    times: dict[str, float] = {}
    best: tuple[float, Cfg] | None = None
    configs = case.configs(m, quick)
    skipped = 0
    for j, cfg in enumerate(configs):
        key = f"{case.kind}:{cfg.label}"
        spent = sum(t for k, t in compiled.items() if k.startswith(case.kind))
        if j > 1 and key not in compiled and spent > budget_s:
            skipped += 1
            continue
        started = time.monotonic()

        def body(cfg=cfg) -> None:
            for i, o in enumerate(outs):
                case.launch(x, i, o, cfg)

        try:
            t = common.graph_time_us(body, case.copies, replays)
        except Exception as exc:  # noqa: BLE001 - one config failing must not end the sweep
            print(f"  {cfg.label} failed: {type(exc).__name__}: {str(exc)[:200]}",
                  file=sys.stderr)
            continue
        finally:
            compiled.setdefault(key, time.monotonic() - started)
        err = (outs[-1].float() - expected).abs().max().item()
        if err > 0.02 * scale + 1e-3:
            print(f"  {cfg.label} wrong (max err {err:.3g} of {scale:.3g}); skipped",
                  file=sys.stderr)
            continue
        times[cfg.label] = round(t, 2)
        if best is None or t < best[0]:
            best = (t, cfg)
    if skipped:
        print(f"  budget reached: {skipped} uncompiled configs of {case.kind} n{case.n} m{m} "
              "not swept", file=sys.stderr)
    moved = case.weight_bytes + 2 * m * (case.k + case.n)  # + bf16 activations in and out
    row: dict[str, Any] = {"kind": case.kind, "n": case.n, "k": case.k, "m": m,
                           "MB": round(moved / 1e6, 2), "bf16_us": round(bf16_us, 2),
                           "configs_us": times}
    if best is None:
        return {**row, "us": float("nan"), "config": None}
    row.update(us=round(best[0], 2), config=best[1].to_dict(), variant=best[1].label,
               default_us=times.get(configs[0].label, float("nan")))
    row["GB/s"] = round(moved / (best[0] * 1e-6) / 1e9, 1)
    row["%copy"] = round(100 * row["GB/s"] / copy_gbs, 1)
    row["x_bf16"] = round(bf16_us / best[0], 3)
    return row


def tuning_table(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict]]:
    """``{op: {bucket: {"backend": "triton", "triton": config, "us": ...}}}``."""
    from fuselm.kernels.int4_matmul import shape_bucket as bucket4
    from fuselm.kernels.int8_matmul import shape_bucket as bucket8

    tables: dict[str, dict[str, dict]] = {"int4_matmul": {}, "int8_matmul": {}}
    for r in rows:
        if r["config"] is None:
            continue
        if r["kind"] == "int4":
            op, bucket = "int4_matmul", bucket4(r["n"], r["k"], GROUP, r["m"])
        else:
            op, bucket = "int8_matmul", bucket8(r["n"], r["k"], r["m"])
        tables[op][bucket] = {"backend": "triton", "triton": r["config"],
                              "us": {"best": r["us"], "bf16": r["bf16_us"]}}
    return tables


def summary(rows: list[dict[str, Any]], copy_gbs: float) -> list[dict[str, Any]]:
    """Per format and batch: a decoder layer's matmuls (qkv + o + gate_up + down), their GB/s,
    and the 32-layer step's matmul time (+ the int8 LM head where measured)."""
    out = []
    for kind in ("int8", "int4"):
        for m in sorted({r["m"] for r in rows}):
            layer = [r for r in rows if r["kind"] == kind and r["m"] == m and r["n"] != LM_HEAD[1]]
            if len(layer) != len(LLAMA3_8B):
                continue
            us = sum(r["us"] for r in layer)
            mb = sum(r["MB"] for r in layer)
            bf16 = sum(r["bf16_us"] for r in layer)
            head = [r for r in rows if r["kind"] == "int8" and r["m"] == m
                    and r["n"] == LM_HEAD[1]]
            step = NUM_LAYERS * us + (head[0]["us"] if head else 0.0)
            out.append({"kind": kind, "m": m, "layer_us": round(us, 2),
                        "layer_GB/s": round(mb / us * 1e3, 1),  # MB / us = TB/s
                        "layer_%copy": round(100 * mb / us * 1e3 / copy_gbs, 1),
                        "x_bf16": round(bf16 / us, 3),
                        "step_ms (32 layers + int8 lm_head)": round(step / 1e3, 3),
                        "slower_than_bf16": [f"n{r['n']}_k{r['k']}" for r in layer
                                             if r["us"] > r["bf16_us"]]})
    return out


COLUMNS = ("kind", "n", "k", "m", "MB", "bf16_us", "us", "default_us", "GB/s", "%copy",
           "x_bf16", "variant")


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``python -m fuselm.bench.kernels_quant``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", default=None, help="write kernels_quant-<gpu>.json here")
    p.add_argument("--formats", default="int4,int8", help="comma list of int4, int8")
    p.add_argument("--scales-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="dtype of the scales (the int4/int8 methods store the model dtype)")
    p.add_argument("--replays", type=int, default=10)
    p.add_argument("--quick", action="store_true",
                   help="time only the table's and the heuristic configs, and dequant")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES),
                   help="batch sizes M (prefill chunks too)")
    p.add_argument("--budget-s", type=float, default=200.0,
                   help="seconds of first-time (compiling) config runs, shared by the formats; "
                        "past it only configs already compiled are timed")
    add_configs_arguments(p)  # --configs-dir, else <output-dir or out>/configs
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels_quant needs a CUDA GPU", file=sys.stderr)
        return 2
    formats = [f for f in args.formats.split(",") if f]
    unknown = set(formats) - {"int4", "int8"}
    if unknown:
        raise SystemExit(f"--formats: unknown {sorted(unknown)} (int4, int8)")
    device = torch.device("cuda")
    scales_dtype = getattr(torch, args.scales_dtype)
    copy_gbs = common.copy_bandwidth_gbs(device)
    print(f"copy bandwidth {copy_gbs:.0f} GB/s (read + write)", flush=True)
    rows: list[dict[str, Any]] = []
    compiled: dict[str, float] = {}
    budget = args.budget_s / len(formats)  # compile seconds a format may spend
    shapes = LLAMA3_8B + ([LM_HEAD] if "int8" in formats else [])
    for name, n, k in shapes:
        bf16 = bf16_times(n, k, device, args.replays, tuple(args.batches))
        kinds = [f for f in formats if name != "lm_head" or f == "int8"]
        for kind in kinds:
            case = Case(kind, n, k, device, scales_dtype, seed=n + k)
            for m in args.batches:
                rows.append({"name": name, **measure(case, m, bf16[m], copy_gbs, args.replays,
                                                     args.quick, budget, compiled)})
                print(common.format_table(rows[-1:], ("name",) + COLUMNS), flush=True)
            del case
            torch.cuda.empty_cache()
    print(common.format_table(rows, ("name",) + COLUMNS))
    summ = summary(rows, copy_gbs)
    print(common.format_table(summ))
    gpu = torch.cuda.get_device_name(device)
    result = {"env": common.environment(), "copy_GB/s": copy_gbs, "scales_dtype":
              args.scales_dtype, "rows": rows, "summary": summ}
    if args.output_dir:
        path = Path(args.output_dir) / f"kernels_quant-{common.gpu_slug(gpu)}.json"
        print(f"wrote {common.write_json(path, result)}")
    configs_dir = resolve_configs_dir(args)
    if configs_dir is not None:
        from fuselm.bench.kernels import configs_note, write_tuning_tables

        tables = {op: t for op, t in tuning_table(rows).items() if t}
        for path in write_tuning_tables(tables, gpu, configs_dir):
            print(f"wrote {path}")
        print(configs_note(configs_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
