"""Pre-quantized checkpoint formats -> canonical layouts (fuselm.loading.quant_formats).

Each format's tensors are written from its specification (tests/loading/quant_checkpoints.py;
compressed-tensors by its own package), converted, and dequantized through the canonical
references; the result must equal the float64 weight the written integers and scales encode
(for compressed-tensors: the package's own decompression). Hand-made words pin each bit
layout to the format's documented order, and bad configs are refused by name.
"""

from __future__ import annotations

import pytest
import torch

from fuselm.errors import CheckpointError, UnsupportedModelError
from fuselm.kernels.int4_matmul import int4_dequantize_ref
from fuselm.kernels.int8_matmul import int8_dequantize_ref
from fuselm.layers.quantization.config import QuantizationConfig
from fuselm.loading import quant_formats
from tests.loading import quant_checkpoints as qc
from tests.tolerances import assert_close, tolerance


def canonical_dequantize(cfg: QuantizationConfig, t: dict[str, torch.Tensor], n: int,
                         k: int) -> torch.Tensor:
    """float32 ``[N, K]`` of canonical tensors (QUANT_SPEC), through the kernels' refs."""
    if cfg.method == "int4":
        zeros = t.get("zeros", torch.full(t["scales"].shape, 8, dtype=torch.uint8))
        return int4_dequantize_ref(t["qweight"], t["scales"], zeros, cfg.group_size or k)
    if cfg.method == "int8":
        return int8_dequantize_ref(t["qweight"], t["scales"])
    scale = t["weight_scale"]
    if cfg.weight_block is not None:
        b = cfg.weight_block[0]
        scale = scale.repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :k]
    elif scale.numel() == n:
        scale = scale.reshape(n, 1)
    return t["weight"].float() * scale


def convert_all(cfg: QuantizationConfig, tensors: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor of one layer through quant_formats.convert."""
    out: dict[str, torch.Tensor] = {}
    required, optional = quant_formats.checkpoint_suffixes(cfg)
    assert set(required) <= set(tensors) <= set(required + optional)
    for suffix, tensor in tensors.items():
        out.update(quant_formats.convert(cfg, suffix, tensor))
    return out


def _case(case: str, n: int, k: int, seed: int) -> tuple[QuantizationConfig, qc.LayerTensors]:
    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.1
    writer, quant_config = qc._layer_writer(case)
    return quant_formats.parse(quant_config), writer(w)


SHAPES = {"awq-g32": (24, 96), "gptq-v1-sym-g32": (40, 64), "gptq-v1-asym-g64": (16, 192),
          "gptq-v2-asym-perchannel": (24, 40), "fp8-block": (200, 300),
          "fp8-tensor-static": (24, 40), "ct-w4a16-g32-sym": (24, 96),
          "ct-w4a16-g32-asym": (40, 64), "ct-w8a16-channel": (24, 44),
          "ct-fp8-channel-dynamic": (24, 40), "ct-fp8-tensor-static": (24, 40),
          "ct-fp8-block": (136, 260)}


@pytest.mark.parametrize("case", qc.ALL_CASES)
def test_dequantized_canonical_equals_reference(case: str) -> None:
    if case.startswith("ct-"):
        pytest.importorskip("compressed_tensors")
    n, k = SHAPES[case]
    cfg, layer = _case(case, n, k, seed=qc.ALL_CASES.index(case))
    canonical = convert_all(cfg, layer.tensors)
    got = canonical_dequantize(cfg, canonical, n, k)
    assert got.shape == (n, k)
    atol, rtol = tolerance(torch.float32)
    assert_close(got, layer.dequantized.float(), name=case, atol=atol, rtol=rtol)
    if cfg.method == "int4":  # the canonical dtypes and shapes of QUANT_SPEC
        assert canonical["qweight"].dtype == torch.uint8
        assert canonical["qweight"].shape == (n, k // 2)
        assert canonical["scales"].shape == (n, k // (cfg.group_size or k))


def test_awq_interleaved_nibble_order() -> None:
    """AutoAWQ's GEMM packer writes column order_map[i] = (0, 2, 4, 6, 1, 3, 5, 7)[i] into
    nibble i: a word whose nibble i holds i decodes to columns (0, 4, 1, 5, 2, 6, 3, 7)."""
    cfg = quant_formats.parse(qc.QUANT_CONFIGS["awq-g32"])
    word = torch.tensor([[0x76543210]], dtype=torch.int32)  # [K = 1, N / 8 = 1]
    q = quant_formats.convert(cfg, "qzeros", word)["zeros"]  # [N = 8, 1]
    assert q.reshape(-1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    qweight = torch.tensor([[0x76543210]] * 2, dtype=torch.int32)  # K = 2
    packed = quant_formats.convert(cfg, "qweight", qweight)["qweight"]  # [8, 1]
    assert [b & 15 for b in packed.reshape(-1).tolist()] == [0, 4, 1, 5, 2, 6, 3, 7]


def test_gptq_sequential_order_and_v1_zero_offset() -> None:
    """GPTQ packs input rows 8r + i into nibble i of qweight[r]; v1 qzeros store zero - 1."""
    v1 = quant_formats.parse(qc.QUANT_CONFIGS["gptq-v1-asym-g64"])
    v2 = quant_formats.parse(qc.QUANT_CONFIGS["gptq-v2-asym-perchannel"])
    word = torch.tensor([[-0x789ABCDF]], dtype=torch.int32)  # 0x87654321: nibble i = i + 1
    rows = quant_formats.convert(v1, "qweight", word)["qweight"]  # [N = 1, K / 2 = 4]
    assert [(b & 15, b >> 4) for b in rows.reshape(-1).tolist()] == \
        [(1, 2), (3, 4), (5, 6), (7, 8)]
    assert quant_formats.convert(v1, "qzeros", word)["zeros"].reshape(-1).tolist() == \
        [2, 3, 4, 5, 6, 7, 8, 9]
    assert quant_formats.convert(v2, "qzeros", word)["zeros"].reshape(-1).tolist() == \
        [1, 2, 3, 4, 5, 6, 7, 8]


def test_compressed_tensors_fields_match_the_package_unpacker() -> None:
    """Our canonical nibbles are the package's own unpacked values + 8."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    cfg, layer = _case("ct-w4a16-g32-asym", 16, 64, seed=3)
    packed = layer.tensors["weight_packed"]
    theirs = unpack_from_int32(packed, 4, torch.Size([16, 64])).to(torch.int16) + 8
    ours = quant_formats.convert(cfg, "weight_packed", packed)["qweight"]
    ours = torch.stack([ours & 15, ours >> 4], -1).reshape(16, 64).to(torch.int16)
    assert torch.equal(ours, theirs)


def test_act_order_g_idx_is_refused_naming_desc_act() -> None:
    """desc_act: true parses; a layer whose g_idx is the plain k // G order loads, a permuted
    one is refused naming desc_act."""
    _, layer = _case("gptq-v1-sym-g32", 16, 64, seed=1)
    cfg = quant_formats.parse({**qc.QUANT_CONFIGS["gptq-v1-sym-g32"], "desc_act": True})
    perm = layer.tensors["g_idx"][torch.randperm(64)]
    with pytest.raises(UnsupportedModelError, match="desc_act"):
        quant_formats.convert(cfg, "g_idx", perm)
    assert quant_formats.convert(cfg, "g_idx", layer.tensors["g_idx"]) == {}


def test_symmetric_gptq_with_foreign_zeros_is_refused() -> None:
    cfg, layer = _case("gptq-v1-sym-g32", 16, 64, seed=2)
    with pytest.raises(CheckpointError, match="sym"):
        quant_formats.convert(cfg, "qzeros", layer.tensors["qzeros"] + 1)


@pytest.mark.parametrize(("quant", "words"), [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
    ({"quant_method": "hqq"}, "'hqq'"),
    ("fp8", "mapping"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "3 bits"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format"),
    ({"quant_method": "gptq", "bits": 4, "lm_head": True}, "lm_head"),
    ({"quant_method": "awq", "bits": 2, "version": "gemm"}, "2 bits"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "'gemv'"),
    ({"quant_method": "awq", "bits": 4, "version": "gemm", "zero_point": False}, "zero_point"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "e5m2"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"},
     "activation_scheme"),
    ({"quant_method": "compressed-tensors", "format": "marlin-24",
      "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4}}}},
     "marlin-24"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "kv_cache_scheme": {"num_bits": 8},
      "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4}}}},
     "kv_cache_scheme"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"g": {"targets": ["re:.*mlp.*"], "weights": {"num_bits": 4}}}},
     "targets"),
    ({"quant_method": "compressed-tensors", "format": "int-quantized",
      "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8},
                              "input_activations": {"num_bits": 8, "type": "int"}}}},
     "activations"),
])
def test_unsupported_configs_are_refused_by_name(quant: object, words: str) -> None:
    with pytest.raises(UnsupportedModelError, match=words):
        quant_formats.parse(quant)


def test_parse_keeps_float_layers() -> None:
    awq = quant_formats.parse({**qc.QUANT_CONFIGS["awq-g32"],
                               "modules_to_not_convert": ["mlp.down", "layers.0.self_attn"]})
    assert awq.skips("lm_head") and awq.skips("model.layers.1.mlp.down_proj")  # substring
    assert awq.skips("model.layers.0.self_attn.o_proj")
    assert not awq.skips("model.layers.1.mlp.up_proj")
    assert not awq.skips("model.layers.10.self_attn.o_proj")  # "layers.0." is no prefix
    ct = quant_formats.parse({"quant_method": "compressed-tensors", "format": "float-quantized",
                              "ignore": ["lm_head", "re:.*layers\\.0\\..*"],
                              "config_groups": {"g": {"targets": ["Linear"], "weights": {
                                  "num_bits": 8, "type": "float", "strategy": "channel"}}}})
    assert ct.skips("lm_head") and ct.skips("model.layers.0.self_attn.q_proj")
    assert not ct.skips("model.layers.1.self_attn.q_proj")
    assert (ct.method, ct.activation_scheme) == ("fp8", "none")
    naive = quant_formats.parse({**ct.raw, "format": "naive-quantized"})  # older FP8 releases
    assert (naive.method, naive.source) == ("fp8", "compressed-tensors")


def test_unexpected_suffix_and_dtype_are_named() -> None:
    cfg = quant_formats.parse(qc.QUANT_CONFIGS["fp8-block"])
    with pytest.raises(CheckpointError, match="weight_scale'"):
        quant_formats.convert(cfg, "weight_scale", torch.ones(1, 1))
    with pytest.raises(CheckpointError, match="bfloat16"):
        quant_formats.convert(cfg, "weight", torch.ones(4, 4, dtype=torch.bfloat16))


@pytest.mark.parametrize(("side_file", "method"), [("quantize_config.json", "gptq"),
                                                   ("quant_config.json", "awq")])
def test_side_file_quantization_config(side_file: str, method: str, tmp_path) -> None:
    """AutoGPTQ / AutoAWQ settings beside config.json become its quantization_config."""
    import json

    from fuselm.loading.hf import load_hf_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    settings = {"bits": 4, "group_size": 128, "desc_act": False, "sym": True} \
        if method == "gptq" else {"w_bit": 4, "q_group_size": 64, "zero_point": True,
                                  "version": "GEMM"}
    (tmp_path / side_file).write_text(json.dumps(settings))
    quant = load_hf_config(tmp_path)["quantization_config"]
    cfg = quant_formats.parse(quant)
    assert (cfg.source, cfg.method) == (method, "int4")
    assert cfg.group_size == (128 if method == "gptq" else 64)


def test_word_bytes_by_shifts_equal_the_memory_view() -> None:
    """The byte-order-independent path (big-endian hosts) gives the little-endian view."""
    from fuselm.loading.quant_formats._packing import int32_bytes, int32_bytes_shifted

    words = torch.randint(-2**31, 2**31 - 1, (5, 7), dtype=torch.int32,
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(int32_bytes_shifted(words), int32_bytes(words))
