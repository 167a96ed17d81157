"""Where a decode step's time goes: GPU time of the CUDA graph alone vs the engine's step, and the
host-side profile (cProfile) of the step loop. Usage: python scripts/profile_engine.py"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

from fuselm import LLM, SamplingParams
from fuselm.bench.dummy_model import write_dummy_checkpoint


def graph_ms(llm: LLM, size: int) -> float:
    graph, _ = llm.engine.runner.graphs[size]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 20


def profile_generate(llm: LLM, prompts: list[list[int]], tokens: int, top: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, detokenize=False)
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    llm.generate(prompts, params)
    prof.disable()
    wall = time.perf_counter() - start
    steps = tokens
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    print(out.getvalue()[-6000:])
    return 1000 * wall / steps


def main() -> None:
    shape = sys.argv[1] if len(sys.argv) > 1 else "llama-3-8b"
    path = write_dummy_checkpoint(shape, Path(tempfile.mkdtemp()) / shape)
    llm = LLM(str(path), load_format="dummy", max_model_len=4096)
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 64, 256):
        prompts = torch.randint(300, 100000, (batch, 128), generator=gen).tolist()
        llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False))
        step = profile_generate(llm, prompts, 64, 18)
        print(f"batch {batch}: graph replay {graph_ms(llm, batch):.2f} ms, "
              f"engine step (incl. prefill, profiled) {step:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
