"""fuselm bench latency: the arithmetic of its columns, and a tiny run with the HF baseline."""

from __future__ import annotations

import json

import pytest
import torch
from bench_helpers import assert_png, parse_bench_args

from fuselm.bench import latency
from fuselm.bench.latency import ModelBytes, Shape, Timings
from fuselm.config import ModelConfig


def tiny_config(**kw) -> ModelConfig:
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 256, **kw}
    return ModelConfig.from_hf_dict(cfg)


def test_prefill_flops_hand_computed():
    m = tiny_config()
    # matmul params per layer: q,o 64*64 each, k,v 64*32 each, MLP 3*64*128 = 36864
    mb = ModelBytes(element_size=4, kv_element_size=4, matmul_params=2 * 36864)
    shape = Shape(batch_size=3, input_len=10, output_len=1)
    attn = 2 * 2 * 2 * 4 * 16 * 10 * 11 / 2  # QK^T + PV over 55 causal pairs, 2 layers, 4 heads
    per_seq = 2 * 2 * 36864 * 10 + attn + 2 * 64 * 256
    assert latency.prefill_flops(m, mb, shape) == pytest.approx(3 * per_seq)


def test_model_bytes_element_sizes_and_matmul_params():
    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(64, 64, bias=False).half()

    mb = latency.model_bytes(Tiny(), tiny_config(), torch.float32)
    assert (mb.element_size, mb.kv_element_size) == (2, 4)
    assert mb.matmul_params == 2 * 36864  # 2 layers, hand count in test_prefill_flops


def test_summarize_shape_bandwidth_and_utilisation():
    m = tiny_config()
    mb = ModelBytes(element_size=2, kv_element_size=2, matmul_params=0)
    shape = Shape(batch_size=2, input_len=10, output_len=4)
    t = Timings(ttft=[0.01, 0.02], step=[0.001, 0.001, 0.003], prefill=[0.02])
    row = latency.summarize_shape(shape, t, mb, m, copy_gbs=2.0, peak=1.0)
    assert row["per_token_ms"]["median"] == pytest.approx(1.0)
    # by hand, bf16: per layer 36864 matmul + 2 x 64 norm params; final norm 64; LM head 256 x 64
    # read whole; the embedding gathered (2 sequences x one 64-wide row); KV of 12 mean tokens:
    # K+V x 2 layers x 2 KV heads x 16 dims
    weights = (2 * (36864 + 128) + 64 + 256 * 64) * 2
    step_bytes = weights + 2 * 64 * 2 + 2 * (10 + 4 / 2) * (2 * 2 * 2 * 16) * 2
    assert row["bytes_per_step"] == pytest.approx(step_bytes)
    assert row["embedding_bytes_per_step"] == 2 * 64 * 2
    assert row["achieved_gbs"] == pytest.approx(step_bytes / 1e-3 / 1e9)
    assert row["bandwidth_fraction"] == pytest.approx(row["achieved_gbs"] / 2.0)
    flops = latency.prefill_flops(m, mb, shape)
    assert row["prefill_tflops"] == pytest.approx(flops / 0.02 / 1e12)
    assert row["decode_tok_s"] == pytest.approx(2000.0)


def test_prompts_are_fresh_and_shaped():
    a = latency.make_prompts(1000, Shape(3, 7, 1), seed=1)
    b = latency.make_prompts(1000, Shape(3, 7, 1), seed=2)
    assert len(a) == 3 and all(len(p) == 7 for p in a) and a != b
    assert all(100 <= t < 1000 for p in a for t in p)


def test_bad_shape_is_rejected(default_llm):
    args = parse_bench_args(latency, ["--batch-size", "0"], llm=default_llm)
    with pytest.raises(ValueError):
        latency.run(args)


def test_latency_run_with_hf_baseline(default_llm, tmp_path, capsys):
    out, png = tmp_path / "lat.json", tmp_path / "lat.png"
    args = parse_bench_args(latency, [
        "--batch-size", "1", "2", "--input-len", "4", "--output-len", "3",
        "--num-iters-warmup", "0", "--num-iters", "1", "--compare", "hf", "--disable-tqdm",
        "--load-format", "dummy",  # the HF side: random weights (the session model is loaded)
        "--output-json", str(out), "--plot", str(png)], llm=default_llm)
    latency.run(args)
    data = json.loads(out.read_text())
    assert data["bench"] == "latency" and data["env"]["torch"] == torch.__version__
    assert [r["batch_size"] for r in data["results"]] == [1, 2]
    for r in data["results"]:
        assert r["num_decode_steps"] == 2  # 3 tokens: one from the prefill, two decode steps
        assert r["per_token_ms"]["median"] > 0 and r["ttft_ms"]["median"] > 0
        assert r["hf"]["per_token_ms"]["median"] > 0 and r["speedup_per_token"] > 0
        assert r["achieved_gbs"] > 0 and r["prefill_tflops"] > 0
    assert_png(png)
    assert "speedup tok" in capsys.readouterr().out
