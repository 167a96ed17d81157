"""--cpu-offload-gb on one H200 (issue 19): decode time against the link's bound, and the planner.

One call, dummy weights (``write_dummy_checkpoint`` + ``load_format="dummy"``), bf16:

1. Pinned host-to-device bandwidth, measured here: 1 GiB host buffer page-locked with
   ``cudaHostRegister`` (as the engine pins it), copied to the GPU (median of 5).
2. Llama-3-8B shape without offload: batch-1 step time, batch 64 and 256 decode throughput.
3. The same with ``--cpu-offload-gb 8``: batch-1 step against the bound = offloaded bytes /
   measured H2D bandwidth + resident step time (the no-offload step x resident / all weight
   bytes; target <= 1.10x), batch 64 and 256 throughput beside no offload.
4. Llama-3-70B shape (141 GB: more than the H200) with ``--cpu-offload-gb 60`` (GiB per GPU;
   38 of 80 layers, 65 GB in pinned host memory, host RAM 128 GiB): it serves; batch-1 and
   batch-128 steps beside the bound (the resident step estimated at the bandwidth the 8B
   no-offload step reached at the same batch).
5. ``fuselm plan``'s prediction (``planner.decode_step_ms`` with the measured H2D bandwidth)
   beside every measured step; acceptance: the 8B batch-1 within 15 %.

A step's time = (last token - first token) / (tokens - 1) through ``LLM.generate`` (greedy,
``ignore_eos``), after a warm-up. Throughput = batch / step time. Prints one JSON at the end
(and writes it to --out).

The 70B part runs in a fresh subprocess (the whole GPU, no pinned memory left over).

Usage: timeout 420 python scripts/bench_offload.py [--out DIR] [--skip-70b]   (~4-5 min)
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fuselm.bench.dummy_model import write_dummy_checkpoint

PROMPT_LEN = 128


def pinned_h2d_gbs(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """GB/s of host -> device copies from ``cudaHostRegister``-ed memory (median of reps)."""
    host = torch.empty(nbytes, dtype=torch.uint8)
    host.fill_(1)  # fault the pages in before pinning
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(host.data_ptr(), nbytes, 0)) != 0:
        raise RuntimeError("cudaHostRegister failed")
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    try:
        for _ in range(reps + 1):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dev.copy_(host, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    finally:
        cudart.cudaHostUnregister(host.data_ptr())
    return nbytes / sorted(times[1:])[reps // 2] / 1e9


def step_ms(llm, batch: int, new_tokens: int, seed: int) -> float:
    """Decode ms per step of ``batch`` fresh random prompts of PROMPT_LEN tokens."""
    from fuselm import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    vocab = llm.model_config.vocab_size
    prompts = torch.randint(300, vocab, (batch, PROMPT_LEN), generator=gen).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True,
                            detokenize=False)
    outs = llm.generate(prompts, params)
    first = max(o.metrics["first_token_time"] for o in outs)  # every sequence decoding after
    end = max(o.metrics["finished_time"] for o in outs)
    return 1000 * (end - first) / (new_tokens - 1)


def build(path: Path, **kwargs: Any):
    from fuselm import LLM

    start = time.perf_counter()
    llm = LLM(str(path), load_format="dummy", max_model_len=4096, **kwargs)
    print(f"  engine built in {time.perf_counter() - start:.1f} s", flush=True)
    return llm


def collect() -> None:
    """Frees an engine that went out of scope (its reference cycles need the collector)."""
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    print(f"  GPU memory free: {free / 2**30:.1f} of {total / 2**30:.1f} GiB", flush=True)


def weight_bytes(llm) -> int:
    return sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())


def run_shape(path: Path, offload_gb: float, batches: dict[int, int], max_num_seqs: int,
              ) -> dict[str, Any]:
    """Step ms per batch size (batch -> tokens decoded) of one engine; offload facts."""
    from fuselm.engine.weight_offload import offloader_of

    llm = build(path, cpu_offload_gb=offload_gb, max_num_seqs=max_num_seqs)
    res: dict[str, Any] = {"weight_bytes": weight_bytes(llm),
                           "kv_blocks": llm.engine.block_manager.num_blocks}
    off = offloader_of(llm.engine.runner.model)
    if off is not None:
        res.update(offloaded_bytes=off.offloaded_bytes, offloaded_layers=off.offloaded_indices,
                   engine_h2d_gbs=off.h2d_gbs)
    step_ms(llm, 1, 3, seed=0)  # warm-up
    for b, tokens in batches.items():
        res[f"b{b}_ms"] = step_ms(llm, b, tokens, seed=b)
        res[f"b{b}_tok_s"] = 1000 * b / res[f"b{b}_ms"]
        print(f"  offload {offload_gb} GiB, batch {b}: {res[f'b{b}_ms']:.2f} ms/step, "
              f"{res[f'b{b}_tok_s']:.0f} tok/s", flush=True)
    res["graph_replays"] = llm.engine.stats()["num_graph_replays"]
    llm.engine.runner.release_graphs()
    return res


def predicted_ms(shape: str, offload_gb: float, h2d: float, batch: int, ctx: int) -> float:
    from fuselm.planner import PlanOptions, decode_step_ms
    from fuselm.planner_hardware import load_model_shape

    _, m = load_model_shape(shape)
    opts = PlanOptions(cpu_offload_gb=offload_gb, h2d_bandwidth_gbs=h2d, context_len=ctx,
                       max_num_seqs=max(batch, 1))
    return decode_step_ms(m, "H200", opts, batch)["total"]


def bound_ms(off: dict, base_ms: float, base_bytes: int, h2d: float) -> float:
    """offloaded bytes / H2D + the resident part's step (``base_ms`` scaled to the resident
    bytes out of ``base_bytes``, the weights the baseline step read)."""
    resident = off["weight_bytes"] - off["offloaded_bytes"]
    return off["offloaded_bytes"] / (h2d * 1e9) * 1e3 + base_ms * resident / base_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--skip-70b", action="store_true")
    parser.add_argument("--only-70b", type=Path, default=None,
                        help="(internal) run the 70B part with the 8B results of this JSON")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp())
    if args.only_70b is not None:
        first = json.loads(args.only_70b.read_text())
        result = run_70b(tmp, first["h2d_gbs"], first["8b"]["no_offload"])
        (args.out / "offload-70b.json").write_text(json.dumps(result, indent=1))
        return
    res: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "h2d_gbs": pinned_h2d_gbs()}
    h2d = res["h2d_gbs"]
    print(f"pinned H2D: {h2d:.1f} GB/s (issue's H200 figure: 55.5)", flush=True)
    p8 = write_dummy_checkpoint("llama-3-8b", tmp / "8b")
    batches = {1: 24, 64: 16, 256: 12}
    base = run_shape(p8, 0, batches, 256)
    collect()
    off = run_shape(p8, 8, batches, 256)
    collect()
    res["8b"] = {"no_offload": base, "offload_8": off}
    for b, tokens in batches.items():
        bound = bound_ms(off, base[f"b{b}_ms"], base["weight_bytes"], h2d)
        pred = predicted_ms("Llama-3-8B", 8, h2d, b, PROMPT_LEN + tokens // 2)
        res["8b"][f"b{b}"] = {"measured_ms": off[f"b{b}_ms"], "bound_ms": bound,
                              "ratio_to_bound": off[f"b{b}_ms"] / bound, "planner_ms": pred,
                              "planner_error": pred / off[f"b{b}_ms"] - 1,
                              "tok_s": off[f"b{b}_tok_s"], "no_offload_tok_s": base[f"b{b}_tok_s"]}
        print(f"8B offload 8 GiB, batch {b}: {off[f'b{b}_ms']:.1f} ms vs bound {bound:.1f} ms "
              f"({off[f'b{b}_ms'] / bound:.3f}x, target <= 1.10x); planner {pred:.1f} ms "
              f"({100 * (pred / off[f'b{b}_ms'] - 1):+.1f} %, target within 15 %); "
              f"{off[f'b{b}_tok_s']:.0f} tok/s vs {base[f'b{b}_tok_s']:.0f} without offload",
              flush=True)
    (args.out / "offload.json").write_text(json.dumps(res, indent=1))
    if not args.skip_70b:  # a fresh process: the whole GPU and no pinned memory left over
        subprocess.run([sys.executable, __file__, "--out", str(args.out), "--only-70b",
                        str(args.out / "offload.json")], check=True)
        res["70b"] = json.loads((args.out / "offload-70b.json").read_text())
    print(json.dumps(res, indent=1))
    (args.out / "offload.json").write_text(json.dumps(res, indent=1))


def run_70b(tmp: Path, h2d: float, base8: dict) -> dict[str, Any]:
    """Llama-3-70B shape with 60 GiB offloaded: batch-1 and batch-128 beside the bound."""
    p70 = write_dummy_checkpoint("llama-3-70b", tmp / "70b")
    batches = {1: 6, 128: 6}
    off = run_shape(p70, 60, batches, 128)
    out: dict[str, Any] = {"offload_60": off}
    for b, tokens in batches.items():
        ref = 64 if b == 128 else b  # the 8B baseline batch whose bandwidth stands in
        gbs = base8["weight_bytes"] / (base8[f"b{ref}_ms"] * 1e-3)  # HBM bytes/s it reached
        resident = off["weight_bytes"] - off["offloaded_bytes"]
        bound = off["offloaded_bytes"] / (h2d * 1e9) * 1e3 + resident / gbs * 1e3
        pred = predicted_ms("Llama-3-70B", 60, h2d, b, PROMPT_LEN + tokens // 2)
        out[f"b{b}"] = {"measured_ms": off[f"b{b}_ms"], "bound_ms": bound,
                        "ratio_to_bound": off[f"b{b}_ms"] / bound, "planner_ms": pred,
                        "planner_error": pred / off[f"b{b}_ms"] - 1}
        print(f"70B offload 60 GiB, batch {b}: {off[f'b{b}_ms']:.0f} ms vs bound {bound:.0f} ms "
              f"({off[f'b{b}_ms'] / bound:.3f}x); planner {pred:.0f} ms "
              f"({100 * (pred / off[f'b{b}_ms'] - 1):+.1f} %)", flush=True)
    return out


if __name__ == "__main__":
    main()
