"""One distributed (or single-process) engine run on a tiny checkpoint, as rank 0: the workload
of the distributed tests, printed as one ``RESULT {json}`` line.

    python dist_driver.py --model DIR --tp 2 --pp 2
    python dist_driver.py --model DIR --tp 2 --fault kill --fault-rank 1   # exits non-zero
    torchrun --nnodes 2 ... dist_driver.py --model DIR --pp 2                # any launcher

The workload runs with chunked prefill (prompts longer than ``MAX_BATCHED_TOKENS``) and prefix
caching (a second wave of prompts shares a prefix with the first), and mixes greedy, seeded
random, penalised/biased and n=2 requests so that every sampling input crosses the wire.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

from fuselm import LLM, SamplingParams
from fuselm.config import EngineConfig
from fuselm.distributed.launch import is_torchrun_worker, run_torchrun_worker
from fuselm.llm import engine_config_from_kwargs
from fuselm.parallel import parallel_state as ps

MAX_BATCHED_TOKENS = 32
LOGPROBS = 3


def _prompt(seed: int, length: int) -> list[int]:
    return [(seed * 131 + i * 17) % 250 + 1 for i in range(length)]


PREFIX = _prompt(99, 40)  # > 2 blocks of 16: the second wave hits the prefix cache


def workload() -> list[tuple[list[list[int]], list[SamplingParams]]]:
    """Two waves of (prompts, params); the second reuses the first wave's prefix."""
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=LOGPROBS)
    first = [PREFIX + _prompt(1, 9), _prompt(2, 37), _prompt(3, 20), _prompt(4, 50),
             _prompt(5, 7)]
    params = [
        greedy,
        SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7, max_tokens=10,
                       ignore_eos=True, logprobs=LOGPROBS),
        SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.4,
                       frequency_penalty=0.2, logit_bias={5: 2.0, 77: -3.0}, max_tokens=10,
                       ignore_eos=True),
        SamplingParams(n=2, temperature=1.0, min_p=0.05, seed=11, max_tokens=8,
                       ignore_eos=True),
        greedy,
    ]
    second = [PREFIX + _prompt(6, 5), PREFIX + _prompt(7, 12), PREFIX[:33]]
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)  # async-pipelinable
    third = [_prompt(8, 6), _prompt(9, 11), _prompt(10, 3)]
    return [(first, params), (second, [greedy] * len(second)), (third, [plain] * len(third))]


def make_config(model: str, tp: int, pp: int, timeout: float, device: str = "cpu",
                async_scheduling: bool | None = None,
                custom_all_reduce: bool | None = None) -> EngineConfig:
    """The engine every test configuration uses (tiny KV cache, small step budget; on GPUs
    float32, a fixed cache and decode graphs up to 16 sequences)."""
    gpu = {} if device == "cpu" else dict(dtype="float32", num_gpu_blocks=512, max_num_seqs=16)
    return engine_config_from_kwargs(
        model, device=device, tensor_parallel_size=tp, pipeline_parallel_size=pp,
        max_num_batched_tokens=MAX_BATCHED_TOKENS, max_model_len=256,
        enable_prefix_caching=True, cpu_kv_cache_gib=0.01, distributed_timeout=timeout,
        async_scheduling=async_scheduling, **gpu,
        **({} if custom_all_reduce is None else {"custom_all_reduce": custom_all_reduce}))


def make_llm(model: str, tp: int, pp: int, timeout: float, device: str = "cpu",
             async_scheduling: bool | None = None,
             custom_all_reduce: bool | None = None) -> LLM:
    """An LLM of ``make_config``."""
    return LLM(config=make_config(model, tp, pp, timeout, device, async_scheduling,
                                  custom_all_reduce))


def _outputs(outs: list[Any]) -> list[dict[str, Any]]:
    result = []
    for out in outs:
        for comp in out.outputs:
            lps = [{str(k): v for k, v in d.items()} for d in (comp.logprobs or [])]
            result.append({"tokens": list(comp.token_ids), "logprobs": lps})
    return result


def run(model: str, tp: int, pp: int, timeout: float = 30.0, device: str = "cpu",
        async_scheduling: bool | None = None,
        custom_all_reduce: bool | None = None) -> dict[str, Any]:
    """Runs the workload; tokens, logprobs and the facts the tests assert on."""
    llm = make_llm(model, tp, pp, timeout, device, async_scheduling, custom_all_reduce)
    engine = llm.engine
    outputs = []
    for prompts, params in workload():
        outputs += _outputs(llm.generate(prompts, params))
    executor = engine.executor
    attn = engine.runner.model.attention_layers()
    return {
        "outputs": outputs,
        "stats": engine.stats(),
        "world_size": getattr(executor, "world_size", 1),
        "max_in_flight_seen": engine.max_in_flight_seen,
        "num_pipelined_steps": engine.num_pipelined_steps,
        "rank0_kv_heads": attn[0].num_kv_heads,
        "rank0_layers": [engine.runner.model.start_layer, engine.runner.model.end_layer],
        "custom_all_reduce": ps.get_custom_all_reduce() is not None,
    }


def run_with_fault(model: str, tp: int, pp: int, timeout: float, fault: str,
                   fault_rank: int) -> int:
    """Steps a long generation, then kills (or freezes) one worker; the next steps must fail
    with an error naming it. Prints the worker pids first; returns the exit status."""
    llm = make_llm(model, tp, pp, timeout)
    engine = llm.engine
    procs = engine.executor.ctx.procs
    print("PIDS " + json.dumps({r: p.pid for r, p in procs.items()}), flush=True)
    engine.add_request("long", _prompt(8, 20), SamplingParams(temperature=0.0, max_tokens=200,
                                                              ignore_eos=True))
    for _ in range(3):
        engine.step()
    os.kill(procs[fault_rank].pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
    start = time.monotonic()
    try:
        while engine.has_unfinished_requests():
            engine.step()
            time.sleep(0.01)
    except Exception as exc:  # noqa: BLE001 - the test reads the message
        print(f"ENGINE_ERROR after {time.monotonic() - start:.1f}s: {type(exc).__name__}: "
              f"{exc}", file=sys.stderr, flush=True)
        deadline = time.monotonic() + 10  # the other workers must exit by themselves
        for proc in procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        print("EXITCODES " + json.dumps({r: p.exitcode for r, p in procs.items()}), flush=True)
        return 3
    print("NO_ERROR", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fault", choices=["kill", "stop"], default=None)
    parser.add_argument("--fault-rank", type=int, default=1)
    parser.add_argument("--async-scheduling", action="store_true")
    parser.add_argument("--custom-all-reduce", action=argparse.BooleanOptionalAction,
                        default=None)
    args = parser.parse_args()
    async_scheduling = True if args.async_scheduling else None
    if is_torchrun_worker():  # under torchrun, ranks other than 0 serve rank 0's plans
        return run_torchrun_worker(make_config(args.model, args.tp, args.pp, args.timeout,
                                               args.device, async_scheduling,
                                               args.custom_all_reduce))
    if args.fault:
        return run_with_fault(args.model, args.tp, args.pp, args.timeout, args.fault,
                              args.fault_rank)
    result = run(args.model, args.tp, args.pp, args.timeout, args.device, async_scheduling,
                 args.custom_all_reduce)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
