"""TP=2 on gloo with --quantization int4, fp8 and int8: the same greedy tokens as TP=1 with the
same quantization (each rank quantizes its own shard: int4 groups do not cross a shard boundary;
a row-parallel fp8 layer combines its row statistics over the ranks, so it picks TP=1's scales;
a row-parallel int8 layer's scales are its shard's, a rounding away from TP=1's).

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


def run(model: str, tp: int, quantization: str) -> list[list[int]]:
    """Greedy tokens of PROMPTS."""
    from fuselm import LLM, SamplingParams
    from fuselm.llm import engine_config_from_kwargs

    config = engine_config_from_kwargs(
        model, device="cpu", tensor_parallel_size=tp, max_num_batched_tokens=16,
        max_model_len=128, cpu_kv_cache_gib=0.01, distributed_timeout=60.0,
        quantization=quantization)
    llm = LLM(config=config)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [list(out.outputs[0].token_ids) for out in llm.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.layers.quantization.quant_models import make_quant_checkpoint

    return make_quant_checkpoint(tmp_path_factory.mktemp("tpq") / "m")


@pytest.mark.parametrize("quantization", ["int4", "fp8", "int8"])
def test_tp2_quantized_matches_tp1(checkpoint, quantization) -> None:
    from tests.distributed.dist_helpers import driver_env

    root = Path(__file__).resolve().parents[2]
    env = driver_env()
    env["PYTHONPATH"] = f"{root}:{env.get('PYTHONPATH', '')}"
    proc = subprocess.run([sys.executable, __file__, "--model", str(checkpoint), "--tp", "2",
                           "--quantization", quantization], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    got = json.loads(line[len("RESULT "):])
    want = run(str(checkpoint), 1, quantization)
    assert all(len(t) == MAX_TOKENS for t in want)
    assert got == want


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--quantization", required=True)
    args = parser.parse_args()
    print("RESULT " + json.dumps(run(args.model, args.tp, args.quantization)), flush=True)
