"""TP=2 on gloo with --kv-cache-dtype fp8: the same greedy tokens as TP=1 with the fp8 cache
(each rank caches its own KV heads with the same per-layer scales).

Rank 0 runs this file as a script in a subprocess (it spawns the other rank); the TP=1 run is
in this process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

PROMPTS = [[(s * 37 + i * 11) % 250 + 1 for i in range(n)] for s, n in ((1, 9), (2, 30), (3, 4))]
MAX_TOKENS = 8


def run(model: str, tp: int) -> tuple[list[list[int]], str]:
    """Greedy tokens of PROMPTS and the cache dtype (this rank's)."""
    from fuselm import LLM, SamplingParams
    from fuselm.llm import engine_config_from_kwargs

    config = engine_config_from_kwargs(
        model, device="cpu", tensor_parallel_size=tp, max_num_batched_tokens=16,
        max_model_len=128, cpu_kv_cache_gib=0.01, distributed_timeout=60.0,
        kv_cache_dtype="fp8")
    llm = LLM(config=config)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    tokens = [list(out.outputs[0].token_ids) for out in llm.generate(PROMPTS, params)]
    runner = getattr(llm.engine, "runner", None)
    dtype = str(runner.kv_caches[0][0].dtype) if runner is not None else "remote"
    return tokens, dtype


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.tiny_models import make_tiny_checkpoint

    pytest.importorskip("transformers")
    return make_tiny_checkpoint("llama3-gqa-scaled", tmp_path_factory.mktemp("tpkv"))


def test_tp2_fp8_kv_cache_matches_tp1(checkpoint) -> None:
    from tests.distributed.dist_helpers import driver_env

    root = Path(__file__).resolve().parents[2]
    env = driver_env()
    env["PYTHONPATH"] = f"{root}:{env.get('PYTHONPATH', '')}"
    proc = subprocess.run([sys.executable, __file__, "--model", str(checkpoint), "--tp", "2"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    got = json.loads(line[len("RESULT "):])
    want, dtype = run(str(checkpoint), 1)
    assert dtype == "torch.float8_e4m3fn"
    assert all(len(t) == MAX_TOKENS for t in want)
    assert got == want


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args()
    print("RESULT " + json.dumps(run(args.model, args.tp)[0]), flush=True)
