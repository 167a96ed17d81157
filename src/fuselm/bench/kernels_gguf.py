"""GGUF packed matmuls (``fuselm::gguf_matmul``) against bf16 cuBLAS on the Llama-3-8B layer
shapes.

For each ggml type (``--types``, default Q4_K and Q8_0), weight shape (qkv, o, gate_up, down)
and batch 1, 4, 16, 64, 256 the benchmark times, the way a decode step runs them (inside one
CUDA graph, back to back over enough distinct weight copies, >= 256 MB, that nothing is served
from L2): bf16 ``torch.mm`` (the same-run baseline) and each swept config of the ``gemv``,
``gemm`` and ``dequant`` (Triton dequantize, then cuBLAS) variants, and the CUDA
GEMV (``cuda``) of Q4_K and Q8_0 at batch <= 16. It prints the bytes a call
reads (the packed blocks + bf16 activations in and out), GB/s and % of the copy bandwidth
measured in the same run (the H200's is about 4.27 TB/s read + write), and the speed-up over
bf16; per type the batch-1 decoder layer sum and the 32-layer estimate. With ``--compare-int``
(default on) it also times the W4A16 / W8A16 kernels' heuristic configs at batch 1 on the same
shapes (``bench.kernels_quant``), the targets Q4_K <= 1.15x INT4 and Q8_0 <= 1.15x INT8.
Writes ``kernels_gguf-<gpu>.json`` into ``--output-dir`` and the tuning table
``gguf_matmul.json`` into ``--configs-dir``.

    python -m fuselm.bench.kernels_gguf --output-dir out/gguf --configs-dir out/gguf/configs

Budget: ``--budget-s`` (default 360) stops sweeping (heuristic configs only) past it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fuselm.bench import common
from fuselm.bench.dummy_gguf import random_blocks
from fuselm.bench.kernels import add_configs_arguments, resolve_configs_dir
from fuselm.kernels.gguf_matmul import GGML_TYPES, TYPE_IDS, GGUFConfig, block_layout

LLAMA3_8B = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096),
             ("down", 4096, 14336)]
BATCHES = (1, 4, 16, 64, 256)
NUM_LAYERS = 32
COLUMNS = ("type", "name", "m", "MB", "bf16_us", "us", "default_us", "GB/s", "%copy", "x_bf16",
           "variant")


def sweep(ggml_type: int, m: int) -> list[GGUFConfig]:
    """Configs tried at batch m (the heuristic one is added first by the caller)."""
    from fuselm.kernels import quant_gemv

    elems, _ = block_layout(ggml_type)
    cuda = ([GGUFConfig("cuda", 1, 16, 1, w, 1) for w in (4, 8, 16)
             if m <= quant_gemv.STRIDED_MAX_M or w <= quant_gemv.GGUF_TWO_TILE_WARPS]
            if ggml_type in quant_gemv.GGUF_STEP_COLS and m <= quant_gemv.GGUF_MAX_M else [])
    if m == 1:
        blocks = (4, 8, 16, 32) if elems == 32 else (1, 2, 4)
        out = [GGUFConfig("gemv", 1, bn, bb, w, 1) for bn in (1, 2, 4, 8) for bb in blocks
               for w in (4, 8) if 1024 <= bn * bb * elems <= 8192]
        out += [GGUFConfig("gemv", 1, 4, bb, 4, 2) for bb in blocks[:2]]
        if ggml_type in (TYPE_IDS["Q4_K"], TYPE_IDS["Q8_0"]):  # the half-word decode
            out += [GGUFConfig("gemv16", 1, bn, bb, w, 1) for bn in (1, 2, 4, 8)
                    for bb in blocks for w in (4, 8) if 1024 <= bn * bb * elems <= 4096]
        return cuda + out
    bb = 4 if elems == 32 else 1
    # gemv rows re-read the weight tile from L2: worth it for a few rows
    rows = [GGUFConfig("gemv", 1, bn, 8 if elems == 32 else 2, 4, 1) for bn in (4, 8)]
    bms = (16,) if m <= 16 else ((32, 64) if m <= 64 else (64, 128))
    out = [GGUFConfig("gemm", bm, bn, b, 4, s) for bm in bms for bn in (16, 32, 64, 128)
           for b in (bb, 2 * bb) for s in (2, 3)]
    out = cuda + out + (rows if m <= 16 else [])
    return out + [GGUFConfig("dequant", 1, bn, b, 4, 1) for bn in (16, 32)
                  for b in ((8, 16) if elems == 32 else (1, 2))]


def quick_extra(ggml_type: int, base: GGUFConfig) -> list[GGUFConfig]:
    """``--quick``: besides the heuristic config, Q8_0's and Q4_K's gemv read as half-words."""
    if ggml_type in (TYPE_IDS["Q4_K"], TYPE_IDS["Q8_0"]) and base.variant == "gemv":
        return [base._replace(variant="gemv16")]
    return []


class Case:
    """Distinct packed copies of one ``[n, k]`` weight of one type (>= 256 MB together)."""

    def __init__(self, ggml_type: int, n: int, k: int, device: torch.device) -> None:
        from fuselm.kernels.gguf_matmul import gguf_dequantize_ref
        from fuselm.layers.quantization.gguf_packed import kernel_layout

        self.name = GGML_TYPES[ggml_type][0]  # the file's type (the rows may be in another layout)
        self.n, self.k = n, k
        elems, size = block_layout(ggml_type)
        self.weight_bytes = n * k // elems * size
        self.copies = max(2, -(-(256 << 20) // self.weight_bytes))
        self.weights, self.ggml_type = [], ggml_type
        for i in range(self.copies):  # as the packed layer keeps them on this device
            rows, self.ggml_type = kernel_layout(random_blocks(ggml_type, n, k, device, seed=i),
                                                 ggml_type, k, device.type == "cuda")
            self.weights.append(rows)
        self.w_last = gguf_dequantize_ref(self.weights[-1], self.ggml_type, k)  # float32

    def launch(self, x: torch.Tensor, i: int, out: torch.Tensor, cfg: GGUFConfig) -> None:
        """Runs ``cfg`` on copy ``i``."""
        from fuselm.kernels.gguf_matmul import launch_gguf_matmul

        launch_gguf_matmul(x, self.weights[i], self.ggml_type, out, cfg)


def measure(case: Case, m: int, bf16_us: float, copy_gbs: float, replays: int,
            configs: list[GGUFConfig], deadline: float) -> dict[str, Any]:
    """Every config at batch m; the row of the fastest (a wrong or failing one is skipped)."""
    device = case.weights[0].device
    x = torch.randn(m, case.k, device=device, dtype=torch.bfloat16)
    outs = [torch.empty(m, case.n, device=device, dtype=torch.bfloat16)
            for _ in range(case.copies)]
    expected = x.float() @ case.w_last.t()
    scale = expected.abs().max().item()
    times: dict[str, float] = {}
    best: tuple[float, GGUFConfig] | None = None
    for j, cfg in enumerate(configs):
        if j and time.monotonic() > deadline:
            print(f"  budget reached: {len(configs) - j} configs not swept", file=sys.stderr)
            break

        def body(cfg=cfg) -> None:
            for i, o in enumerate(outs):
                case.launch(x, i, o, cfg)

        try:
            t = common.graph_time_us(body, case.copies, replays)
        except Exception as exc:  # noqa: BLE001 - one config failing must not end the sweep
            print(f"  {cfg.label} failed: {type(exc).__name__}: {str(exc)[:300]}",
                  file=sys.stderr)
            continue
        err = (outs[-1].float() - expected).abs().max().item()
        if err > 0.02 * scale + 1e-3:
            print(f"  {cfg.label} wrong (max err {err:.3g} of {scale:.3g}); skipped",
                  file=sys.stderr)
            continue
        times[cfg.label] = round(t, 2)
        if best is None or t < best[0]:
            best = (t, cfg)
    moved = case.weight_bytes + 2 * m * (case.k + case.n)
    row: dict[str, Any] = {"type": case.name, "ggml_type": case.ggml_type, "n": case.n,
                           "k": case.k,
                           "m": m, "MB": round(moved / 1e6, 2), "bf16_us": round(bf16_us, 2),
                           "configs_us": times}
    if best is None:
        return {**row, "us": float("nan"), "config": None}
    row.update(us=round(best[0], 2), config=best[1].to_dict(), variant=best[1].label,
               default_us=times.get(configs[0].label, float("nan")))
    row["GB/s"] = round(moved / (best[0] * 1e-6) / 1e9, 1)
    row["%copy"] = round(100 * row["GB/s"] / copy_gbs, 1)
    row["x_bf16"] = round(bf16_us / best[0], 3)
    return row


def int_batch1(kind: str, n: int, k: int, device: torch.device, replays: int) -> float:
    """us of the W4A16 / W8A16 kernel's heuristic config at batch 1 (bench.kernels_quant)."""
    from fuselm.bench.kernels_quant import Case as IntCase

    case = IntCase(kind, n, k, device, torch.float32, seed=n + k)
    cfg = case.configs(1, quick=True)[0]
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    outs = [torch.empty(1, n, device=device, dtype=torch.bfloat16) for _ in range(case.copies)]

    def body() -> None:
        for i, o in enumerate(outs):
            case.launch(x, i, o, cfg)

    return common.graph_time_us(body, case.copies, replays)


def summary(rows: list[dict[str, Any]], copy_gbs: float,
            int_us: dict[str, float]) -> list[dict[str, Any]]:
    """Per type and batch: a decoder layer's four matmuls, GB/s, x bf16, the 32-layer estimate
    and (batch 1) the ratio to the INT4 / INT8 layer."""
    out = []
    for tname in dict.fromkeys(r["type"] for r in rows):
        for m in BATCHES:
            layer = [r for r in rows if r["type"] == tname and r["m"] == m]
            if len(layer) != len(LLAMA3_8B):
                continue
            us = sum(r["us"] for r in layer)
            mb = sum(r["MB"] for r in layer)
            entry = {"type": tname, "m": m, "layer_us": round(us, 2),
                     "layer_GB/s": round(mb / us * 1e3, 1),
                     "layer_%copy": round(100 * mb / us * 1e3 / copy_gbs, 1),
                     "x_bf16": round(sum(r["bf16_us"] for r in layer) / us, 3),
                     "step_matmuls_ms": round(NUM_LAYERS * us / 1e3, 3),
                     "slower_than_bf16": [r["name"] for r in layer if r["us"] > r["bf16_us"]]}
            ref = {"Q4_K": "int4", "Q8_0": "int8"}.get(tname)
            if m == 1 and ref in int_us:
                entry[f"x_{ref}"] = round(us / int_us[ref], 3)
            out.append(entry)
    return out


def tuning_table(rows: list[dict[str, Any]]) -> dict[str, dict]:
    """``{bucket: {"backend": "triton", "triton": config, "us": ...}}`` of ``gguf_matmul``."""
    from fuselm.kernels.gguf_matmul import shape_bucket

    return {shape_bucket(r["ggml_type"], r["n"], r["k"], r["m"]):
            {"backend": "triton", "triton": r["config"],
             "us": {"best": r["us"], "bf16": r["bf16_us"]}}
            for r in rows if r["config"] is not None}


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``python -m fuselm.bench.kernels_gguf``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", default=None, help="write kernels_gguf-<gpu>.json here")
    p.add_argument("--types", default="Q4_K,Q8_0", help=f"comma list of {', '.join(TYPE_IDS)}")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--replays", type=int, default=10)
    p.add_argument("--quick", action="store_true",
                   help="time only the heuristic configs (and the gemv16 twin)")
    p.add_argument("--budget-s", type=float, default=360.0,
                   help="stop sweeping (heuristic configs only) after this many seconds")
    p.add_argument("--no-compare-int", dest="compare_int", action="store_false",
                   help="skip the INT4 / INT8 batch-1 rows")
    add_configs_arguments(p)
    return p


def _run(args: argparse.Namespace, device: torch.device, copy_gbs: float,
         ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    from fuselm.bench.kernels_quant import bf16_times
    from fuselm.kernels.gguf_matmul import default_config

    types = [TYPE_IDS[t] for t in args.types.split(",") if t]
    batches = [int(b) for b in args.batches.split(",") if b]
    deadline = time.monotonic() + args.budget_s
    int_us: dict[str, float] = {}
    cases: list[tuple[str, Case, dict[int, float]]] = []
    for name, n, k in LLAMA3_8B:
        bf16 = bf16_times(n, k, device, args.replays)
        for kind in ("int4", "int8") if args.compare_int else ():
            try:
                int_us[kind] = int_us.get(kind, 0.0) + int_batch1(kind, n, k, device,
                                                                   args.replays)
            except Exception as exc:  # noqa: BLE001 - the comparison is optional
                print(f"  {kind} batch-1 comparison failed: {exc}", file=sys.stderr)
        cases += [(name, Case(tid, n, k, device), bf16) for tid in types]
    rows: list[dict[str, Any]] = []
    for m in batches:  # batch 1 first: the sweep budget goes to the decode hot path
        for name, case, bf16 in cases:
            base = default_config(case.ggml_type, case.n, case.k, m)
            configs = [base] + (quick_extra(case.ggml_type, base) if args.quick
                                else sweep(case.ggml_type, m))
            row = measure(case, m, bf16[m], copy_gbs, args.replays,
                          list(dict.fromkeys(configs)), deadline)
            rows.append({"name": name, **row})
            print(common.format_table(rows[-1:], COLUMNS), flush=True)
    return rows, int_us


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels_gguf needs a CUDA GPU", file=sys.stderr)
        return 2
    unknown = {t for t in args.types.split(",") if t} - set(TYPE_IDS)
    if unknown:
        raise SystemExit(f"--types: unknown {sorted(unknown)} ({', '.join(TYPE_IDS)})")
    device = torch.device("cuda")
    copy_gbs = common.copy_bandwidth_gbs(device)
    print(f"copy bandwidth {copy_gbs:.0f} GB/s (read + write; H200 spec 4270)", flush=True)
    rows, int_us = _run(args, device, copy_gbs)
    print(common.format_table(rows, COLUMNS))
    if int_us:
        print("batch-1 layer (4 matmuls), heuristic configs: " + ", ".join(
            f"{kind} {us:.2f} us" for kind, us in int_us.items()))
    summ = summary(rows, copy_gbs, int_us)
    print(common.format_table(summ))
    gpu = torch.cuda.get_device_name(device)
    result = {"env": common.environment(), "copy_GB/s": copy_gbs, "rows": rows,
              "int_batch1_layer_us": int_us, "summary": summ}
    if args.output_dir:
        path = Path(args.output_dir) / f"kernels_gguf-{common.gpu_slug(gpu)}.json"
        print(f"wrote {common.write_json(path, result)}")
    configs_dir = resolve_configs_dir(args)
    if configs_dir is not None:
        from fuselm.bench.kernels import configs_note, write_tuning_tables

        for path in write_tuning_tables({"gguf_matmul": tuning_table(rows)}, gpu, configs_dir):
            print(f"wrote {path}")
        print(configs_note(configs_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
