"""fuselm.planner: memory and latency arithmetic checked against hand-computed numbers."""

from __future__ import annotations

import argparse
import json

import pytest

from fuselm import planner
from fuselm.config import ModelConfig
from fuselm.planner import ClusterSpec, PlanOptions
from fuselm.planner_hardware import GIB, get_gpu, gpu_from_device_name, known_model_dict


def shape(name: str) -> ModelConfig:
    return ModelConfig.from_hf_dict(known_model_dict(name))


def test_total_params_match_published_counts():
    # Llama-3-8B: embed 128256*4096 = 525,336,576 (x2, untied); layer: q,o 4096^2 each,
    # k,v 4096*1024 each, MLP 3*4096*14336, two norms 4096 -> 218,112,000; 32 layers; final norm.
    assert planner.total_params(shape("Llama-3-8B")) == 32 * 218_112_000 + 2 * 525_336_576 + 4096
    assert planner.total_params(shape("Llama-3-8B")) == 8_030_261_248  # HF model card
    assert planner.total_params(shape("Llama-3-70B")) == 70_553_706_496  # HF model card


def test_30b_example_is_60gb_in_fp16():
    n = planner.total_params(shape("30B"))
    # layer: 4*7168^2 (MHA) + 3*7168*19200 + 2*7168 = 618,412,032; 48 layers; 2 x 32000*7168
    assert n == 48 * 618_412_032 + 2 * 32000 * 7168 + 7168
    assert 2 * n / 1e9 == pytest.approx(60.3, abs=0.05)


def test_stage_layers_follow_vllm_split():
    assert planner.stage_layers(48, 4) == [12, 12, 12, 12]
    assert planner.stage_layers(126, 4) == [31, 32, 32, 31]
    assert planner.stage_layers(5, 3) == [2, 2, 1]
    assert sum(planner.stage_layers(80, 16)) == 80


def test_30b_on_4x8_a100_tp8_pp4_memory():
    m, gpu = shape("30B"), get_gpu("A100-80GB")
    opts = PlanOptions(context_len=4096, batch_size=64)
    p = planner.plan_layout(m, ClusterSpec(gpu, 4, 8), opts, tp=8, pp=4)
    # per rank per layer: (4*7168^2 + 3*7168*19200)/8 + 2*7168 = 77,314,048; 12 layers
    layers = 12 * 77_314_048
    last = layers + 32000 * 7168 // 8 + 7168  # LM head shard + final norm (largest stage)
    assert p.weight_gib * GIB == pytest.approx(2 * last)
    assert 2 * last / 1e9 == pytest.approx(1.91, abs=0.01)  # the "about 1.9 GB"
    kv_tok = 2 * 12 * 7 * 128 * 2  # K+V x layers x 56/8 heads x head_dim x bf16
    assert p.kv_bytes_per_token == kv_tok == 43_008
    # activations of the last stage: 8192 tokens x max(attention 3*7168 + (2*7+2*7)*128,
    # MLP 3*7168 + 3*19200/8) x 2 bytes, + fp32 logits and probs of 256 rows
    act = 8192 * max(3 * 7168 + 28 * 128, 3 * 7168 + 3 * 2400) * 2 + 2 * 256 * 32000 * 4
    assert p.activation_gib * GIB == pytest.approx(act)
    free = 0.9 * 80 * GIB - 2 * last - act - 1 * GIB
    assert p.kv_cache_gib * GIB == pytest.approx(free)
    assert p.kv_capacity_tokens == int(free / kv_tok) // 16 * 16
    assert p.max_batch_at_context == p.kv_capacity_tokens // 4096
    assert p.kv_at_batch_gib * GIB == pytest.approx(64 * 4096 * kv_tok)
    assert p.feasible and p.num_replicas == 1
    assert not p.tp_crosses_nodes and p.pp_hops_across_nodes == 3


def test_batch1_latency_8b_h100_hand_computed():
    m, gpu = shape("Llama-3-8B"), get_gpu("H100")
    opts = PlanOptions(context_len=1024, mem_bandwidth_gbs=3000)
    p = planner.plan_layout(m, ClusterSpec(gpu, 1, 1), opts, tp=1, pp=1)
    # layers, LM head and final norm read whole; the embedding: one 4096-wide row (batch 1)
    read = 32 * 218_112_000 + 525_336_576 + 4096 + 4096
    kv = 1024 * 2 * 32 * 8 * 128 * 2
    launches = 32 * 10 * 1.5e-6  # kernels per layer x the graph's per-kernel cost
    assert p.decode_latency_ms == pytest.approx(((2 * read + kv) / 3000e9 + launches) * 1e3)
    assert p.decode_latency_ms == pytest.approx(5.0487 + 0.480, abs=1e-3)
    assert p.latency_breakdown_ms["comm"] == 0.0


def test_tp2_collective_cost_hand_computed():
    m, gpu = shape("Llama-3-8B"), get_gpu("H100")
    opts = PlanOptions(context_len=1024, mem_bandwidth_gbs=3000)
    p = planner.plan_layout(m, ClusterSpec(gpu, 1, 8), opts, tp=2, pp=1)
    link = 0.8 * 450e9  # comm efficiency x NVLink per direction
    allreduce = 10e-6 + 2 * (1 / 2) * 4096 * 2 / link
    gather = 10e-6 + (1 / 2) * 128256 * 2 / link
    assert p.latency_breakdown_ms["comm"] == pytest.approx((65 * allreduce + gather) * 1e3)
    assert p.num_replicas == 4


def test_collective_formula():
    assert planner.collective_seconds(1e9, 1, 100, 10, 1.0) == 0.0
    assert planner.collective_seconds(1e9, 4, 100, 10, 1.0) == pytest.approx(10e-6 + 1.5 * 0.01)
    assert planner.collective_seconds(1e9, 4, 100, 0, 0.5, all_gather=True) == pytest.approx(
        0.75 * 0.02)


def test_tp_across_nodes_uses_network():
    m, gpu = shape("Llama-3-405B"), get_gpu("H100")
    c = ClusterSpec(gpu, 4, 8)
    p16 = planner.plan_layout(m, c, PlanOptions(), tp=16, pp=1)
    assert p16.tp_crosses_nodes
    p8 = planner.plan_layout(m, c, PlanOptions(), tp=8, pp=4)
    assert not p8.tp_crosses_nodes and p8.pp_hops_across_nodes == 3


def test_kv_heads_replicate_beyond_num_kv_heads():
    s = planner.shard_shape(shape("Llama-3-70B"), 16)
    assert s.kv_heads_per_rank == 1 and s.heads_per_rank == 4


def test_check_layout_rejects_bad_splits():
    m = shape("30B")  # 56 heads
    assert "does not divide" in planner.check_layout(m, 16, 1)
    assert planner.check_layout(m, 8, 4) == ""
    assert "exceeds" in planner.check_layout(m, 1, 64)
    assert (16, 1) not in planner.candidate_layouts(m, ClusterSpec(get_gpu("A100"), 4, 8))


def test_infeasible_and_recommendation():
    plan = planner.make_plan(shape("Llama-3-405B"), ClusterSpec(get_gpu("A100-40GB"), 1, 8),
                             PlanOptions(), model_name="405B")
    assert plan.recommended is None and not any(p.feasible for p in plan.layouts)
    assert "exceed" in plan.layouts[0].reason
    plan = planner.make_plan(shape("Llama-3-8B"), ClusterSpec(get_gpu("H100"), 1, 8),
                             PlanOptions(context_len=2048))
    best = min(p.decode_latency_ms for p in plan.layouts if p.feasible)
    assert plan.recommended.decode_latency_ms <= best * 1.02
    thr = planner.make_plan(shape("Llama-3-8B"), ClusterSpec(get_gpu("H100"), 1, 8),
                            PlanOptions(), objective="throughput")
    top = max(p.peak_throughput_tok_s for p in thr.layouts)
    assert thr.recommended.peak_throughput_tok_s >= top * 0.98


def test_more_bandwidth_is_faster_and_quantization_halves_weights():
    m, c = shape("Llama-3-8B"), ClusterSpec(get_gpu("A100-80GB"), 1, 1)
    a = planner.plan_layout(m, c, PlanOptions(), 1, 1)
    b = planner.plan_layout(m, ClusterSpec(get_gpu("H200"), 1, 1), PlanOptions(), 1, 1)
    assert b.decode_latency_ms < a.decode_latency_ms
    q = planner.plan_layout(m, c, PlanOptions(weight_dtype="int8"), 1, 1)
    assert q.weight_gib == pytest.approx(a.weight_gib / 2)


def test_options_validation_and_unknown_names():
    with pytest.raises(ValueError):
        PlanOptions(gpu_memory_utilization=1.5).validate()
    with pytest.raises(ValueError):
        get_gpu("V100")
    with pytest.raises(ValueError):
        planner.dtype_bytes("int3")
    assert gpu_from_device_name("NVIDIA H100 80GB HBM3").name == "H100-SXM"
    assert gpu_from_device_name("NVIDIA A100-SXM4-40GB").name == "A100-40GB"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    planner.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_run_with_config_json(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(known_model_dict("30B")))
    out = tmp_path / "plan.json"
    result = planner.run(_args("--model", str(cfg), "--gpu", "A100-80GB", "--num-nodes", "4",
                               "-tp", "8", "-pp", "4", "--output-json", str(out)))
    text = capsys.readouterr().out
    assert "recommended: TP=8 x PP=4" in text
    data = json.loads(out.read_text())
    assert data["layouts"][0]["tensor_parallel_size"] == 8
    assert data["cluster"]["num_gpus"] == 32 and result["num_params"] == data["num_params"]


def test_cli_rejects_layout_larger_than_cluster():
    with pytest.raises(ValueError):
        planner.run(_args("--model", "Llama-3-8B", "--gpus-per-node", "2", "-tp", "4"))


def _tiny(**kw) -> ModelConfig:
    return ModelConfig.from_hf_dict({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 256, **kw})


def test_decode_step_bytes_tiny_config_by_hand():
    # hidden 64, head_dim 16, 4 heads, 2 KV heads, MLP 128, 2 layers, vocab 256, bf16.
    # per layer: q 64*64 + k 64*32 + v 64*32 + o 64*64 + MLP 3*64*128 + two norms 2*64 = 36992
    layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    head, final_norm, row = 256 * 64, 64, 64
    kv_token = 2 * 2 * 2 * 16  # K and V, 2 layers, 2 KV heads, 16 dims
    sb = planner.decode_step_bytes(_tiny(), batch=3, dtype="bf16", kv_tokens=10)
    assert sb.weights == (2 * layer + final_norm + head) * 2  # layers and LM head read whole
    assert sb.embedding == 3 * row * 2  # one gathered row per token, not the 256-row table
    assert sb.kv == 3 * 10 * kv_token * 2
    assert sb.total == sb.weights + sb.embedding + sb.kv
    # a tied head reads the (one) table whole as the LM head; fp8 KV halves the KV bytes
    tied = planner.decode_step_bytes(_tiny(tie_word_embeddings=True), 3, "bf16", 10, "fp8")
    assert tied.weights == sb.weights and tied.kv == 3 * 10 * kv_token
    # TP=2: each rank holds half of every matmul, the norms whole, half the head, one KV head
    tp2 = planner.decode_step_bytes(_tiny(), 1, "float32", 4, tp=2)
    assert tp2.weights == (2 * (layer - 2 * 64) / 2 + 2 * 2 * 64 + 64 + head / 2) * 4
    assert tp2.kv == 4 * (2 * 2 * 1 * 16) * 4


def test_decode_step_bytes_llama3_8b_h200_figure():
    # 4.07 ms/token on the H200 (docs/perf/README.md): 15.01 GB of layers + head, 8 KB of
    # embedding row: 87 % of the card's measured 4.27 TB/s copy bandwidth
    sb = planner.decode_step_bytes(shape("Llama-3-8B"), 1, "bf16", 256)
    assert sb.weights == 2 * (32 * 218_112_000 + 4096 + 525_336_576)
    assert sb.embedding == 2 * 4096
    gbs = sb.total / 4.07e-3 / 1e9
    assert gbs / planner.MEASURED_COPY_GBS["H200-SXM"] == pytest.approx(0.87, abs=0.005)
    text = sb.describe(4.07, 4270.0)
    assert "15.043 GB/step" in text and "86.6 % of the 4270 GB/s copy ceiling" in text


def test_plan_prints_the_step_bytes_and_copy_fraction():
    m, gpu = shape("Llama-3-8B"), get_gpu("H200")
    plan = planner.make_plan(m, ClusterSpec(gpu, 1, 1), PlanOptions(context_len=1024))
    text = planner.format_plan(plan)
    assert plan.step_bytes_b1 == pytest.approx(
        planner.decode_step_bytes(m, 1, "bf16", 1024).total)
    assert "batch-1 step, TP=1: 15.144 GB/step" in text and "of the 4270 GB/s copy ceiling" in text
