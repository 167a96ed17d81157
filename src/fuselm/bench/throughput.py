"""``fuselm bench throughput``: offline throughput of N requests submitted at once.

Requests come from random token ids (``--input-len``/``--output-len``, varied by
``--random-range-ratio`` as in vLLM's random dataset) or from a JSONL file (``--dataset``: one
object per line with ``prompt`` text or ``prompt_token_ids``, and optionally ``output_len``). All
are given to ``LLM.generate`` at once (greedy, EOS ignored so that output lengths are as asked);
reported: requests/s, input, output and total tokens/s over the wall time, and the per-request TTFT
and end-to-end latency distributions from the engine's request metrics.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fuselm.bench import plots, report

NAME = "throughput"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fuselm bench throughput`` (engine flags come from ``fuselm.cli_args``)."""
    a = parser.add_argument
    a("--num-prompts", type=int, default=16, help="number of requests")
    a("--input-len", type=int, default=32, help="prompt tokens of a random request")
    a("--output-len", type=int, default=32, help="output tokens of a request")
    a("--random-range-ratio", type=float, default=0.0,
      help="random lengths are drawn from [len x (1 - r), len x (1 + r)]")
    a("--dataset", default=None, help="JSONL of {prompt | prompt_token_ids, output_len?}")
    a("--num-warmup", type=int, default=1, help="untimed requests run first")
    a("--disable-detokenize", action="store_true", help="generate without detokenizing")
    a("--output-json", default=None, help="write the results here")
    a("--plot", default=None, help="write TTFT / latency distributions (PNG) here")
    a("--disable-tqdm", action="store_true")


@dataclass(frozen=True)
class BenchRequest:
    """One request: text or token ids, and its output length."""

    prompt: str | list[int]
    output_len: int


def lengths(base: int, ratio: float, n: int, rng: np.random.Generator) -> list[int]:
    if not 0.0 <= ratio < 1.0:
        raise ValueError("--random-range-ratio must be in [0, 1)")
    lo, hi = max(1, int(base * (1 - ratio))), max(1, int(base * (1 + ratio)))
    return [int(x) for x in rng.integers(lo, hi + 1, size=n)]


def random_requests(num: int, input_len: int, output_len: int, ratio: float, vocab_size: int,
                    seed: int) -> list[BenchRequest]:
    """``num`` requests of random token ids with lengths around the given ones."""
    if min(num, input_len, output_len) < 1:
        raise ValueError("--num-prompts, --input-len and --output-len must be at least 1")
    rng = np.random.default_rng(seed)
    ins = lengths(input_len, ratio, num, rng)
    outs = lengths(output_len, ratio, num, rng)
    return [BenchRequest(report.random_token_ids(vocab_size, i, rng), o)
            for i, o in zip(ins, outs, strict=True)]


def load_jsonl(path: str | Path, num: int | None, default_output_len: int) -> list[BenchRequest]:
    """Requests of a JSONL file (the first ``num`` lines, or all)."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            prompt = obj.get("prompt_token_ids") or obj.get("prompt")
            if not prompt:
                raise ValueError(f"{path}:{n}: needs 'prompt' or 'prompt_token_ids'")
            out.append(BenchRequest(prompt, int(obj.get("output_len") or default_output_len)))
            if num and len(out) >= num:
                break
    if not out:
        raise ValueError(f"{path} holds no requests")
    return out


def _params(output_len: int, detokenize: bool = True) -> Any:
    from fuselm.sampling_params import SamplingParams

    return SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True,
                          detokenize=detokenize)


def request_metrics(outputs: list[Any]) -> dict[str, list[float]]:
    """Per-request TTFT and end-to-end seconds from ``RequestOutput.metrics``."""
    ttft, e2e = [], []
    for o in outputs:
        m = o.metrics or {}
        if "first_token_time" in m and "arrival_time" in m:
            ttft.append(m["first_token_time"] - m["arrival_time"])
        if "finished_time" in m and "arrival_time" in m:
            e2e.append(m["finished_time"] - m["arrival_time"])
    return {"ttft_s": ttft, "e2e_s": e2e}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Generates every request at once and reports throughput; prints, writes JSON/PNG."""
    llm = report.build_llm(args)
    vocab = llm.model_config.vocab_size
    if args.dataset:
        requests = load_jsonl(args.dataset, args.num_prompts, args.output_len)
    else:
        requests = random_requests(args.num_prompts, args.input_len, args.output_len,
                                   args.random_range_ratio, vocab, report.workload_seed(args))
    if args.num_warmup > 0:
        warm = random_requests(args.num_warmup, 8, 4, 0.0, vocab, 12345)
        llm.generate([r.prompt for r in warm], _params(4))
    start = time.perf_counter()
    params = [_params(r.output_len, not args.disable_detokenize) for r in requests]
    outputs = llm.generate([r.prompt for r in requests], params, use_tqdm=not args.disable_tqdm)
    elapsed = time.perf_counter() - start
    num_in = sum(len(o.prompt_token_ids) for o in outputs)
    num_out = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    per_req = request_metrics(outputs)
    stats = llm.engine.stats() if hasattr(llm.engine, "stats") else {}
    result = {
        "bench": NAME, "env": report.environment(),
        "model": getattr(llm.engine, "model_name", None), "num_prompts": len(requests),
        "dataset": args.dataset, "elapsed_s": elapsed, "input_tokens": num_in,
        "output_tokens": num_out, "requests_per_s": len(requests) / elapsed,
        "input_tokens_per_s": num_in / elapsed, "output_tokens_per_s": num_out / elapsed,
        "total_tokens_per_s": (num_in + num_out) / elapsed,
        "ttft_ms": report.summarize(per_req["ttft_s"], 1e3),
        "e2e_ms": report.summarize(per_req["e2e_s"], 1e3),
        "num_preemptions": stats.get("num_preemptions_total"), "requests": per_req,
    }
    row = {"requests": len(requests), "in tok": num_in, "out tok": num_out, "seconds": elapsed,
           "req/s": result["requests_per_s"], "in tok/s": result["input_tokens_per_s"],
           "out tok/s": result["output_tokens_per_s"], "total tok/s": result["total_tokens_per_s"],
           "TTFT p50 ms": result["ttft_ms"]["median"], "E2E p50 ms": result["e2e_ms"]["median"]}
    return report.finish(args, result, report.format_table([row]), plots.plot_throughput)
