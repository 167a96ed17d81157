"""The engine on a GPU in bf16: logits and greedy choices within bf16 tolerance of transformers
(float32), CUDA graphs on and off (including a padded batch size)."""

from __future__ import annotations

import pytest
import torch

from fuselm import LLM, SamplingParams
from tests.helpers import all_position_logits
from tests.tiny_models import make_tiny_checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.gpu

LOGIT_TOL = 0.03  # of the row's largest |logit|: bf16 weights and activations vs float32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_checkpoint("llama3-gqa-scaled", tmp_path_factory.mktemp("gpu"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    return path, hf.eval()


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(9)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 40, 17)]


def _assert_greedy_near_hf_max(hf, prompt: list[int], tokens: list[int]) -> None:
    """Each greedy token's float32 transformers logit is within LOGIT_TOL of that step's max."""
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt + tokens])).logits[0]
    for i, token in enumerate(tokens):
        row = logits[len(prompt) - 1 + i]
        gap = (row.max() - row[token]) / row.abs().max()
        assert gap < LOGIT_TOL, f"step {i}: token {token} {gap:.3f} below the max"


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_prefill_logits_bf16(tiny, backend):
    path, hf = tiny
    llm = LLM(str(path), device="cuda", kernel_backend=backend, enforce_eager=True,
              num_gpu_blocks=64)
    prompts = _prompts()
    ours = all_position_logits(llm.engine, prompts)
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.inference_mode():
            want = hf(torch.tensor([prompt])).logits[0]
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 2e-2, f"relative logit error {rel:.3e}"


@pytest.mark.parametrize("eager", [True, False])
def test_greedy_steps_within_logit_tolerance(tiny, eager):
    """Each chosen token's float32 logit is within LOGIT_TOL of the float32 argmax (near-ties may
    flip in bf16); 3 sequences decode through the size-4 graph (a padded batch)."""
    path, hf = tiny
    llm = LLM(str(path), device="cuda", enforce_eager=eager, num_gpu_blocks=64,
              max_num_seqs=8)
    prompts = _prompts()
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16,
                                                ignore_eos=True))
    replays = llm.engine.stats()["num_graph_replays"]
    assert (replays > 0) != eager
    for prompt, out in zip(prompts, outs, strict=True):
        _assert_greedy_near_hf_max(hf, prompt, out.outputs[0].token_ids)


def test_batch1_decode_with_triton_gemv_kernels(tiny):
    """One sequence decodes through the batch-1 Triton kernels (gemv, QKV + rotary + KV write,
    gate/up + SiLU-and-mul) in a CUDA graph: each greedy token within LOGIT_TOL of
    transformers."""
    path, hf = tiny
    llm = LLM(str(path), device="cuda", kernel_backend="triton", num_gpu_blocks=64)
    model = llm.engine.runner.model
    assert all(layer.mlp.gate_up_act.fn is not None for layer in model.layers.values())
    prompt = _prompts()[1]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16,
                                                ignore_eos=True))[0]
    assert llm.engine.stats()["num_graph_replays"] > 0
    _assert_greedy_near_hf_max(hf, prompt, out.outputs[0].token_ids)


def test_graph_and_eager_agree_on_8b_like_layer_shapes():
    """CUDA-graph decode equals eager decode on a dummy model (same weights, same kernels)."""
    import tempfile
    from pathlib import Path

    from fuselm.bench.dummy_model import write_dummy_checkpoint

    path = write_dummy_checkpoint("llama-tiny", Path(tempfile.mkdtemp()) / "m")
    prompts = [torch.randint(300, 512, (n,)).tolist() for n in (3, 30, 70, 129, 6)]
    # requests that end at different steps: the batch shrinks through several graph sizes
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
              for n in (24, 9, 17, 3, 30)]
    runs = []
    for eager in (True, False):
        llm = LLM(str(path), device="cuda", load_format="dummy", enforce_eager=eager,
                  max_num_seqs=16, num_gpu_blocks=256)
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
        assert (llm.engine.stats()["num_graph_replays"] > 0) != eager
    assert runs[0] == runs[1]
    shared = {out.untyped_storage().data_ptr()
              for size, (_, out) in llm.engine.runner.graphs.items() if size > 1}
    assert len(shared) == 1, "graphs above batch 1 should share one logits buffer"


def test_model_logits_triton_and_cuda_match_reference(tiny):
    """The whole model in bf16 with each kernel backend: logits within bf16 tolerance of the
    reference backend (same weights, same card)."""
    path, _ = tiny
    prompts = _prompts()
    logits = {}
    for backend in ("reference", "triton", "cuda"):
        llm = LLM(str(path), device="cuda", kernel_backend=backend, enforce_eager=True,
                  num_gpu_blocks=64)
        logits[backend] = all_position_logits(llm.engine, prompts)
    for backend in ("triton", "cuda"):
        for got, want in zip(logits[backend], logits["reference"], strict=True):
            rel = ((got - want).norm() / want.norm()).item()
            assert rel < 1.6e-2, f"{backend}: relative logit error {rel:.3e}"


def test_async_scheduling_equals_sync_with_graphs():
    """Async scheduling on the GPU (CUDA graphs, pinned double buffers, the input-copy fence):
    the same greedy tokens as synchronous scheduling, and steps really pipelined."""
    import tempfile
    from pathlib import Path

    from fuselm.bench.dummy_model import write_dummy_checkpoint

    path = write_dummy_checkpoint("llama-tiny", Path(tempfile.mkdtemp()) / "m")
    prompts = [torch.randint(300, 512, (n,)).tolist() for n in (3, 30, 70, 129, 6)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    runs = []
    for async_scheduling in (False, True):
        llm = LLM(str(path), device="cuda", load_format="dummy", max_num_seqs=16,
                  num_gpu_blocks=256, async_scheduling=async_scheduling)
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
    assert llm.engine.num_pipelined_steps > 0
    assert runs[0] == runs[1]
