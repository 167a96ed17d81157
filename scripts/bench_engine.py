"""Engine targets on a GPU (Engine issue): Llama-3-8B shape, bf16, dummy weights, through
``LLM.generate``, with transformers eager measured in the same run as the baseline.

Prints a table and writes JSON to --out. Per-token time = (end - first token) / (tokens - 1);
prompts are random, distinct and never seen before; ``ignore_eos``. Bandwidth: the bytes a step
reads (``fuselm.planner.decode_step_bytes``: the embedding gathered, one row per sequence; the
layers and LM head whole) over the step time, and its fraction of the copy bandwidth measured in
the same run (``copy_gbs``).

Usage: python scripts/bench_engine.py [--out DIR] [--decode-only --skip-hf --skip-startup]
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

import torch

from fuselm.bench.common import copy_bandwidth_gbs
from fuselm.bench.dummy_model import write_dummy_checkpoint


class Prompts:
    """Random token prompts, never the same twice."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.vocab = vocab

    def take(self, n: int, length: int) -> list[list[int]]:
        return torch.randint(300, self.vocab, (n, length), generator=self.gen).tolist()


@torch.inference_mode()
def hf_decode_ms(config_dir: Path, batch: int, prompt_len: int, new_tokens: int) -> float:
    """transformers eager: ms per decode step (bf16, KV cache, greedy)."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(config_dir)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(300, cfg.vocab_size, (batch, prompt_len), device="cuda")
    out = model(ids, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    ms = 1000 * (time.perf_counter() - start) / (new_tokens - 1)
    del model, out
    gc.collect()
    torch.cuda.empty_cache()
    return ms


def decode_ms(llm, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """Per-step decode ms (after the first token) and mean TTFT ms through LLM.generate."""
    from fuselm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True,
                            detokenize=False)
    outs = llm.generate(prompts, params)
    first = min(o.metrics["first_token_time"] for o in outs)
    end = max(o.metrics["finished_time"] for o in outs)
    ttft = sum(o.metrics["first_token_time"] - o.metrics["arrival_time"] for o in outs)
    per_token = 1000 * (end - first) / (new_tokens - 1) if new_tokens > 1 else 0.0
    return per_token, 1000 * ttft / len(outs)


def throughput(llm, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    from fuselm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True,
                            detokenize=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"requests": len(prompts), "seconds": elapsed, "output_tok_s": out_tokens / elapsed,
            "total_tok_s": (out_tokens + sum(map(len, prompts))) / elapsed}


def startup_seconds(config_dir: Path, extra: list[str]) -> float:
    """Engine start (dummy weights, KV sizing, graph capture) in a fresh process."""
    code = ("import time,sys; t=time.perf_counter(); from fuselm import LLM; "
            f"LLM({str(config_dir)!r}, load_format='dummy', max_model_len=8192); "
            "print('STARTUP', time.perf_counter()-t)")
    proc = subprocess.run([sys.executable, "-c", code, *extra], capture_output=True, text=True,
                          timeout=300)
    for line in proc.stdout.splitlines():
        if line.startswith("STARTUP"):
            return float(line.split()[1])
    raise RuntimeError(proc.stderr[-2000:])


def step_bytes(llm, batch: int, kv_tokens: float):
    """What one decode step reads (``fuselm.planner.decode_step_bytes``: layers and LM head
    whole, one embedding row per sequence, the KV of ``kv_tokens`` per sequence), bf16."""
    from fuselm.planner import decode_step_bytes

    return decode_step_bytes(llm.model_config, batch, torch.bfloat16, kv_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--num-requests", type=int, default=2000)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--kernel-backend", default="auto")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                        default=None, help="queue the next decode step before reading the "
                        "current tokens (default: the engine's, on for CUDA)")
    parser.add_argument("--decode-only", action="store_true",
                        help="batch-1 and batch-8 decode only (no TTFT, no throughput)")
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config_dir = write_dummy_checkpoint(args.shape, Path(tempfile.mkdtemp()) / args.shape)
    res: dict[str, object] = {"gpu": torch.cuda.get_device_name(), "shape": args.shape,
                              "copy_gbs": copy_bandwidth_gbs(torch.device("cuda"))}
    if not args.skip_hf:
        res["hf_b1_ms"] = hf_decode_ms(config_dir, 1, 128, 32)
        res["hf_b8_ms"] = hf_decode_ms(config_dir, 8, 128, 32)
        print("hf", res["hf_b1_ms"], res["hf_b8_ms"], flush=True)
    if not args.skip_startup:
        res["startup_cold_s"] = startup_seconds(config_dir, [])
        res["startup_warm_s"] = startup_seconds(config_dir, [])
        print("startup", res["startup_cold_s"], res["startup_warm_s"], flush=True)
    from fuselm import LLM

    t0 = time.perf_counter()
    llm = LLM(str(config_dir), load_format="dummy", max_model_len=8192,
              kernel_backend=args.kernel_backend, async_scheduling=args.async_scheduling)
    res["startup_in_process_s"] = time.perf_counter() - t0
    res["num_kv_blocks"] = llm.engine.block_manager.num_blocks
    prompts = Prompts(llm.model_config.vocab_size)
    decode_ms(llm, prompts.take(1, 128), 8)  # warm-up
    res["b1_runs_ms"] = [decode_ms(llm, prompts.take(1, 128), 256)[0] for _ in range(3)]
    res["b1_ms"] = sorted(res["b1_runs_ms"])[1]  # median of 3
    res["b8_ms"], _ = decode_ms(llm, prompts.take(8, 128), 256)
    if not args.decode_only:
        decode_ms(llm, prompts.take(1, 4096), 1)
        res["ttft_4096_ms"] = decode_ms(llm, prompts.take(1, 4096), 2)[1]
    for b in (1, 8):  # 128 prompt tokens, 256 decoded: a mean context of 256 per step
        sb = step_bytes(llm, b, 128 + 256 / 2)
        ms = res[f"b{b}_ms"]
        res[f"b{b}_step_bytes"] = sb.total
        res[f"b{b}_gbs"] = sb.total / (ms / 1000) / 1e9
        res[f"b{b}_copy_fraction"] = res[f"b{b}_gbs"] / res["copy_gbs"]
        print(f"batch {b}: {ms:.3f} ms/token, {sb.describe(ms, res['copy_gbs'])}", flush=True)
    res["graph_replays"] = llm.engine.stats()["num_graph_replays"]
    print("decode", res, flush=True)
    if not args.decode_only:
        res["throughput"] = throughput(llm, prompts.take(args.num_requests, 256), 256)
        res["preemptions"] = llm.engine.stats()["num_preemptions_total"]
    print(json.dumps(res, indent=1))
    (args.out / f"engine-{args.shape}{args.tag}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
