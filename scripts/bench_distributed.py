"""Distributed targets on 2 GPUs (issue 7): Llama-3-8B shape, bf16, dummy weights, TP=1 measured
in the same run. Each subcommand is one configuration in a fresh process and writes
``--out/<tag>.json``; ``scripts/gpu/run.sh dist`` runs them all under ``timeout`` and
``report`` prints the table and the ratios the issue asks for.

    decode --tp N --pp M [--one-shot] [--profile]   batch-1 ms/token (+ all-reduce share)
    throughput --tp N --pp M [--micro-batches K]    1000 requests, 256 in / 256 out, offline
    allreduce (under torchrun --nproc-per-node 2)   NCCL vs one-shot (+ add + RMSNorm), graphs
    layerchain (under torchrun --nproc-per-node 2)  TP=2 layer blocks per gemv config, AR exposed
    tokens                                          greedy TP=1 vs TP=2, small random model
    report                                          table + ratios from the JSONs in --out

Per-token time = (last token - first token) / (tokens - 1) of one request; prompts are random.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fuselm.bench.common import (
    environment,
    format_table,
    graph_time_us,
    markdown_table,
    write_json,
)
from fuselm.bench.dummy_model import write_byte_tokenizer, write_dummy_checkpoint

AR_PER_STEP = 2 * 32 + 1  # 8B: attention and MLP outputs per layer, plus the embedding
DECODE_MS_TARGET, THROUGHPUT_TARGET = 0.6, 1.6  # TP=2 / TP=1 at most; PP=2 / TP=1 at least


def _llm(args: argparse.Namespace, **kwargs: Any) -> Any:
    from fuselm import LLM

    ckpt = write_dummy_checkpoint(args.shape, Path(args.out) / args.shape)
    return LLM(model=str(ckpt), load_format="dummy", dtype=args.dtype or "bfloat16",
               tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp,
               custom_all_reduce=args.one_shot, **kwargs)


def _tag(args: argparse.Namespace) -> str:
    tag = f"{args.command}-tp{args.tp}-pp{args.pp}"
    if args.one_shot:
        tag += "-oneshot"
    if getattr(args, "micro_batches", None):
        tag += f"-mb{args.micro_batches}"
    if args.command == "throughput" and args.max_num_seqs != 256:
        tag += f"-seqs{args.max_num_seqs}"
    return tag


def _one_request_ms(engine: Any, rng: np.random.Generator, prompt_len: int,
                    num_tokens: int) -> float:
    from fuselm import SamplingParams

    prompt = rng.integers(0, engine.model_config.vocab_size, prompt_len).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True,
                            detokenize=False)
    engine.add_request(f"decode-{rng.integers(1 << 62)}", prompt, params)
    stamps = []
    while engine.has_unfinished_requests():
        if engine.step():
            stamps.append(time.perf_counter())
    return 1000 * (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def _allreduce_profile(engine: Any, rng: np.random.Generator) -> dict[str, Any]:
    """All-reduce kernel time per decode step on rank 0 (CUPTI sees graph-replayed kernels), and
    the step's kernels by time (with PDL a kernel's time includes its wait for the previous)."""
    from torch.profiler import ProfilerActivity, profile

    from fuselm.profiling import gpu_idle_per_step

    steps = 64
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _one_request_ms(engine, rng, 8, steps)
    total_us, calls = 0.0, 0
    kernels = []
    for event in prof.key_averages():
        name = event.key.lower()
        us = getattr(event, "device_time_total", 0.0)
        if "allreduce" in name or "all_reduce" in name:
            total_us += us
            calls += event.count
        if us > 0:
            kernels.append({"kernel": event.key[:70], "calls_per_step": event.count / steps,
                            "us_per_step": us / steps})
    kernels.sort(key=lambda k: -k["us_per_step"])
    return {"ar_ms_per_step": total_us / 1000 / steps, "ar_calls_per_step": calls / steps,
            "kernels": kernels[:16], **gpu_idle_per_step(list(prof.events()), steps)}



def cmd_decode(args: argparse.Namespace) -> dict[str, Any]:
    """Batch-1 decode time per token."""
    from fuselm.parallel import parallel_state as ps

    llm = _llm(args, max_model_len=2048, max_num_seqs=8, max_num_batched_tokens=2048)
    engine, rng = llm.engine, np.random.default_rng(0)
    _one_request_ms(engine, rng, 128, 32)  # warm-up
    runs = [_one_request_ms(engine, rng, 128, args.tokens) for _ in range(3)]
    result = {"tp": args.tp, "pp": args.pp, "one_shot": args.one_shot,
              "decode_ms_per_token": statistics.median(runs), "runs_ms": runs,
              "custom_all_reduce": ps.get_custom_all_reduce() is not None,
              "graph_replays": engine.runner.num_graph_replays}
    if args.profile:
        try:
            result.update(_allreduce_profile(engine, rng))
            result["ar_share"] = result["ar_ms_per_step"] / result["decode_ms_per_token"]
        except Exception as exc:  # noqa: BLE001 - the timing above stands on its own
            result["profile_error"] = repr(exc)
    return result


def cmd_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Offline throughput of 1000 random requests."""
    from fuselm import SamplingParams

    llm = _llm(args, max_model_len=1024, max_num_seqs=args.max_num_seqs)
    executor = llm.engine.executor
    if args.micro_batches:
        executor.max_in_flight = args.micro_batches
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, llm.model_config.vocab_size, args.input_len).tolist()
               for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True,
                            detokenize=False)
    llm.generate(prompts[:16], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    stats = llm.engine.stats()
    return {"tp": args.tp, "pp": args.pp, "micro_batches": getattr(executor, "max_in_flight", 1),
            "max_num_seqs": args.max_num_seqs, "elapsed_s": elapsed,
            "requests_per_s": len(outs) / elapsed, "output_tokens_per_s": generated / elapsed,
            "total_tokens_per_s": (generated + args.input_len * len(outs)) / elapsed,
            "max_in_flight_seen": getattr(executor, "max_in_flight_seen", 1),
            "num_preemptions": stats["num_preemptions_total"]}


def _time_loop_us(fn: Any, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / iters


def _graph_us(op: Any, x: torch.Tensor, chain: int = 64) -> float:
    """Per-op time of ``chain`` ops captured back to back in one CUDA graph, each taking the
    previous one's output."""
    def body() -> None:
        y = x
        for _ in range(chain):
            y = op(y)

    return graph_time_us(body, chain)


def _torchrun_group() -> tuple[torch.device, Any]:
    """Under torchrun: this rank's GPU, NCCL (gloo for CPU tensors) and the custom all-reduce."""
    import torch.distributed as dist

    from fuselm.parallel.custom_all_reduce import CustomAllReduce

    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("cpu:gloo,cuda:nccl")
    device = torch.device("cuda", local)
    return device, CustomAllReduce(dist.group.WORLD, device, torch.bfloat16)


def cmd_allreduce(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run under torchrun with 2 processes: a decode-sized all-reduce, alone and followed by the
    residual add + RMSNorm, with NCCL and with the custom one-shot kernel (fused)."""
    import torch.distributed as dist

    from fuselm.kernels.rms_norm import fused_add_rms_norm_triton

    device, custom = _torchrun_group()
    eps = 1e-5

    def nccl(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    rows = []
    for bs in (1, 2, 8, 32, 64, 128):
        x = torch.randn(bs, 4096, dtype=torch.bfloat16, device=device)
        residual = torch.randn_like(x)
        weight = torch.randn(4096, dtype=torch.bfloat16, device=device)

        def nccl_add_norm(t: torch.Tensor, residual=residual, weight=weight) -> torch.Tensor:
            dist.all_reduce(t)
            fused_add_rms_norm_triton(t, residual, weight, eps)
            return t

        def custom_add_norm(t: torch.Tensor, residual=residual, weight=weight) -> torch.Tensor:
            custom.all_reduce_add_rms_norm(t, residual, weight, eps)
            return t

        want = nccl(x.clone())
        err = (custom.all_reduce(x).float() - want.float()).abs().max().item()
        want_norm, got_norm = x.clone(), x.clone()
        nccl_add_norm(want_norm, residual.clone())
        custom_add_norm(got_norm, residual.clone())
        err_norm = (got_norm.float() - want_norm.float()).abs().max().item()
        rows.append({"batch": bs, "bytes": x.numel() * 2, "max_err_vs_nccl": err,
                     "max_err_add_norm": err_norm,
                     "nccl_eager_us": _time_loop_us(lambda x=x: nccl(x), 200),
                     "custom_eager_us": _time_loop_us(lambda x=x: custom.all_reduce(x), 200),
                     "nccl_graph_us": _graph_us(nccl, x.clone()),
                     "custom_graph_us": _graph_us(custom.all_reduce, x.clone()),
                     "nccl+add_norm_graph_us": _graph_us(nccl_add_norm, x.clone()),
                     "custom_fused_graph_us": _graph_us(custom_add_norm, x.clone())})
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return None
    print(format_table(rows))
    return {"rows": rows, "note": "custom = fuselm one-shot kernel over symmetric memory "
                                  "(multicast off); fused = all-reduce + residual add + RMSNorm"}


def _write_layerchain_configs(rows: list[dict[str, Any]], shapes: dict[str, tuple[int, int]],
                              out: Path, device_index: int) -> None:
    """The package's tuning tables in ``out``, with this GPU's gemv entry of each swept shape
    set to the config with the fastest chained block (where 1 % faster than the tuned one)."""
    import shutil

    from fuselm.bench.kernels import write_tuning_tables
    from fuselm.kernels import triton_utils
    from fuselm.kernels.gemv import shape_bucket

    out.mkdir(parents=True, exist_ok=True)
    for path in triton_utils._CONFIG_DIR.glob("*.json"):
        shutil.copy(path, out / path.name)
    entry = dict(triton_utils.gpu_table_entry("gemv", device_index))
    for name, (n, k) in shapes.items():
        mine = [r for r in rows if r["gemv"] == name]
        best = min(mine, key=lambda r: r["block_us"])
        base = next((r for r in mine if r["tuned"]), None)
        if base is None or best["block_us"] < 0.99 * base["block_us"]:
            entry[shape_bucket(n, k)] = {"backend": "triton", "triton": best["triton"],
                                         "layerchain_block_us": best["block_us"]}
    write_tuning_tables({"gemv": entry}, torch.cuda.get_device_name(device_index), out)
    print(f"wrote {out}/gemv.json")


def cmd_layerchain(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run under torchrun with 2 processes: an 8B layer's TP=2 blocks at batch 1 chained in one
    CUDA graph, per gemv config: attention side (all-reduce + norm, qkv gemv, o_proj gemv) and
    MLP side (all-reduce + norm, gate_up gemv, silu, down gemv). With the norm alone instead of
    the all-reduce + norm, the difference is the all-reduce's exposed time."""
    import torch.distributed as dist

    from fuselm.kernels.gemv import GemvConfig, launch_gemv, tuned_config
    from fuselm.kernels.rms_norm import fused_add_rms_norm_triton
    from fuselm.kernels.silu_and_mul import silu_and_mul_triton

    device, custom = _torchrun_group()
    hidden, inter, eps = 4096, 14336 // 2, 1e-5

    def weight(n: int, k: int) -> torch.Tensor:
        return (torch.randn(n, k, device=device) * 0.02).bfloat16()

    w = {"qkv": weight(3072, hidden), "o": weight(hidden, 2048),
         "gate_up": weight(2 * inter, hidden), "down": weight(hidden, inter)}
    norm_w = torch.ones(hidden, dtype=torch.bfloat16, device=device)
    h = torch.randn(1, hidden, dtype=torch.bfloat16, device=device)
    residual = torch.randn_like(h)
    qkv_out = torch.empty(1, 3072, dtype=torch.bfloat16, device=device)
    gu_out = torch.empty(1, 2 * inter, dtype=torch.bfloat16, device=device)

    def tuned(name: str) -> GemvConfig:
        n, k = w[name].shape
        return tuned_config(n, k, device) or GemvConfig(1, 4096, 8)

    def boundary(with_ar: bool) -> None:
        if with_ar:
            custom.all_reduce_add_rms_norm(h, residual, norm_w, eps)
        else:
            fused_add_rms_norm_triton(h, residual, norm_w, eps)

    def attn_block(cfgs: dict[str, GemvConfig], with_ar: bool) -> None:
        boundary(with_ar)
        launch_gemv(h, w["qkv"], None, qkv_out, cfgs["qkv"])
        launch_gemv(qkv_out[:, :2048], w["o"], None, h, cfgs["o"])

    def mlp_block(cfgs: dict[str, GemvConfig], with_ar: bool) -> None:
        boundary(with_ar)
        launch_gemv(h, w["gate_up"], None, gu_out, cfgs["gate_up"])
        launch_gemv(silu_and_mul_triton(gu_out), w["down"], None, h, cfgs["down"])

    sweep = {"qkv": [(1, 4096, 8), (2, 4096, 8), (4, 4096, 8), (2, 4096, 16), (1, 2048, 4),
                     (2, 2048, 8), (4, 1024, 8)],
             "o": [(1, 2048, 4), (2, 2048, 8), (4, 2048, 8), (4, 2048, 16), (8, 1024, 8)],
             "gate_up": [(1, 4096, 8), (2, 4096, 8), (4, 4096, 8), (2, 4096, 16), (4, 4096, 16),
                         (1, 2048, 4), (2, 2048, 8)],
             "down": [(2, 4096, 4), (1, 4096, 8), (2, 4096, 8), (4, 4096, 8), (4, 4096, 16),
                      (2, 2048, 8)]}
    rows = []
    for name, configs in sweep.items():
        block = attn_block if name in ("qkv", "o") else mlp_block
        for bn, bk, warps in configs:
            cfgs = {k: tuned(k) for k in w}
            cfgs[name] = GemvConfig(bn, bk, warps)
            with_ar, without = (
                graph_time_us(lambda c=cfgs, b=block, ar=ar: [b(c, ar) for _ in range(16)], 16)
                for ar in (True, False))
            rows.append({"gemv": name, "config": cfgs[name].label,
                         "tuned": cfgs[name] == tuned(name), "block_us": with_ar,
                         "block_no_ar_us": without, "ar_exposed_us": with_ar - without,
                         "triton": cfgs[name].to_dict()})
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return None
    print(format_table([{k: v for k, v in r.items() if k != "triton"} for r in rows]))
    if args.write_configs:
        _write_layerchain_configs(rows, {k: tuple(v.shape) for k, v in w.items()},
                                  Path(args.write_configs), device.index)
    return {"rows": rows, "note": "TP=2 8B blocks at batch 1, 16 per CUDA graph, custom fused "
                                  "all-reduce vs the norm alone"}


def _small_checkpoint(path: Path) -> Path:
    """A 4-layer random Llama (GQA, 8 heads / 2 KV heads) saved as safetensors in float32."""
    import transformers

    if (path / "config.json").exists():
        return path
    config = transformers.LlamaConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
        rope_theta=500000.0, bos_token_id=256, eos_token_id=257, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float()
    with torch.no_grad():  # logits that spread out, so greedy choices are not near-ties
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 1.0 if "lm_head" in name else 0.08)
    model.save_pretrained(path)
    write_byte_tokenizer(path)
    return path


def cmd_tokens_run(args: argparse.Namespace) -> dict[str, Any]:
    """Greedy tokens and top-5 logprobs of 8 prompts on the small checkpoint."""
    from fuselm import LLM, SamplingParams

    llm = LLM(model=args.ckpt, dtype=args.dtype or "float32", tensor_parallel_size=args.tp,
              pipeline_parallel_size=args.pp, max_model_len=512)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 1024, int(n)).tolist() for n in rng.integers(16, 120, 8)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=64,
                                                ignore_eos=True, logprobs=5))
    return {"tp": args.tp, "pp": args.pp, "dtype": args.dtype,
            "tokens": [o.outputs[0].token_ids for o in outs],
            "logprobs": [[{str(k): v for k, v in d.items()} for d in o.outputs[0].logprobs]
                         for o in outs]}


def _compare_tokens(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    same = total = 0
    worst = 0.0
    for ta, tb, la, lb in zip(a["tokens"], b["tokens"], a["logprobs"], b["logprobs"],
                              strict=True):
        for pos, (x, y) in enumerate(zip(ta, tb, strict=True)):
            total += 1
            if x != y:
                break  # positions after a divergence compare different contexts
            same += 1
            worst = max(worst, abs(la[pos][str(x)] - lb[pos][str(y)]))
    return {"identical": a["tokens"] == b["tokens"], "tokens_agreeing": f"{same}/{total}",
            "max_sampled_logprob_diff": worst}


def cmd_tokens(args: argparse.Namespace) -> dict[str, Any]:
    """TP=1 vs TP=2 greedy tokens: float32 must agree exactly; bf16 by logprob difference."""
    ckpt = _small_checkpoint(Path(args.out) / "small-random-llama")
    result: dict[str, Any] = {}
    for dtype in ("float32", "bfloat16"):
        runs = {}
        for tp in (1, 2):
            out = Path(args.out) / f"tokens-{dtype}-tp{tp}.json"
            subprocess.run([sys.executable, __file__, "tokens-run", "--ckpt", str(ckpt),
                            "--tp", str(tp), "--dtype", dtype, "--out", args.out,
                            "--json", str(out)], check=True, timeout=600)
            runs[tp] = json.loads(out.read_text())
        result[dtype] = _compare_tokens(runs[1], runs[2])
        print(dtype, result[dtype], flush=True)
    return result


def cmd_tokens_scaling(args: argparse.Namespace) -> dict[str, Any]:
    """Float32 greedy tokens of TP=1, 2, 4, 8 and TP=4 x PP=2 on the small checkpoint (8 heads,
    2 KV heads: replicated beyond TP=2), each compared with TP=1 (4/8-GPU issue, run 4; on CPUs
    with gloo where no such machine is lent)."""
    ckpt = _small_checkpoint(Path(args.out) / "small-random-llama")
    layouts = [(1, 1), (2, 1), (4, 1), (8, 1), (4, 2)]
    runs = {}
    for tp, pp in layouts:
        out = Path(args.out) / f"tokens-scaling-tp{tp}-pp{pp}.json"
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "tokens-run", "--ckpt", str(ckpt),
                        "--tp", str(tp), "--pp", str(pp), "--dtype", "float32",
                        "--out", args.out, "--json", str(out)], check=True, timeout=1200)
        runs[(tp, pp)] = json.loads(out.read_text())
        print(f"TP={tp} x PP={pp}: {time.perf_counter() - start:.0f} s", flush=True)
    result = {f"tp{tp}-pp{pp}": _compare_tokens(runs[(1, 1)], runs[(tp, pp)])
              for tp, pp in layouts[1:]}
    print(json.dumps(result, indent=1))
    return result


def _load(out: Path, tag: str) -> dict[str, Any] | None:
    path = out / f"{tag}.json"
    return json.loads(path.read_text()) if path.exists() else None


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    """The issue's numbers side by side, from the JSONs of this run."""
    out = Path(args.out)
    decode = {name: _load(out, tag) for name, tag in (
        ("TP=1", "decode-tp1-pp1"), ("TP=2 (NCCL)", "decode-tp2-pp1"),
        ("TP=2 custom all-reduce (+ add + norm)", "decode-tp2-pp1-oneshot"),
        ("PP=2", "decode-tp1-pp2"))}
    tput = {name: _load(out, tag) for name, tag in (
        ("TP=1", "throughput-tp1-pp1"), ("PP=2 (2 micro-batches)", "throughput-tp1-pp2"),
        ("PP=2 (3 micro-batches)", "throughput-tp1-pp2-mb3"),
        ("TP=1, 512 sequences", "throughput-tp1-pp1-seqs512"),
        ("PP=2, 512 sequences", "throughput-tp1-pp2-seqs512"),
        ("TP=1, 1024 sequences", "throughput-tp1-pp1-seqs1024"),
        ("PP=2, 1024 sequences", "throughput-tp1-pp2-seqs1024"))}
    base_ms = (decode["TP=1"] or {}).get("decode_ms_per_token")
    # PP=2 against the best TP=1 run (each at the sequence limit it ran with)
    base_tps = max((r["output_tokens_per_s"] for name, r in tput.items()
                    if r is not None and name.startswith("TP=1")), default=None)
    rows = []
    for name, r in decode.items():
        if r is None:
            continue
        ms = r["decode_ms_per_token"]
        rows.append({"decode (batch 1)": name, "ms/token": ms,
                     "vs TP=1": ms / base_ms if base_ms else None,
                     "all-reduce ms/step": r.get("ar_ms_per_step"),
                     "all-reduce share": r.get("ar_share"),
                     "custom AR": r.get("custom_all_reduce")})
    trows = [{"offline 1000 x 256/256": name, "output tok/s": r["output_tokens_per_s"],
              "vs best TP=1": r["output_tokens_per_s"] / base_tps if base_tps else None,
              "in flight": r["max_in_flight_seen"],
              "preemptions": r.get("num_preemptions"), "elapsed s": r["elapsed_s"]}
             for name, r in tput.items() if r is not None]
    ar = _load(out, "allreduce")
    tokens = _load(out, "tokens")
    text = "\n\n".join(t for t in (format_table(rows), format_table(trows),
                                   format_table(ar["rows"]) if ar else "",
                                   json.dumps(tokens, indent=1) if tokens else "") if t)
    print(text)
    tp2 = min((r["vs TP=1"] for r in rows if r["decode (batch 1)"].startswith("TP=2")
               and r["vs TP=1"] is not None), default=None)
    best_pp = max((r["vs best TP=1"] for r in trows
                   if r["offline 1000 x 256/256"].startswith("PP=2") and base_tps), default=None)
    verdict = {"tp2_decode_ratio": tp2, "tp2_target": DECODE_MS_TARGET,
               "pp2_throughput_ratio": best_pp, "pp2_target": THROUGHPUT_TARGET}
    print(json.dumps(verdict))
    (out / "summary.md").write_text("\n\n".join(
        [markdown_table(rows), markdown_table(trows)]
        + ([markdown_table(ar["rows"])] if ar else [])) + "\n")
    return {"environment": environment(), "decode": rows, "throughput": trows,
            "allreduce": ar, "tokens": tokens, "verdict": verdict}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["decode", "throughput", "allreduce", "layerchain",
                                            "tokens", "tokens-run", "tokens-scaling", "report"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--one-shot", action="store_true",
                        help="the custom one-shot all-reduce (fused with add + RMSNorm), "
                             "not NCCL")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--tokens", type=int, default=256, help="decode: tokens per request")
    parser.add_argument("--micro-batches", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 (tokens-run: float32)")
    parser.add_argument("--shape", default="llama-3-8b", help="dummy shape (CPU smoke: llama-tiny)")
    parser.add_argument("--json", default=None, help="output path (default: OUT/<tag>.json)")
    parser.add_argument("--write-configs", default=None,
                        help="layerchain: tuning tables with the best gemv configs, here")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    command = {"decode": cmd_decode, "throughput": cmd_throughput, "allreduce": cmd_allreduce,
               "layerchain": cmd_layerchain,
               "tokens": cmd_tokens, "tokens-run": cmd_tokens_run,
               "tokens-scaling": cmd_tokens_scaling, "report": cmd_report}
    result = command[args.command](args)
    if result is None:  # a torchrun rank other than 0
        return 0
    tag = {"allreduce": "allreduce", "layerchain": "layerchain", "tokens": "tokens",
           "tokens-scaling": "tokens-scaling", "report": "summary"}.get(args.command, _tag(args))
    path = Path(args.json) if args.json else Path(args.out) / f"{tag}.json"
    write_json(path, {"environment": environment(), **result} if args.command != "report"
               else result)
    if args.command not in ("report", "tokens-run", "tokens-scaling"):
        print(json.dumps(result, default=str)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
