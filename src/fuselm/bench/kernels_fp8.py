"""FP8 (e4m3) W8A8 linear layers on the Llama-3-8B shapes: bf16 cuBLAS against torch._scaled_mm
(cuBLASLt / CUTLASS rowwise) and the Triton kernels, per weight shape and M bucket.

In one run, per shape (qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336) and
M in 1, 4, 16, 64, 256 (decode: timed inside a CUDA graph over enough distinct weight copies,
>= 256 MB, that nothing is served from L2; bytes really read and GB/s beside the copy bandwidth
measured now) and 4096, 8192 (prefill: TFLOP/s against 787 bf16 and 1979 fp8 dense): bf16
``torch.mm``, ``_scaled_mm`` rowwise (per-token x per-channel) and per-tensor, a sweep of Triton
configs (GEMV at small M, tiled GEMM), the weight-only W8A16 GEMV at M = 1, the activation
quantization and the fused RMSNorm + quantization; the block-FP8 GEMM (128 x 128) at 16 and
4096. It writes ``fp8_matmul.json`` (per ``n{N}_k{K}_m{M}`` bucket: the faster of ``cuda`` and
``triton`` and the best Triton config) to ``--configs-dir`` (else ``<output-dir>/configs``).

    python -m fuselm.bench.kernels_fp8 --output-dir DIR --configs-dir DIR   # ~3 min on an H200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from fuselm.bench import common
from fuselm.bench.kernels import add_configs_arguments, resolve_configs_dir

SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096),
          ("down", 4096, 14336)]
DECODE_M = (1, 4, 16, 64, 256)
PREFILL_M = (4096, 8192)
BF16_PEAK, FP8_PEAK = 787.0, 1979.0  # H200 dense TFLOP/s
NUM_LAYERS, LM_HEAD = 32, (128256, 4096)


def gemv_configs(m: int = 1) -> list:
    from fuselm.kernels.fp8_triton import GemvConfig as G

    if m > 1:  # one weight tile for all m rows
        r = 1 << (m - 1).bit_length()
        return [G(1, 4096, 8, 1, r), G(2, 4096, 8, 1, r), G(2, 2048, 8, 1, r),
                G(4, 2048, 8, 1, r), G(4, 1024, 4, 3, r), G(8, 1024, 8, 3, r)]
    return [G(1, 4096, 8), G(2, 4096, 8), G(4, 4096, 8), G(8, 4096, 16), G(4, 8192, 16),
            G(2, 2048, 4), G(4, 2048, 8, 3), G(8, 1024, 8, 3),
            # persistent (K <= block_k only): row blocks streamed with tiles in flight
            G(1, 4096, 4, 3, 1, 4), G(2, 4096, 8, 3, 1, 2), G(2, 4096, 8, 2, 1, 4),
            G(1, 16384, 16, 2, 1, 1), G(2, 16384, 16, 2, 1, 1), G(1, 16384, 8, 3, 1, 2)]


def gemm_configs(m: int, block: bool = False) -> list:
    from fuselm.kernels.fp8_triton import GemmConfig as C

    if m <= 64:
        # small N tiles: o_proj's 4096 outputs in 64-wide tiles are 64 programs on 132 SMs
        out = [C(16, 64, 128, 1, 4, 4), C(16, 32, 256, 1, 4, 4), C(16, 32, 128, 1, 4, 6),
               C(16, 64, 256, 1, 4, 3), C(32, 64, 128, 1, 4, 4), C(64, 64, 128, 1, 4, 4),
               C(64, 64, 128, 1, 4, 4, 1), C(16, 32, 128, 1, 4, 6, 1)]
    elif m <= 256:
        out = [C(64, 64, 128, 1, 4, 4), C(64, 128, 128, 8, 4, 4), C(128, 128, 128, 8, 8, 3),
               C(64, 256, 128, 8, 8, 3), C(64, 128, 128, 8, 4, 4, 1), C(128, 128, 128, 8, 8, 4, 1)]
    else:
        out = [C(128, 256, 128, 8, 8, 3), C(128, 128, 128, 8, 8, 4), C(256, 128, 128, 8, 8, 3),
               C(128, 256, 128, 8, 8, 3, 1), C(128, 128, 128, 8, 8, 4, 1),
               C(128, 128, 128, 8, 4, 4, 1), C(256, 128, 128, 8, 8, 3, 1)]
    return [c for c in out if not block or c.block_k <= 128]


def _quantized(n: int, k: int, device: torch.device, seed: int):
    from fuselm.kernels.fp8_matmul import quant_fp8_per_token_ref

    gen = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=gen) * k**-0.5
    wq, ws = quant_fp8_per_token_ref(w)
    return w, wq, ws.reshape(n)


def _copies(nbytes: int) -> int:
    return max(2, -(-(256 << 20) // nbytes))


def _sweep(name: str, configs: list, body_for, error, calls: int, timer) -> tuple[dict, Any]:
    """Times every config (``timer(body, calls)`` -> us a call); skips one that fails or whose
    ``error()`` (relative max error against the reference) exceeds 2 %."""
    times, best = {}, None
    for cfg in configs:
        try:
            t = timer(body_for(cfg), calls)
        except Exception as exc:  # noqa: BLE001 - one config failing must not end the sweep
            print(f"  {name}: {cfg.label} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        if (err := error()) > 0.02:
            print(f"  {name}: {cfg.label} wrong (rel err {err:.3g}); skipped", file=sys.stderr)
            continue
        times[cfg.label] = round(t, 2)
        if best is None or t < best[0]:
            best = (t, cfg)
    return times, best


def _graph_timer(body, calls: int) -> float:
    return common.graph_time_us(body, calls, replays=10)


def _eager_timer(body, calls: int) -> float:
    return common.time_gpu_ms(body, rep_ms=60) * 1e3 / calls


# --fast (the last device run of a session): the configs that won or came close on the H200
FAST_GEMV = {1: (0, 2, 8, 9), "rows": (0, 1)}
FAST_GEMM = {16: (0,), 64: (0, 5), 256: (1, 4), "prefill": (0, 3), "block": (0, 3)}


def _fast_pick(configs: list, idx: tuple[int, ...]) -> list:
    return [configs[i] for i in idx if i < len(configs)]


def _configs(m: int, block: bool, fast: bool) -> list:
    """The Triton configs swept for one M (all of them, or the --fast subset)."""
    gemm = gemm_configs(m, block)
    if fast:
        key = ("block" if block and m > 256 else 16 if m <= 16 else 64 if m <= 64 else
               256 if m <= 256 else "prefill")
        gemm = _fast_pick(gemm, FAST_GEMM[key])
    if m > 16 or block:
        return gemm
    gemv = gemv_configs(m)
    if fast:
        gemv = _fast_pick(gemv, FAST_GEMV[1] if m == 1 else FAST_GEMV["rows"])
    # (at M <= 4 the tiled GEMM's 16-row tiles waste the most)
    return gemv + gemm[:1 if fast else 2 if m == 1 else 3 if m <= 4 else None]


def measure(name: str, n: int, k: int, m: int, device: torch.device, copy_gbs: float,
            block: bool = False, fast: bool = False) -> dict[str, Any]:
    """One shape and M: bf16, _scaled_mm, the Triton sweep (block: the block-scaled GEMM)."""
    from fuselm.kernels import fp8_matmul as fm
    from fuselm.kernels import fp8_triton as ft

    decode = m <= max(DECODE_M)
    copies = _copies(n * k) if decode else 1
    ws_list = [_quantized(n, k, device, seed=i) for i in range(copies)]
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    xq, xs = fm.quant_fp8_per_token_ref(x)
    outs = [torch.empty(m, n, device=device, dtype=torch.bfloat16) for _ in range(copies)]
    timer = _graph_timer if decode else _eager_timer
    row: dict[str, Any] = {"name": name, "m": m, "n": n, "k": k, "block": block}
    if block:
        xq, xs = fm.quant_fp8_per_token_group_ref(x)
        bs = [torch.rand(*fm.block_scale_shapes(m, n, k)[1], device=device) / 50 + 1e-3
              for _ in range(copies)]
        expected = fm.fp8_block_matmul_ref(xq, xs, ws_list[-1][1], bs[-1], torch.float32)
    else:
        expected = fm.fp8_matmul_ref(xq, xs, ws_list[-1][1], ws_list[-1][2], torch.float32)
    scale = expected.abs().max().item() + 1e-6

    def rel_err() -> float:
        return (outs[-1].float() - expected).abs().max().item() / scale

    def bf16() -> None:
        for (w, _, _), o in zip(ws_list, outs, strict=True):
            torch.mm(x, w.t(), out=o)

    row["bf16_us"] = round(timer(bf16, copies), 2)
    if not block:
        row.update(_cuda_times(xq, xs, ws_list, expected, scale, timer))

    def triton_body(cfg):
        def body() -> None:
            for (_, wq, ws), o, i in zip(ws_list, outs, range(copies), strict=True):
                if block:
                    ft.launch_gemm(xq, xs, wq, bs[i], None, o, cfg, block_scaled=True)
                else:
                    fm.launch_fp8_matmul(xq, xs.reshape(-1), wq, ws, None, o, cfg)
        return body

    configs = _configs(m, block, fast)
    row["configs_us"], best = _sweep(f"{name} m{m}", configs, triton_body, rel_err, copies,
                                     timer)
    row["triton_us"] = round(best[0], 2) if best else float("nan")
    row["triton_config"] = best[1] if best else None
    row["triton_label"] = best[1].label if best else "-"
    if m == 1 and not block:
        row["w8a16_us"] = _w8a16_us(x, ws_list, outs, copies, best[1] if best else None, fast)
    _summarize(row, copy_gbs)
    return row


def _cuda_times(xq, xs, ws_list, expected, scale: float, timer) -> dict[str, float]:
    """torch._scaled_mm rowwise (with its error) and per-tensor, over the weight copies."""
    from fuselm.kernels import fp8_matmul as fm

    m, n, copies = xq.shape[0], ws_list[0][1].shape[0], len(ws_list)
    xs_row, one = xs.reshape(m, 1), torch.ones((), device=xq.device)

    def rowwise() -> None:  # no copy into outs: it would add a kernel to cuBLAS's time
        for _, wq, ws in ws_list:
            fm.scaled_mm(xq, xs_row, wq, ws.reshape(1, n), torch.bfloat16, None)

    def per_tensor() -> None:
        for _, wq, _ in ws_list:
            fm.scaled_mm(xq, one, wq, one, torch.bfloat16, None)

    out = {"cuda_us": round(timer(rowwise, copies), 2)}
    last = fm.scaled_mm(xq, xs_row, ws_list[-1][1], ws_list[-1][2].reshape(1, n),
                        torch.bfloat16, None)
    out["cuda_err"] = round((last.float() - expected).abs().max().item() / scale, 4)
    out["cuda_tensor_us"] = round(timer(per_tensor, copies), 2)
    return out


def _w8a16_us(x, ws_list, outs, copies, w8a8_best, fast: bool) -> float:
    """The weight-only GEMV (bf16 x, no activation quantization) at M = 1: the W8A8 winner's
    config (if a GEMV) and a few others."""
    from fuselm.kernels import fp8_triton as ft

    cfgs = gemv_configs()[:1 if fast else 5]
    if isinstance(w8a8_best, ft.GemvConfig):
        cfgs = list(dict.fromkeys([w8a8_best, *cfgs]))
    best = float("inf")
    for cfg in cfgs:
        def body(cfg=cfg) -> None:
            for (_, wq, ws), o in zip(ws_list, outs, strict=True):
                ft.launch_gemv(x, None, wq, ws, None, o, cfg)
        best = min(best, _graph_timer(body, copies))
    return round(best, 2)


def _summarize(row: dict[str, Any], copy_gbs: float) -> None:
    m, n, k = row["m"], row["n"], row["k"]
    fp8 = min(row.get("cuda_us", float("inf")), row["triton_us"])
    row["fp8_best_us"] = fp8
    row["x_bf16"] = round(row["bf16_us"] / fp8, 3)
    if m <= max(DECODE_M):  # bytes really read: weights (+ scales), x; written: out
        fp8_bytes = n * k + 4 * n + m * k + 4 * m + 2 * m * n
        bf16_bytes = 2 * n * k + 2 * m * k + 2 * m * n
        row["fp8_GB/s"] = round(fp8_bytes / (fp8 * 1e3), 1)
        row["fp8_%copy"] = round(100 * row["fp8_GB/s"] / copy_gbs, 1)
        row["bf16_GB/s"] = round(bf16_bytes / (row["bf16_us"] * 1e3), 1)
    else:
        flops = 2 * m * n * k
        row["bf16_TFLOP/s"] = round(flops / (row["bf16_us"] * 1e6), 1)
        row["fp8_TFLOP/s"] = round(flops / (fp8 * 1e6), 1)
        row["bf16_%peak"] = round(100 * row["bf16_TFLOP/s"] / BF16_PEAK, 1)
        row["fp8_%peak"] = round(100 * row["fp8_TFLOP/s"] / FP8_PEAK, 1)


def norm_quant_rows(device: torch.device) -> list[dict[str, Any]]:
    """Fused RMSNorm + per-token quantization against rms_norm + quant_fp8_per_token."""
    from fuselm.kernels import rms_norm_quant as rq
    from fuselm.kernels.rms_norm import rms_norm_triton

    rows = []
    for m in (1, 256, 8192):
        x = torch.randn(m, 4096, device=device, dtype=torch.bfloat16)
        w = torch.ones(4096, device=device, dtype=torch.bfloat16)
        fused = _graph_timer(lambda x=x, w=w: rq.rms_norm_quant_fp8_triton(x, w, 1e-6), 1)
        separate = _graph_timer(lambda x=x, w=w: rq.quant_fp8_per_token_triton(
            rms_norm_triton(x, w, 1e-6)), 1)
        quant = _graph_timer(lambda x=x: rq.quant_fp8_per_token_triton(x), 1)
        nbytes = m * 4096 * 3 + m * 4
        rows.append({"m": m, "hidden": 4096, "fused_us": round(fused, 2),
                     "separate_us": round(separate, 2), "quant_only_us": round(quant, 2),
                     "fused_GB/s": round(nbytes / (fused * 1e3), 1)})
    return rows


def decode_estimate(rows: list[dict[str, Any]], device: torch.device) -> dict[str, float]:
    """Per-token time of the linear layers at M = 1 over 32 layers, with the LM head (bf16
    cuBLAS: it stays unquantized), for bf16 and the best fp8 path."""
    one = [r for r in rows if r["m"] == 1 and not r["block"]]
    x = torch.randn(1, LM_HEAD[1], device=device, dtype=torch.bfloat16)
    w = torch.randn(*LM_HEAD, device=device, dtype=torch.bfloat16)
    out = torch.empty(1, LM_HEAD[0], device=device, dtype=torch.bfloat16)
    head_us = _graph_timer(lambda: torch.mm(x, w.t(), out=out), 1)
    bf16 = NUM_LAYERS * sum(r["bf16_us"] for r in one) + head_us
    fp8 = NUM_LAYERS * sum(r["fp8_best_us"] for r in one) + head_us
    w8a16 = NUM_LAYERS * sum(r.get("w8a16_us", r["fp8_best_us"]) for r in one) + head_us
    return {"lm_head_bf16_us": round(head_us, 1), "bf16_ms": round(bf16 / 1e3, 3),
            "fp8_w8a8_ms": round(fp8 / 1e3, 3), "fp8_w8a16_ms": round(w8a16 / 1e3, 3),
            "target_ms": 2.4}


def tuning_table(rows: list[dict[str, Any]], margin: float) -> dict[str, dict]:
    """bucket -> {"backend": cuda|triton, "triton": best config + kind, "us": times}."""
    from fuselm.kernels.fp8_matmul import shape_bucket
    from fuselm.kernels.fp8_triton import GemvConfig

    table = {}
    for r in rows:
        cfg = r["triton_config"]
        if cfg is None:
            continue
        entry_cfg = {"kind": "gemv" if isinstance(cfg, GemvConfig) else "gemm", **cfg._asdict()}
        cuda = r.get("cuda_us", float("inf"))
        backend = "triton" if r["triton_us"] < cuda * (1 - margin) else "cuda"
        times = {"triton": r["triton_us"], "cuda": r.get("cuda_us"), "bf16": r["bf16_us"]}
        table[shape_bucket(r["n"], r["k"], r["m"], r["block"])] = {
            "backend": backend, "triton": entry_cfg,
            "us": {key: v for key, v in times.items() if v is not None}}
    return table


COLUMNS = ("name", "m", "n", "k", "block", "bf16_us", "cuda_us", "cuda_tensor_us", "triton_us",
           "triton_label",
           "w8a16_us", "x_bf16", "fp8_GB/s", "fp8_%copy", "bf16_GB/s", "bf16_TFLOP/s",
           "fp8_TFLOP/s", "fp8_%peak", "cuda_err")


def targets(rows: list[dict[str, Any]], est: dict[str, float]) -> list[str]:
    """The issue's kernel targets, met or not."""
    lines = []
    for r in rows:
        if r["m"] in PREFILL_M and not r["block"]:
            ok = "met" if r["x_bf16"] >= 1.6 else "NOT met"
            lines.append(f"prefill {r['name']} M={r['m']}: fp8 {r['x_bf16']}x bf16 (>= 1.6: {ok})")
    slow = [f"{r['name']} m{r['m']}" for r in rows if not r["block"] and r["x_bf16"] < 1.0]
    lines.append(f"fp8 slower than bf16 at: {', '.join(slow) or 'none'}")
    best = min(est["fp8_w8a8_ms"], est["fp8_w8a16_ms"])
    lines.append(f"batch-1 linear layers + bf16 LM head: fp8 {best} ms/token vs bf16 "
                 f"{est['bf16_ms']} (target <= 2.4: {'met' if best <= 2.4 else 'NOT met'})")
    return lines


def _measure_into(rows: list, name: str, n: int, k: int, m: int, device: torch.device,
                  copy_gbs: float, block: bool, fast: bool) -> None:
    """Appends one row and prints it; a case that fails is reported and skipped (the run and
    its tuning table go on)."""
    try:
        rows.append(measure(name, n, k, m, device, copy_gbs, block=block, fast=fast))
        print(common.format_table(rows[-1:], COLUMNS), flush=True)
    except Exception as exc:  # noqa: BLE001 - one failing case must not lose the others
        print(f"{name} m{m} block={block} FAILED: {type(exc).__name__}: {exc}", flush=True)
    torch.cuda.empty_cache()


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``python -m fuselm.bench.kernels_fp8``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", default=None, help="write fp8-<gpu>.json here")
    p.add_argument("--margin", type=float, default=0.02,
                   help="Triton must beat _scaled_mm by this fraction to be chosen")
    p.add_argument("--quick", action="store_true", help="qkv shape, M = 1 and 4096 only")
    p.add_argument("--fast", action="store_true",
                   help="every shape and M, a few Triton configs each (about 1.5 min)")
    add_configs_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels_fp8 needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    copy_gbs = common.copy_bandwidth_gbs(device)
    print(f"copy bandwidth {copy_gbs:.0f} GB/s; peaks bf16 {BF16_PEAK}, fp8 {FP8_PEAK} TFLOP/s")
    shapes = SHAPES[:1] if args.quick else SHAPES
    ms = (1, 4096) if args.quick else DECODE_M + PREFILL_M
    rows = []
    for name, n, k in shapes:
        for m in ms:
            _measure_into(rows, name, n, k, m, device, copy_gbs, False, args.fast)
        for m in (4096,) if args.fast else (16, 4096):
            _measure_into(rows, name, n, k, m, device, copy_gbs, True, args.fast)
    print(common.format_table(rows, COLUMNS))
    for r in rows:
        if r["m"] <= 16 and not r["block"]:
            top = sorted(r["configs_us"].items(), key=lambda kv: kv[1])[:6]
            print(f"{r['name']} m{r['m']} fastest triton configs (us): {top}")
    gpu = torch.cuda.get_device_name(device)
    configs_dir = resolve_configs_dir(args)
    if configs_dir is not None:  # first: the run may be cut short after this
        from fuselm.bench.kernels import configs_note, write_tuning_tables

        table = tuning_table(rows, args.margin)
        print(f"wrote {write_tuning_tables({'fp8_matmul': table}, gpu, configs_dir)}")
        print(configs_note(configs_dir), flush=True)
    for r in rows:
        r["triton_config"] = r["triton_config"].label if r["triton_config"] else None
    norm_rows = norm_quant_rows(device)
    print(common.format_table(norm_rows, tuple(norm_rows[0])))
    est = decode_estimate(rows, device)
    print(est)
    for line in targets(rows, est):
        print(line)
    if args.output_dir:
        result = {"env": common.environment(), "copy_GB/s": copy_gbs, "rows": rows,
                  "norm_quant": norm_rows, "decode_estimate": est}
        path = common.write_json(Path(args.output_dir) / f"fp8-{common.gpu_slug(gpu)}.json",
                                 result)
        print(f"wrote {path}")
    return 0




if __name__ == "__main__":
    raise SystemExit(main())
