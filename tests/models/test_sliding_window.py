"""Config fields beyond plain Llama: sliding-window attention (Mistral, Qwen2's per-layer
windows) and ``mlp_bias`` give transformers' greedy tokens, through the Triton kernels (under
the interpreter on a CPU) with chunked prefill and prefix caching; unimplemented fields (another
activation, attention kind) are refused by name."""

from __future__ import annotations

import pytest
import torch

from fuselm import LLM, SamplingParams
from fuselm.config import ModelConfig
from fuselm.errors import UnsupportedModelError
from fuselm.kernels import available_backends
from tests.tiny_models import make_tiny_checkpoint

transformers = pytest.importorskip("transformers")

PROMPT_LEN, NEW_TOKENS = 37, 12  # windows of 11 and 13 tokens: the prompt is ~3 windows


def _hf_greedy(path, prompts):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    outs = []
    with torch.inference_mode():  # whole-sequence forwards: transformers' own masks, no cache
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(NEW_TOKENS):
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
            outs.append(ids[len(prompt):])
    return outs


@pytest.mark.parametrize("name", ["mistral-sliding", "qwen2-sliding", "llama-mlp-bias"])
def test_greedy_tokens_equal_transformers(name, tmp_path):
    if "triton" not in available_backends("prefill_attention"):
        pytest.skip("the Triton kernels do not run here")
    path = make_tiny_checkpoint(name, tmp_path / name)
    gen = torch.Generator().manual_seed(7)
    shared = torch.randint(0, 256, (PROMPT_LEN - 5,), generator=gen).tolist()
    prompts = [shared + torch.randint(0, 256, (5,), generator=gen).tolist() for _ in range(2)]
    expected = _hf_greedy(path, prompts)
    llm = LLM(str(path), device="cpu", kernel_backend="triton", block_size=4,
              num_gpu_blocks=128, max_num_batched_tokens=16, enable_chunked_prefill=True,
              enable_prefix_caching=True, max_model_len=128)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    first = llm.generate([prompts[0]], params)[0]  # fills the prefix cache
    second = llm.generate([prompts[1]], params)[0]  # its shared blocks come from the cache
    assert second.num_cached_tokens >= 28
    assert [first.outputs[0].token_ids, second.outputs[0].token_ids] == expected
    if name != "llama-mlp-bias":
        windows = [layer.self_attn.attn.sliding_window
                   for layer in llm.engine.runner.model.layers.values()]
        assert windows == {"mistral-sliding": [11, 11], "qwen2-sliding": [0, 13]}[name]


def _config(**fields):
    base = {"architectures": ["MistralForCausalLM"], "vocab_size": 32, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    return {**base, **fields}


def test_windows_are_read_as_transformers_reads_them():
    assert ModelConfig.from_hf_dict(_config(sliding_window=8)).layer_window(1) == 8
    assert ModelConfig.from_hf_dict(_config(sliding_window=None)).layer_window(0) is None
    qwen = {"architectures": ["Qwen2ForCausalLM"]}
    assert ModelConfig.from_hf_dict(_config(**qwen, sliding_window=8)).sliding_window is None
    cfg = ModelConfig.from_hf_dict(_config(**qwen, sliding_window=8, use_sliding_window=True,
                                           max_window_layers=1))
    assert [cfg.layer_window(i) for i in range(2)] == [None, 8]
    llama = ModelConfig.from_hf_dict(_config(architectures=["LlamaForCausalLM"],
                                             sliding_window=8))
    assert llama.sliding_window is None  # transformers' Llama has no window either


@pytest.mark.parametrize("fields,named", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"sliding_window": 8, "layer_types": ["full_attention", "chunked_attention"]},
     "layer_types"),
    ({"sliding_window": 0}, "sliding_window"),
])
def test_unimplemented_fields_are_refused_by_name(fields, named):
    with pytest.raises(UnsupportedModelError, match=named):
        ModelConfig.from_hf_dict(_config(**fields))


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("name", ["mistral-sliding", "qwen2-sliding"])
def test_sliding_window_bf16_on_the_gpu(name, graphs, tmp_path):
    """bf16 on a GPU (auto kernels; decode in CUDA graphs or eager): every prompt position's
    logits near transformers' float32 ones, and each greedy token within the logit tolerance of
    that step's maximum."""
    from tests.helpers import all_position_logits

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    path = make_tiny_checkpoint(name, tmp_path / name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (37, 50)]
    llm = LLM(str(path), device="cuda", dtype="bfloat16", enforce_eager=not graphs,
              num_gpu_blocks=64, max_model_len=128)
    with torch.inference_mode():
        for prompt, got in zip(prompts, all_position_logits(llm.engine, prompts), strict=True):
            want = hf(torch.tensor([prompt])).logits[0]
            rel = ((got.float().cpu() - want).norm() / want.norm()).item()
            assert rel < 2e-2, f"relative logit error {rel:.3e}"
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS,
                                                    ignore_eos=True))
        for prompt, out in zip(prompts, outs, strict=True):
            tokens = out.outputs[0].token_ids
            logits = hf(torch.tensor([prompt + tokens])).logits[0]
            for i, token in enumerate(tokens):
                row = logits[len(prompt) - 1 + i]
                gap = (row.max() - row[token]) / row.abs().max()
                assert gap < 0.03, f"step {i}: token {token} {gap:.3f} below the max"
