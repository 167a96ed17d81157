"""Two "nodes" on one machine: two torchrun invocations meeting at a c10d rendezvous on
127.0.0.1 give the same tokens as one process. The c10d rendezvous gives out ranks in arrival
order (``--node-rank`` is ignored), so either invocation may turn out to be rank 0."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.distributed.dist_helpers import DRIVER, assert_same_outputs, driver_env, free_port


def two_nodes(command: list[str], timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Runs ``torchrun ... command`` twice (1 process each) against one rendezvous."""
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
         "--nproc-per-node", "1", "--node-rank", str(node), "--rdzv-backend", "c10d",
         "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"fuselm-test-{port}",
         "--max-restarts", "0", *command],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=driver_env())
        for node in range(2)]
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            proc.kill()
    for proc in done:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return done


def test_two_node_pipeline_matches_one_process(checkpoint, reference):
    """PP=2 across the two nodes (the usual multi-node split): tokens and logprobs."""
    model = checkpoint("llama3-gqa-scaled")
    want = reference("llama3-gqa-scaled")
    nodes = two_nodes([str(DRIVER), "--model", str(model), "--pp", "2"])
    results = [ln for p in nodes for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(results) == 1, "exactly one process is rank 0"
    got = json.loads(results[0][len("RESULT "):])
    assert got["world_size"] == 2 and got["max_in_flight_seen"] == 2
    assert got["stats"]["num_partial_prefills_total"] > 0
    assert got["stats"]["prefix_cache_hits_total"] > 0
    assert_same_outputs(got["outputs"], want["outputs"])


def test_two_node_fuselm_generate_cli(checkpoint):
    """``torchrun ... -m fuselm generate --tensor-parallel-size 2`` prints one process's text."""
    from fuselm import LLM, SamplingParams

    model = checkpoint("qwen2-gqa-tied-bias")
    prompt = "The capital of France is"
    flags = ["--device", "cpu", "--cpu-kv-cache-gib", "0.01", "--max-num-batched-tokens", "8",
             "--max-model-len", "256"]
    llm = LLM(model=str(model), device="cpu", cpu_kv_cache_gib=0.01, max_num_batched_tokens=8,
              max_model_len=256)
    want = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24,
                                               ignore_eos=True))[0].outputs[0].text
    nodes = two_nodes(["-m", "fuselm", "generate", prompt, "--model", str(model), "--raw-prompt",
                       "--tensor-parallel-size", "2", "--temperature", "0", "--max-tokens",
                       "24", "--ignore-eos", *flags])
    texts = [p.stdout for p in nodes if p.stdout.strip()]
    assert len(texts) == 1, "exactly one process (rank 0) prints the answer"
    assert texts[0] == want + "\n"
