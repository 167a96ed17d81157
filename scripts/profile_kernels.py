"""GPU kernel breakdown of one decode step (eager, same kernels as the CUDA graph) of a dummy
model through the engine. Usage: python scripts/profile_kernels.py [shape] [batch] [context]"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from fuselm import LLM, SamplingParams
from fuselm.bench.dummy_model import write_dummy_checkpoint


def main() -> None:
    shape = sys.argv[1] if len(sys.argv) > 1 else "llama-3-8b"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    context = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    backend = sys.argv[4] if len(sys.argv) > 4 else "auto"
    path = write_dummy_checkpoint(shape, Path(tempfile.mkdtemp()) / shape)
    llm = LLM(str(path), load_format="dummy", max_model_len=4096, enforce_eager=True,
              kernel_backend=backend)
    prompts = torch.randint(300, 100000, (batch, context)).tolist()
    params = SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False, temperature=0)
    llm.generate(prompts, params)
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", p, params)
    engine.step()  # prefill
    engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(4):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_unfinished_requests():
        engine.step()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25,
                                      max_name_column_width=70)
    print(f"{shape} batch {batch} context {context} backend {backend}: 4 decode steps")
    print(table)


if __name__ == "__main__":
    main()
