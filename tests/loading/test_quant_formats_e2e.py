"""End to end: a tiny Llama checkpoint quantized in each real format loads through
``fuselm.LLM`` and runs like the float checkpoint of the weights it encodes.

Weight-only formats (AWQ, GPTQ, compressed-tensors W4A16 / W8A16) multiply by exactly those
weights (their float LM head, which fuselm runs in int8, is written on its int8 grid): logits
match in float32 and greedy tokens are equal. FP8 W8A8 also quantizes each linear's input
(e4m3): the float twin then runs with every linear's input fake-quantized as the format's
activation scheme says (forward pre-hooks, written here from the scheme), and the logits must
agree far closer than they agree with the unquantized-activation twin.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import all_position_logits
from tests.loading import quant_checkpoints as qc
from tests.tiny_models import make_tiny_checkpoint

PROMPTS = [[256, 72, 101, 108, 108, 111, 44, 32, 119], [256, 84, 104, 101, 32, 113]]
FP8_MAX_RELATIVE_ERROR = 1e-3
"""||logits - twin logits|| / ||twin logits|| allowed for W8A8 e4m3 against the fake-quantized
twin (measured 0.0 on this CPU; against the unquantized twin 0.075-0.095)."""


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint("llama3-gqa-scaled", tmp_path_factory.mktemp("float"))


@pytest.fixture(scope="module")
def block_float_dir(tmp_path_factory) -> Path:
    return qc.make_block_checkpoint(tmp_path_factory.mktemp("float_block"))


def fake_quant_fp8(x: torch.Tensor, scheme: str) -> torch.Tensor:
    """``x [M, K]`` rounded through e4m3 as the activation scheme quantizes it: ``token``
    (scale max|row| / 448), ``group`` (per row and 128 columns), ``static`` (scale
    STATIC_INPUT_SCALE, saturating at +-448)."""
    xf = x.double()
    if scheme == "static":
        scale = torch.full((1, 1), STATIC_INPUT_SCALE, dtype=torch.float64)
    elif scheme == "group":
        m, k = xf.shape
        groups = xf.reshape(m, k // 128, 128)
        scale = (groups.abs().amax(-1, keepdim=True) / 448.0).clamp_min(1e-12)
        q = (groups / scale).clamp(-448, 448).to(torch.float8_e4m3fn).double() * scale
        return q.reshape(m, k).to(x.dtype)
    else:
        scale = (xf.abs().amax(1, keepdim=True) / 448.0).clamp_min(1e-12)
    return ((xf / scale).clamp(-448, 448).to(torch.float8_e4m3fn).double() * scale).to(x.dtype)


STATIC_INPUT_SCALE = 0.05  # quant_checkpoints' static input_scale
E2E_CASES = ("awq-g32", "gptq-v1-sym-g32", "gptq-v2-asym-perchannel", "ct-w4a16-g32-asym",
             "ct-w8a16-channel", "ct-fp8-channel-dynamic", "ct-fp8-tensor-static", "fp8-block",
             "fp8-tensor-static")
"""One checkpoint per format and path through the loader (every layout variant is checked
tensor by tensor in test_quant_formats.py; each case here builds two engines)."""


def _run(model: Path, act_scheme: str | None = None) -> dict[str, object]:
    """Logits of PROMPTS, greedy tokens and the quantization phrase of ``model``; with
    ``act_scheme``, also ``"fake_quant_logits"``: the logits with every decoder linear's input
    through ``fake_quant_fp8`` (the float LM head is left alone)."""
    from fuselm import LLM, SamplingParams

    llm = LLM(model=str(model), device="cpu", cpu_kv_cache_gib=0.01, max_model_len=64)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=6,
                                                ignore_eos=True))
    quant = llm.model_config.quantization
    run = {"logits": all_position_logits(llm.engine, PROMPTS),
           "tokens": [o.outputs[0].token_ids for o in outs],
           "described": quant.describe() if quant else ""}
    if act_scheme is not None:
        for name, module in llm.engine.runner.model.named_modules():
            if hasattr(module, "method") and "layers." in name:
                module.register_forward_pre_hook(
                    lambda _m, args: (fake_quant_fp8(args[0], act_scheme), *args[1:]))
        run["fake_quant_logits"] = all_position_logits(llm.engine, PROMPTS)
    return run


@pytest.mark.parametrize("case", E2E_CASES)
def test_quantized_checkpoint_runs_like_its_float_weights(case: str, request,
                                                          tmp_path: Path) -> None:
    if case.startswith("ct-"):
        pytest.importorskip("compressed_tensors")
    float_dir = request.getfixturevalue("block_float_dir" if "block" in case else "float_dir")
    torch.manual_seed(0)
    # int4/int8 checkpoints run their float LM head in int8 (QuantizationConfig.lm_head_bits)
    qc.write_quantized(case, float_dir, tmp_path / "quant", tmp_path / "dequant",
                       lm_head_on_int8_grid="fp8" not in case)
    got = _run(tmp_path / "quant")
    assert got["described"], "the quantized checkpoint must run a quantization method"
    if "fp8" in case:
        scheme = "group" if "block" in case else "static" if "static" in case else "token"
        twin = _run(tmp_path / "dequant", scheme)
        for ours, want, plain in zip(got["logits"], twin["fake_quant_logits"], twin["logits"],
                                     strict=True):
            error = float((ours - want).norm() / want.norm())
            unquantized = float((ours - plain).norm() / plain.norm())
            assert error < FP8_MAX_RELATIVE_ERROR, f"{case}: relative logit error {error:.4f}"
            assert error < unquantized / 5, f"{case}: {error:.4f} vs {unquantized:.4f}"
        return
    twin = _run(tmp_path / "dequant")
    for ours, want in zip(got["logits"], twin["logits"], strict=True):
        torch.testing.assert_close(ours, want, atol=2e-4, rtol=1e-4)
    assert got["tokens"] == twin["tokens"]
