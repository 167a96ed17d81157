"""fuselm's logits and greedy tokens equal Hugging Face transformers' on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch

from fuselm import LLM, SamplingParams
from tests.helpers import all_position_logits
from tests.tiny_models import TINY_CONFIGS, VOCAB_SIZE, make_tiny_checkpoint

transformers = pytest.importorskip("transformers")

PROMPT_LENGTHS = [40, 5, 23, 1, 17]  # up to position 39 > original_max_position_embeddings 16
ATOL = 1e-4


def _prompts(seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def checkpoint(request, tmp_path_factory):
    path = make_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    return request.param, path, hf.eval()


def _fuselm(path, **kwargs) -> LLM:
    return LLM(str(path), device="cpu", block_size=16, num_gpu_blocks=64, **kwargs)


@torch.inference_mode()
def _hf_logits(hf, prompt: list[int]) -> torch.Tensor:
    return hf(torch.tensor([prompt])).logits[0].float()


def test_logits_match_every_position(checkpoint):
    """A packed batch of different-length prompts: each position within 1e-4 of HF alone."""
    name, path, hf = checkpoint
    llm = _fuselm(path)
    prompts = _prompts(1)
    ours = all_position_logits(llm.engine, prompts)
    for prompt, got in zip(prompts, ours, strict=True):
        want = _hf_logits(hf, prompt)
        assert got.shape == (len(prompt), VOCAB_SIZE)
        err = (got - want).abs().max().item()
        assert err < ATOL, f"{name}: max abs logit error {err:.2e} (len {len(prompt)})"


def test_negative_control_without_rope_scaling(tmp_path):
    """Dropping llama3 rope scaling must break the tolerance, so the check has teeth."""
    path = make_tiny_checkpoint("llama3-gqa-scaled", tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default",
                              "rope_theta": cfg["rope_parameters"]["rope_theta"]}
    (path / "config.json").write_text(json.dumps(cfg))
    llm = _fuselm(path)
    prompt = _prompts(2)[0]
    got = all_position_logits(llm.engine, [prompt])[0]
    err = (got - _hf_logits(hf, prompt)).abs().max().item()
    assert err > 100 * ATOL, f"rope scaling dropped, yet error only {err:.2e}"


def test_greedy_32_tokens_identical(checkpoint):
    """Greedy generation of 32 tokens equals HF's, each step's top-2 margin > 1e-3."""
    name, path, hf = checkpoint
    llm = _fuselm(path)
    prompts = _prompts(3)[:3]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        ids = list(prompt)
        with torch.inference_mode():
            for _ in range(32):
                logits = _hf_logits(hf, ids)[-1]
                top2 = logits.topk(2).values
                assert top2[0] - top2[1] > 1e-3, f"{name}: near-tie, test would be flaky"
                ids.append(int(logits.argmax()))
        assert out.outputs[0].token_ids == ids[len(prompt):], name


def test_sharded_checkpoint_with_index(tmp_path):
    """A checkpoint saved in several safetensors shards with an index loads to the same logits."""
    path = make_tiny_checkpoint("qwen2-gqa-tied-bias", tmp_path / "one")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="60KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((path / name).read_bytes())
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    prompt = _prompts(4)[1]
    got = all_position_logits(_fuselm(sharded).engine, [prompt])[0]
    assert (got - _hf_logits(hf, prompt)).abs().max().item() < ATOL
