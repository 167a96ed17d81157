"""QuantizationConfig: the online schemes, parsing a checkpoint's quantization_config, and
refusals by name (unknown quant_method, a checkpoint quantized twice)."""

from __future__ import annotations

import json

import pytest

from fuselm.config import ModelConfig
from fuselm.errors import ConfigError, UnsupportedModelError
from fuselm.layers.quantization.config import QuantizationConfig

LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 256,
         "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4}


def test_online_schemes() -> None:
    int4, int8, fp8 = (QuantizationConfig.online(n) for n in ("int4", "int8", "fp8"))
    assert (int4.method, int4.group_size, int4.zero_point, int4.lm_head_bits) == \
        ("int4", 128, True, 8)
    assert (int8.method, int8.group_size, int8.lm_head_bits) == ("int8", None, 8)
    assert (fp8.method, fp8.activation_scheme, fp8.lm_head_bits) == ("fp8", "dynamic", None)
    assert int4.describe() == "int4 g128 asym lm_head int8 (online)"
    with pytest.raises(ValueError, match="--quantization"):
        QuantizationConfig.online("int3")


def test_invalid_fields_are_named() -> None:
    with pytest.raises(ValueError, match="group_size"):
        QuantizationConfig("int4", bits=4, group_size=7)
    with pytest.raises(ValueError, match="bits"):
        QuantizationConfig("int4", bits=8)
    with pytest.raises(UnsupportedModelError, match="weight_block_size"):
        QuantizationConfig("fp8", weight_block=(64, 64))


@pytest.mark.parametrize(("quant", "want"), [
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"},
     ("fp8", "fp8", (128, 128), "dynamic")),
    ({"quant_method": "fp8", "activation_scheme": "static"}, ("fp8", "fp8", None, "static")),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
      "version": "gemm"}, ("int4", "awq", None, "none")),
    ({"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True, "desc_act": False},
     ("int4", "gptq", None, "none")),
])
def test_from_hf(quant, want) -> None:
    q = QuantizationConfig.from_hf(quant)
    assert (q.method, q.source, q.weight_block, q.activation_scheme) == want
    assert q.raw == quant


def test_from_hf_int_groups() -> None:
    gptq = QuantizationConfig.from_hf({"quant_method": "gptq", "bits": 4, "group_size": 64,
                                       "sym": True})
    assert (gptq.group_size, gptq.zero_point, gptq.lm_head_bits) == (64, False, 8)
    awq = QuantizationConfig.from_hf({"quant_method": "awq", "bits": 4, "group_size": -1})
    assert (awq.group_size, awq.zero_point) == (None, True)


def test_compressed_tensors_schemes() -> None:
    def ct(weights, acts=None):
        return {"quant_method": "compressed-tensors", "format": "pack-quantized",
                "ignore": ["lm_head"], "config_groups": {"group_0": {
                    "targets": ["Linear"], "weights": weights, "input_activations": acts}}}

    w4 = QuantizationConfig.from_hf(ct({"num_bits": 4, "type": "int", "strategy": "group",
                                        "group_size": 128, "symmetric": True}))
    assert (w4.method, w4.group_size, w4.zero_point, w4.ignore) == \
        ("int4", 128, False, ("lm_head",))
    assert w4.skips("lm_head") and not w4.skips("model.layers.0.mlp.down_proj")
    fp8 = QuantizationConfig.from_hf(ct(
        {"num_bits": 8, "type": "float", "strategy": "channel"},
        {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}))
    assert (fp8.method, fp8.activation_scheme) == ("fp8", "dynamic")
    with pytest.raises(UnsupportedModelError, match="int8 activations"):
        QuantizationConfig.from_hf(ct({"num_bits": 8, "type": "int", "strategy": "channel"},
                                      {"num_bits": 8, "type": "int"}))


@pytest.mark.parametrize("method", ["bitsandbytes", "hqq", "exl2"])
def test_unknown_quant_method_is_refused_by_name(method) -> None:
    with pytest.raises(UnsupportedModelError, match=f"quant_method '{method}'"):
        QuantizationConfig.from_hf({"quant_method": method})
    mc = ModelConfig.from_hf_dict({**LLAMA, "quantization_config": {"quant_method": method}})
    with pytest.raises(UnsupportedModelError, match=f"'{method}'"):
        _with_quantization(mc)


def _with_quantization(mc: ModelConfig, quantization: str | None = None) -> ModelConfig:
    from fuselm.engine.builder import with_quantization
    from fuselm.llm import engine_config_from_kwargs

    return with_quantization(engine_config_from_kwargs("x", quantization=quantization), mc)


def test_the_builder_parses_the_checkpoint_quantization() -> None:
    quant = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    mc = ModelConfig.from_hf_dict({**LLAMA, "quantization_config": quant})
    assert mc.quantization_config == quant and mc.quantization is None
    parsed = _with_quantization(mc).quantization
    assert parsed is not None and (parsed.method, parsed.source) == ("fp8", "fp8")
    assert _with_quantization(ModelConfig.from_hf_dict(LLAMA)).quantization is None


def test_checkpoint_with_unknown_quantization_config_is_refused(tmp_path) -> None:
    """A whole checkpoint directory: the engine refuses it before loading, naming the method."""
    from fuselm import LLM
    from tests.layers.quantization.quant_models import make_quant_checkpoint

    path = make_quant_checkpoint(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="'bitsandbytes'"):
        LLM(str(path), device="cpu", dtype="float32", max_model_len=32)


def test_online_quantization_of_a_quantized_checkpoint_is_refused() -> None:
    mc = ModelConfig.from_hf_dict({**LLAMA, "quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(ConfigError, match="--quantization int4: the checkpoint is quantized"):
        _with_quantization(mc, "int4")
    online = _with_quantization(ModelConfig.from_hf_dict(LLAMA), "int4")
    assert online.quantization == QuantizationConfig.online("int4")
