"""GPTQ-rounded fp8 weights (``layers/quantization/gptq.py``, ``engine/calibration.py``).

The rounding is checked against its own objective computed here in float64 (the layer's output
error on the inputs the Hessian came from) and against plain round-to-nearest e4m3 written
here; the engine path on a tiny random Llama (CPU) against the float model and plain fp8.
"""

from __future__ import annotations

import pytest
import torch

from fuselm import LLM
from fuselm.config import EngineConfig, check_implemented
from fuselm.errors import ConfigError
from fuselm.layers.linear import LinearBase
from fuselm.layers.quantization.gptq import gptq_fp8_per_channel
from tests.helpers import all_position_logits
from tests.layers.quantization.quant_models import make_quant_checkpoint
from tests.layers.quantization.test_quant_model import PROMPTS


def _round_to_nearest(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.double().abs().amax(dim=1) / 448.0
    q = (w.double() / scale[:, None]).to(torch.float8_e4m3fn)
    return q, scale


def _output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor,
                  scale: torch.Tensor) -> float:
    deq = q.double() * scale.double()[:, None]
    return float((x.double() @ (w.double() - deq).T).square().sum())


def _correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(n, k, generator=g) @ mix
    return x * (1 + 4 * torch.rand(k, generator=g))  # uneven column scales, as activations


@pytest.mark.parametrize("shape", [(48, 256), (37, 200)])
def test_gptq_beats_round_to_nearest_on_its_inputs(shape) -> None:
    n, k = shape
    x = _correlated_inputs(4 * k, k, seed=n)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(k)) * 0.05
    q, scale = gptq_fp8_per_channel(w, x.T @ x / x.shape[0])
    assert q.dtype == torch.float8_e4m3fn and q.shape == (n, k)
    assert scale.dtype == torch.float32
    torch.testing.assert_close(scale.double(), w.double().abs().amax(dim=1) / 448.0,
                               rtol=1e-6, atol=0)
    q_rtn, s_rtn = _round_to_nearest(w)
    gptq_err, rtn_err = _output_error(x, w, q, scale), _output_error(x, w, q_rtn, s_rtn)
    assert gptq_err < 0.8 * rtn_err, (gptq_err, rtn_err)


def test_gptq_with_uncorrelated_inputs_rounds_to_nearest() -> None:
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(3))
    q, scale = gptq_fp8_per_channel(w, torch.eye(128) * 2.5)
    q_rtn, s_rtn = _round_to_nearest(w)
    assert torch.equal(q.view(torch.uint8), q_rtn.view(torch.uint8))


def test_gptq_refuses_a_hessian_of_another_width() -> None:
    with pytest.raises(ValueError, match="Hessian"):
        gptq_fp8_per_channel(torch.randn(4, 16), torch.eye(8))


def test_calibration_flag_is_checked() -> None:
    with pytest.raises(ConfigError, match="--quantization-calibration"):
        EngineConfig(quantization="int4", quantization_calibration="gptq")
    with pytest.raises(ConfigError, match="--quantization-calibration"):
        EngineConfig(quantization_calibration="gptq")
    with pytest.raises(ConfigError, match="--quantization-calibration"):
        EngineConfig(quantization="fp8", quantization_calibration="awq")  # type: ignore[arg-type]
    from fuselm.config import ParallelConfig

    parallel = EngineConfig(quantization="fp8", quantization_calibration="gptq",
                            parallel=ParallelConfig(tensor_parallel_size=2))
    with pytest.raises(ConfigError, match="--quantization-calibration"):
        check_implemented(parallel)


def _llm(path, **kwargs) -> LLM:
    return LLM(str(path), device="cpu", dtype="float32", max_num_seqs=4, max_model_len=64,
               block_size=8, **kwargs)


def test_gptq_fp8_engine(tmp_path) -> None:
    path = make_quant_checkpoint(tmp_path / "m")
    float_llm = _llm(path)
    floats = {name: m.weight.data.clone() for name, m in
              float_llm.engine.runner.model.named_modules() if isinstance(m, LinearBase)
              and not name.endswith("lm_head")}
    want = all_position_logits(float_llm.engine, PROMPTS)
    float_llm.engine.shutdown()
    plain = _llm(path, quantization="fp8")
    plain_weights = {name: m.weight.data.clone() for name, m in
                     plain.engine.runner.model.named_modules() if name in floats}
    plain_logits = all_position_logits(plain.engine, PROMPTS)
    plain.engine.shutdown()
    llm = _llm(path, quantization="fp8", quantization_calibration="gptq")
    assert "gptq" in llm.engine.model_config.quantization.describe()
    layers = {n: m for n, m in llm.engine.runner.model.named_modules() if n in floats}
    assert len(layers) == len(floats) == 8
    changed = 0
    for name, layer in layers.items():
        assert layer.weight.dtype == torch.float8_e4m3fn
        torch.testing.assert_close(layer.weight_scale.double(),
                                   floats[name].double().abs().amax(dim=1) / 448.0,
                                   rtol=1e-6, atol=0)
        changed += not torch.equal(layer.weight.view(torch.uint8),
                                   plain_weights[name].view(torch.uint8))
    assert changed == len(layers)  # every layer rounded otherwise than to nearest
    got = all_position_logits(llm.engine, PROMPTS)
    for g, w, p in zip(got, want, plain_logits, strict=True):
        rel = float((g - w).norm() / w.norm())
        assert 0 < rel < 0.3, rel  # the bound of plain fp8's end-to-end test
        assert torch.isfinite(g).all() and not torch.equal(g, p)


@pytest.mark.gpu
def test_gptq_fp8_engine_on_cuda(tmp_path) -> None:
    """On a GPU the calibration engine runs eager (hooks see every step), the quantized one
    captures graphs, and the GPTQ weights stay on their per-channel amax scales."""
    path = make_quant_checkpoint(tmp_path / "m")
    kwargs = dict(device="cuda", dtype="bfloat16", max_num_seqs=4, max_model_len=64,
                  block_size=16, num_gpu_blocks=64)
    float_llm = LLM(str(path), **kwargs)
    floats = {name: m.weight.data.float().clone() for name, m in
              float_llm.engine.runner.model.named_modules() if isinstance(m, LinearBase)
              and not name.endswith("lm_head")}
    want = all_position_logits(float_llm.engine, PROMPTS)
    float_llm.engine.shutdown()
    llm = LLM(str(path), quantization="fp8", quantization_calibration="gptq", **kwargs)
    for name, layer in llm.engine.runner.model.named_modules():
        if name in floats:
            torch.testing.assert_close(layer.weight_scale.double().cpu(),
                                       floats[name].double().abs().amax(dim=1).cpu() / 448.0,
                                       rtol=1e-6, atol=0)
    got = all_position_logits(llm.engine, PROMPTS)
    for g, w in zip(got, want, strict=True):
        assert 0 < float((g.float() - w.float()).norm() / w.float().norm()) < 0.3
