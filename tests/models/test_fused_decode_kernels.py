"""The batch-1 decode kernel that fuses a projection with what follows it (``gemv_silu_mul``:
gate/up + SiLU-and-mul), bound into the model and run through the Triton interpreter on the CPU:
greedy tokens and logits equal transformers'."""

from __future__ import annotations

import pytest
import torch

from fuselm import LLM, SamplingParams
from fuselm.kernels import KernelChoice, available_backends, resolve
from tests.tiny_models import make_tiny_checkpoint

transformers = pytest.importorskip("transformers")


def _bind_fused(llm: LLM) -> dict[str, int]:
    """Makes every layer take the fused kernel for single tokens; counts its calls."""
    calls = {"gemv_silu_mul": 0}

    def counted(name):
        op = resolve(name, "triton", torch.device("cpu"))

        def run(*args):
            calls[name] += 1
            return op(*args)
        return KernelChoice(name, "test", run, run, "counted", "counted")

    for layer in llm.engine.runner.model.layers.values():
        linear = layer.mlp.gate_up_proj
        linear.weight.data = linear.weight.data.contiguous()  # the CPU keeps [in, out]
        layer.mlp.gate_up_act = counted("gemv_silu_mul")
    return calls


@pytest.mark.parametrize("name", ["llama3-gqa-scaled", "qwen2-gqa-tied-bias"])
def test_fused_decode_kernels_match_transformers(name, tmp_path):
    if "triton" not in available_backends("gemv_silu_mul"):
        pytest.skip("the Triton backend is not available here")
    path = make_tiny_checkpoint(name, tmp_path / name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    llm = LLM(str(path), device="cpu", block_size=16, num_gpu_blocks=64)
    calls = _bind_fused(llm)
    prompt = torch.randint(0, 256, (21,), generator=torch.Generator().manual_seed(4)).tolist()
    steps = 10
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=steps,
                                                ignore_eos=True, logprobs=1))[0].outputs[0]
    layers = len(llm.engine.runner.model.layers)
    assert calls == {"gemv_silu_mul": layers * (steps - 1)}
    ids = prompt + out.token_ids
    with torch.inference_mode():
        logprobs = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1)
    for i, token in enumerate(out.token_ids):
        row = logprobs[len(prompt) - 1 + i]
        top2 = row.topk(2).values
        if top2[0] - top2[1] > 1e-3:
            assert token == int(row.argmax()), f"step {i}"
        assert abs(out.logprobs[i][token] - row[token].item()) < 1e-4, f"step {i}"
