"""The builder's choice of online quantization scheme and of packed GGUF, before loading."""

from __future__ import annotations

import pytest

from fuselm.config import EngineConfig, ModelConfig
from fuselm.engine.builder import _int4_group, with_quantization
from fuselm.errors import ConfigError


def _model(hidden: int, heads: int, head_dim: int, mlp: int) -> ModelConfig:
    return ModelConfig.from_hf_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": hidden,
        "intermediate_size": mlp, "num_hidden_layers": 2, "num_attention_heads": heads,
        "num_key_value_heads": heads, "head_dim": head_dim, "max_position_embeddings": 256})


@pytest.mark.parametrize(("dims", "tp", "group"), [
    ((4096, 32, 128, 14336), 1, 128),   # Llama-3-8B
    ((4096, 32, 128, 14336), 2, 128),
    ((576, 9, 64, 1536), 1, 64),        # SmolLM2-135M: 576 = 4.5 x 128
    ((96, 3, 32, 288), 1, 32),
])
def test_int4_group_is_128_where_it_divides_every_width(dims, tp, group):
    assert _int4_group(_model(*dims), tp, 128) == group


def test_int4_without_any_group_is_refused_by_flag():
    with pytest.raises(ConfigError, match="--quantization int4"):
        _int4_group(_model(40, 5, 8, 100), 1, 128)


def test_online_int4_takes_the_group_that_fits():
    quant = with_quantization(EngineConfig(quantization="int4"),
                              _model(576, 9, 64, 1536)).quantization
    assert (quant.method, quant.group_size) == ("int4", 64)


def test_gguf_packing_of_a_float_checkpoint_is_refused_by_flag(tmp_path):
    from fuselm.loading.loader import ModelSource

    source = ModelSource(tmp_path, "hf")
    with pytest.raises(ConfigError, match="--quantization gguf applies to .gguf models"):
        with_quantization(EngineConfig(quantization="gguf"), _model(576, 9, 64, 1536), source)
