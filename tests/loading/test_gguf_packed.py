"""GGUF kept packed: the linear method against gguf-py's dequantization (merged q/k/v of mixed
types, gate/up, a float part, tensor-parallel row and column shards), and the default model
loaded packed against the same model dequantized at load."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, quants
from tolerances import assert_close

from fuselm import config as fuselm_config
from fuselm.bench.dummy_gguf import random_blocks
from fuselm.kernels import KernelSet
from fuselm.kernels.gguf_matmul import TYPE_IDS
from fuselm.layers import linear
from fuselm.layers.quantization.config import QuantizationConfig
from fuselm.layers.quantization.gguf_packed import GGUFPackedLinearMethod
from fuselm.loading.gguf import QuantizedTensor, load_gguf
from fuselm.loading.gguf_quantization import packed_quantization
from fuselm.parallel import parallel_state as ps

QUANT = QuantizationConfig("gguf", source="gguf", bits=4)
# the engine runs a .gguf packed with --quantization gguf once config/builder/loader take it
needs_engine_option = pytest.mark.skipif(
    "gguf" not in typing.get_args(fuselm_config.Quantization),
    reason="--quantization gguf is not accepted by fuselm.config yet")


def _method() -> GGUFPackedLinearMethod:
    return GGUFPackedLinearMethod(KernelSet("reference", "cpu"), QUANT)


def _tensor(name: str, n: int, k: int, seed: int) -> tuple[QuantizedTensor, torch.Tensor]:
    """A random packed [n, k] tensor of ggml type ``name`` and gguf-py's float32 decoding."""
    if name == "F16":
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
        raw = w.half().contiguous().view(torch.uint8).reshape(n, -1)
        return QuantizedTensor("F16", raw, (n, k)), w.half().float()
    raw = random_blocks(TYPE_IDS[name], n, k, seed=seed)
    ref = quants.dequantize(raw.numpy(), GGMLQuantizationType[name])
    return QuantizedTensor(name, raw, (n, k)), torch.from_numpy(np.array(ref, np.float32))


def _tp(monkeypatch, rank: int, size: int) -> None:
    monkeypatch.setattr(ps, "get_tp_rank", lambda: rank)
    monkeypatch.setattr(ps, "get_tp_size", lambda: size)


def _finish(layer) -> None:
    layer.method.process_weights_after_loading(layer)


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_qkv_of_mixed_types_is_segments_per_type(monkeypatch, tp_rank):
    _tp(monkeypatch, tp_rank, 2)
    k, head = 256, 32  # 4 q heads, 2 kv heads over 2 ranks
    layer = linear.QKVParallelLinear(k, head, 4, 2, dtype=torch.float32, method=_method())
    parts = {"q": _tensor("Q4_K", 4 * head, k, 1), "k": _tensor("Q4_K", 2 * head, k, 2),
             "v": _tensor("Q6_K", 2 * head, k, 3)}
    for shard, (qt, _) in parts.items():
        layer.qweight.weight_loader(layer.qweight, qt, shard)
    _finish(layer)
    assert [(s.start, s.stop, s.ggml_type) for s in layer.gguf_segments] == [
        (0, 96, TYPE_IDS["Q4_K"]), (96, 128, TYPE_IDS["Q6_K"])]
    rows = [ref[tp_rank * ref.shape[0] // 2:(tp_rank + 1) * ref.shape[0] // 2]
            for _, ref in parts.values()]
    x = torch.randn(3, k)
    assert_close(layer(x), x @ torch.cat(rows).t(), atol=1e-5, rtol=1e-5)


def test_gate_up_one_type_is_one_qweight_and_float_part_runs_dense():
    layer = linear.MergedColumnParallelLinear(64, [40, 24], bias=True, dtype=torch.float32,
                                              method=_method())
    (g, g_ref), (u, u_ref) = _tensor("Q8_0", 40, 64, 4), _tensor("Q8_0", 24, 64, 5)
    layer.qweight.weight_loader(layer.qweight, g, 0)
    layer.qweight.weight_loader(layer.qweight, u, 1)
    layer.bias.data.normal_()
    _finish(layer)
    assert layer.qweight.shape == (64, 68) and len(layer.gguf_segments) == 1
    assert layer.method.weight_bytes(layer) == 64 * 68 + 64 * 4
    x = torch.randn(2, 64)
    expected = F.linear(x, torch.cat([g_ref, u_ref]), layer.bias)
    assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    dense = linear.ReplicatedLinear(64, 8, bias=False, dtype=torch.float32, method=_method())
    f16, f16_ref = _tensor("F16", 8, 64, 6)
    dense.qweight.weight_loader(dense.qweight, f16)
    _finish(dense)
    assert dense.gguf_segments[0].ggml_type == -1
    assert_close(dense(x), x @ f16_ref.t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["Q4_0", "Q5_K"])
def test_row_parallel_shard_is_whole_blocks(monkeypatch, name):
    _tp(monkeypatch, 1, 2)
    k = 512
    layer = linear.RowParallelLinear(k, 24, dtype=torch.float32, method=_method())
    qt, ref = _tensor(name, 24, k, 7)
    layer.qweight.weight_loader(layer.qweight, qt)
    _finish(layer)
    x = torch.randn(2, k // 2)
    assert_close(layer.method.apply(layer, x, None), x @ ref[:, k // 2:].t(), atol=1e-5,
                 rtol=1e-5)


def test_misaligned_shard_and_missing_rows_are_refused(monkeypatch):
    _tp(monkeypatch, 1, 2)
    layer = linear.RowParallelLinear(256, 8, dtype=torch.float32, method=_method())
    with pytest.raises(ValueError, match="256-value blocks of Q4_K"):
        layer.qweight.weight_loader(layer.qweight, _tensor("Q4_K", 8, 256, 8)[0])
    _tp(monkeypatch, 0, 1)
    merged = linear.MergedColumnParallelLinear(64, [32, 32], dtype=torch.float32,
                                               method=_method())
    merged.qweight.weight_loader(merged.qweight, _tensor("Q8_0", 32, 64, 9)[0], 1)
    with pytest.raises(ValueError, match="rows 0..32 were not loaded"):
        _finish(merged)
    with pytest.raises(TypeError, match="QuantizedTensors"):
        merged.qweight.weight_loader(merged.qweight, torch.zeros(32, 64), 0)


def test_packed_by_default_on_cuda_only_unless_asked(default_gguf_path):
    ckpt = load_gguf(default_gguf_path)
    assert packed_quantization(ckpt, "cpu") is None
    on_gpu = packed_quantization(ckpt, "cuda")
    assert on_gpu.method == "gguf" and on_gpu.checkpoint_format == "Q4_1"
    assert packed_quantization(ckpt, "cpu", "gguf") == on_gpu
    assert packed_quantization(ckpt, "cuda", "int8") is None


@needs_engine_option
def test_default_model_packed_equals_dequantized(default_llm):
    """Logits at every position of a prompt, then two greedy tokens (the CPU reference
    dequantizes the packed weights every step: slow, so few)."""
    from helpers import all_position_logits

    from fuselm import LLM, SamplingParams

    packed = LLM(device="cpu", cpu_kv_cache_gib=0.05, max_model_len=256, quantization="gguf")
    layers = [m for m in packed.engine.runner.model.modules() if hasattr(m, "gguf_segments")]
    assert layers and all(m.qweight.dtype == torch.uint8 for m in layers)
    prompt = default_llm.tokenizer.encode("The capital of France is")
    expected = all_position_logits(default_llm.engine, [prompt])[0]
    got = all_position_logits(packed.engine, [prompt])[0]
    # float32 sums of the same products in another order (reference matmul vs dense GEMV)
    assert_close(got, expected, atol=2e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    params = SamplingParams(max_tokens=2, temperature=0.0)
    want = default_llm.generate([prompt], params)[0].outputs[0].token_ids
    assert packed.generate([prompt], params)[0].outputs[0].token_ids == want


@pytest.fixture(scope="module")
def tiny_q4k(tmp_path_factory):
    """A 2-layer llama-tiny GGUF of random Q4_K blocks (bench.dummy_gguf)."""
    from fuselm.bench.dummy_gguf import write_dummy_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny-q4k.gguf"
    return write_dummy_gguf(path, "llama-tiny", "Q4_K", num_layers=2, device="cpu")


def test_dummy_gguf_writer_round_trips(tiny_q4k):
    ckpt = load_gguf(tiny_q4k)
    assert ckpt.quant_types == {"Q4_K": 2 * 7 + 2, "F32": 2 * 2 + 1}
    assert (ckpt.config["hidden_size"], ckpt.config["num_hidden_layers"]) == (256, 2)
    name, qt = next((n, t) for n, t in ckpt.tensors(packed_linear=True) if n.endswith("qweight"))
    assert name == "model.layers.0.self_attn.q_proj.qweight" and qt.data.shape == (256, 144)
    w = qt.dequantize()
    assert 0.005 < float(w.abs().mean()) < 0.1  # sane scales: a trained layer's magnitude


@needs_engine_option
def test_tiny_k_quant_model_packed_equals_dequantized(tiny_q4k):
    from helpers import all_position_logits

    from fuselm import LLM

    kwargs = dict(device="cpu", cpu_kv_cache_gib=0.02, max_model_len=64)
    dense = LLM(str(tiny_q4k), **kwargs)
    packed = LLM(str(tiny_q4k), quantization="gguf", **kwargs)
    prompt = list(range(3, 40, 3))
    expected = all_position_logits(dense.engine, [prompt])[0]
    assert_close(all_position_logits(packed.engine, [prompt])[0], expected, atol=2e-4,
                 rtol=1e-4)


def test_kernel_layout_splits_q8_0_rows_on_cuda_only():
    """On CUDA a Q8_0 segment keeps its bytes in the split layout (same product, gguf-py's
    decoding of the file's blocks as the reference); other types, CPUs and K % 64 != 0 keep
    the file's blocks."""
    from fuselm.kernels import gguf_matmul as gm
    from fuselm.layers.quantization.gguf_packed import kernel_layout

    q8 = gm.TYPE_IDS["Q8_0"]
    q = random_blocks(q8, 6, 256, seed=3)
    rows, tid = kernel_layout(q, q8, 256, cuda=True)
    assert tid == gm.Q8_0_SPLIT and rows.shape == q.shape and not torch.equal(rows, q)
    w = quants.dequantize(q.numpy(), GGMLQuantizationType.Q8_0).reshape(6, 256)
    x = torch.randn(3, 256)
    expected = x.double() @ torch.from_numpy(np.asarray(w, dtype=np.float64)).t()
    torch.testing.assert_close(gm.gguf_matmul_ref(x, rows, tid).double(), expected,
                               rtol=1e-5, atol=1e-4)
    for data, ggml_type, k, cuda in [(q, q8, 256, False),
                                     (random_blocks(q8, 2, 96), q8, 96, True),
                                     (random_blocks(gm.TYPE_IDS["Q4_K"], 2, 256),
                                      gm.TYPE_IDS["Q4_K"], 256, True)]:
        kept, kept_type = kernel_layout(data, ggml_type, k, cuda)
        assert kept is data and kept_type == ggml_type
