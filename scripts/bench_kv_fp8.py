"""FP8 (e4m3) KV cache against the bf16 cache on one GPU, same run (issue 18, acceptance 4).

Llama-3-8B attention shape: 32 query heads, 8 KV heads, head size 128, block size 16, blocks
in random order. Rows (each bf16 and fp8, the median of CUDA-graph replays):

- ``decode``: paged decode attention through ``PagedAttentionWorkspace`` (the serving path),
  batch 64 x 4096 context (and 1 x 32768); the default config, then a small sweep of launch
  configs (block_n, warps, stages) for each cache at batch 64, each checked against the
  reference first.
  Target: the fp8 cache at most 0.6x the bf16 cache's time (best against best, and default
  against default).
- ``prefill``: a 512-token chunk over a 3584-token cached prefix, 4 sequences (chunked prefill).
- ``store``: rotary_store_kv of 64 decode tokens and of 4 x 512 prefill tokens.

GB/s count the KV bytes really read (each cached K and V element once, 2 B bf16 / 1 B fp8)
against the H200's 4.27 TB/s copy bandwidth (read + write), the ceiling a streaming kernel
can reach. Checks: fp8 output vs ``paged_attention_ref`` on the same fp8 cache (bf16
tolerance) and the fp8 output's difference from the bf16 cache's (quantization error, shown).

Usage: python scripts/bench_kv_fp8.py [--quick] [--json PATH]  (about 1.5 minutes on an H200)
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from fuselm.kernels.decode_workspace import PagedAttentionWorkspace
from fuselm.kernels.kv_quant import FP8_KV_DTYPE, quantize_kv_ref
from fuselm.kernels.paged_attention import DecodeConfig, paged_attention_ref
from fuselm.kernels.paged_attention import paged_attention_triton_out as decode_out

HEADS, KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 32, 8, 128, 16
COPY_TBS = 4.27  # H200 copy bandwidth (read + write), TB/s
SWEEP = [DecodeConfig(32, 4, 3), DecodeConfig(64, 4, 2), DecodeConfig(64, 4, 4),
         DecodeConfig(128, 4, 2), DecodeConfig(128, 4, 3), DecodeConfig(128, 8, 3)]
K_SCALE, V_SCALE = 0.5, 0.25  # not 1.0: the scales' multiplies run


def _time_us(fn, reps: int = 20, inner: int = 10) -> float:
    """Median over ``reps`` replays of a CUDA graph of ``inner`` back-to-back ``fn()`` calls,
    per call (a graph: host launch cost stays out of a 20 us kernel's time)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / inner)
    return statistics.median(times)


def _caches(num_blocks: int, gen: torch.Generator):
    """bf16 K/V caches of random values and their fp8 quantization (K_SCALE, V_SCALE)."""
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_SIZE)
    kc = torch.randn(shape, generator=gen, device="cuda").bfloat16()
    vc = torch.randn(shape, generator=gen, device="cuda").bfloat16()
    return (kc, vc), (quantize_kv_ref(kc, K_SCALE, FP8_KV_DTYPE),
                      quantize_kv_ref(vc, V_SCALE, FP8_KV_DTYPE))


def _decode_inputs(batch: int, ctx: int, gen: torch.Generator):
    blocks_per_seq = -(-ctx // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    bt = torch.randperm(num_blocks, generator=gen, device="cuda").view(batch, -1).int()
    q = torch.randn(batch, HEADS, HEAD_SIZE, generator=gen, device="cuda").bfloat16()
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return q, bt, lens, *_caches(num_blocks, gen)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a.float() - b.float()).abs() <= 1e-2 + 1.6e-2 * b.float().abs()).all())


def decode_rows(batch: int, ctx: int, sweep: list[DecodeConfig]) -> list[dict]:
    """Default and swept decode timings for the bf16 and the fp8 cache at batch x ctx."""
    gen = torch.Generator(device="cuda").manual_seed(batch + ctx)
    q, bt, lens, bf16, fp8 = _decode_inputs(batch, ctx, gen)
    ws = PagedAttentionWorkspace(batch, HEADS, HEAD_SIZE, ctx, "cuda")
    size, tmp, mx, sm = ws.buffers(batch)
    out = torch.empty_like(q)
    scale = HEAD_SIZE**-0.5
    expected = {"bf16": paged_attention_ref(q, *bf16, bt, lens, scale),
                "fp8": paged_attention_ref(q, *fp8, bt, lens, scale, 0, K_SCALE, V_SCALE)}
    kv_elems = 2 * batch * ctx * KV_HEADS * HEAD_SIZE
    rows = []
    for name, caches, itemsize in (("bf16", bf16, 2), ("fp8", fp8, 1)):
        scales = {"k_scale": K_SCALE, "v_scale": V_SCALE} if name == "fp8" else {}
        variants = [("default", None, size)] + [
            (f"n{c.block_n}w{c.num_warps}s{c.num_stages}", c, size) for c in sweep]
        if sweep and 2 * size <= ctx:  # longer partitions: fewer, longer programs
            variants += [(f"{label}_p{2 * size}", c, 2 * size) for label, c, _ in variants
                         if c is None or (c.block_n >= 64 and c.num_stages == 3)]
        for label, cfg, psize in variants:
            if cfg is not None and psize % cfg.block_n:
                continue
            def run(cfg=cfg, caches=caches, scales=scales, psize=psize):  # noqa: E306
                decode_out(out, tmp, mx, sm, q, *caches, bt, lens, scale, psize, cfg, **scales)
            try:
                out.fill_(float("nan"))
                run()
                ok = _close(out, expected[name])
            except Exception as exc:  # a config that does not compile is skipped, logged
                print(f"  {name} {label}: failed ({type(exc).__name__}: {str(exc)[:80]})")
                continue
            us = _time_us(run)
            gbs = kv_elems * itemsize / us / 1e3
            rows.append(dict(op="decode", shape=f"b{batch}_ctx{ctx}", cache=name, config=label,
                             us=us, gbs=gbs, of_copy=gbs / (COPY_TBS * 1e3), correct=ok))
    err = (expected["fp8"].float() - expected["bf16"].float()).abs()
    print(f"decode b{batch} x {ctx}: fp8 vs bf16 cache output |diff| max {err.max():.3g}, "
          f"mean {err.mean():.3g} (quantization error; values ~N(0, 1))")
    return rows


def prefill_rows(num_seqs: int = 4, chunk: int = 512, ctx: int = 3584) -> list[dict]:
    """A chunk of new tokens over a cached prefix, bf16 and fp8 cache."""
    from fuselm.kernels.prefill_attention import prefill_attention_triton

    gen = torch.Generator(device="cuda").manual_seed(7)
    total = ctx + chunk
    q_, bt, _, bf16, fp8 = _decode_inputs(num_seqs, total, gen)
    del q_
    q = torch.randn(num_seqs * chunk, HEADS, HEAD_SIZE, generator=gen, device="cuda").bfloat16()
    k = torch.randn(num_seqs * chunk, KV_HEADS, HEAD_SIZE, generator=gen, device="cuda").bfloat16()
    v = torch.randn_like(k)
    qsl = torch.arange(0, num_seqs + 1, dtype=torch.int32, device="cuda") * chunk
    lens = torch.full((num_seqs,), total, dtype=torch.int32, device="cuda")
    rows = []
    for name, caches in (("bf16", bf16), ("fp8", fp8)):
        scales = {"k_scale": K_SCALE, "v_scale": V_SCALE} if name == "fp8" else {}
        us = _time_us(lambda caches=caches, scales=scales: prefill_attention_triton(
            q, k, v, *caches, qsl, lens, bt, HEAD_SIZE**-0.5, **scales), inner=3)
        flops = 4 * num_seqs * HEADS * HEAD_SIZE * chunk * (ctx + (chunk + 1) / 2)
        rows.append(dict(op="prefill", shape=f"{num_seqs}x{chunk}_ctx{ctx}", cache=name,
                         config="default", us=us, tflops=flops / us / 1e6, correct=True))
    return rows


def store_rows() -> list[dict]:
    """rotary_store_kv into a bf16 and an fp8 cache: decode (64 tokens) and prefill (2048)."""
    from fuselm.kernels.rotary_store_kv import rotary_store_kv_triton

    gen = torch.Generator(device="cuda").manual_seed(3)
    rows = []
    (kc, vc), (kf, vf) = _caches(4096, gen)
    cs = torch.randn(8192, HEAD_SIZE, generator=gen, device="cuda")
    for tokens in (64, 2048):
        qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_SIZE, generator=gen,
                          device="cuda").bfloat16()
        q = qkv[:, : HEADS * HEAD_SIZE].view(tokens, HEADS, HEAD_SIZE)
        k = qkv[:, HEADS * HEAD_SIZE: (HEADS + KV_HEADS) * HEAD_SIZE].view(tokens, KV_HEADS, -1)
        v = qkv[:, (HEADS + KV_HEADS) * HEAD_SIZE:].view(tokens, KV_HEADS, HEAD_SIZE)
        pos = torch.randint(0, 8192, (tokens,), generator=gen, device="cuda")
        slots = torch.randperm(4096 * BLOCK_SIZE, generator=gen, device="cuda")[:tokens]
        for name, caches in (("bf16", (kc, vc)), ("fp8", (kf, vf))):
            inputs = (q, k, v, pos, cs, *caches, slots, K_SCALE, V_SCALE)
            us = _time_us(lambda inputs=inputs: rotary_store_kv_triton(*inputs))
            rows.append(dict(op="store", shape=f"t{tokens}", cache=name, config="default",
                             us=us, correct=True))
    return rows


def summary(rows: list[dict]) -> list[str]:
    """Per decode shape: fp8 / bf16 time, default against default and best against best."""
    lines = []
    for shape in sorted({r["shape"] for r in rows if r["op"] == "decode"}):
        pick = {c: [r for r in rows if r["op"] == "decode" and r["shape"] == shape
                    and r["cache"] == c and r["correct"]] for c in ("bf16", "fp8")}
        if not pick["bf16"] or not pick["fp8"]:
            continue
        default = {c: next((r for r in pick[c] if r["config"] == "default"), None)
                   for c in pick}
        best = {c: min(pick[c], key=lambda r: r["us"]) for c in pick}
        if default["bf16"] and default["fp8"]:
            lines.append(f"decode {shape}: default fp8/bf16 = "
                         f"{default['fp8']['us'] / default['bf16']['us']:.3f}x "
                         f"({default['fp8']['us']:.1f} / {default['bf16']['us']:.1f} us)")
        ratio = best["fp8"]["us"] / best["bf16"]["us"]
        lines.append(f"decode {shape}: best fp8/bf16 = {ratio:.3f}x "
                     f"(fp8 {best['fp8']['config']} {best['fp8']['us']:.1f} us, "
                     f"{best['fp8']['of_copy']:.0%} of copy; bf16 {best['bf16']['config']} "
                     f"{best['bf16']['us']:.1f} us, {best['bf16']['of_copy']:.0%}); target <= 0.6x")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 64 x 4096 only, no sweep")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kv_fp8 needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    sweep = [] if args.quick else SWEEP
    rows = decode_rows(64, 4096, sweep)
    if not args.quick:
        rows += decode_rows(1, 32768, [])  # the default config only
        rows += prefill_rows()
        rows += store_rows()
    print(f"{'op':8} {'shape':16} {'cache':5} {'config':14} {'us':>9} {'GB/s':>7} "
          f"{'TFLOP/s':>7} {'ok':>3}")
    for r in rows:
        gbs = f"{r['gbs']:7.0f}" if "gbs" in r else " " * 7
        tf = f"{r['tflops']:7.1f}" if "tflops" in r else " " * 7
        print(f"{r['op']:8} {r['shape']:16} {r['cache']:5} {r['config']:14} {r['us']:9.1f} "
              f"{gbs} {tf} {'yes' if r['correct'] else 'NO':>3}")
    for line in summary(rows):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["correct"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
