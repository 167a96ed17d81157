"""Bad input raises typed fuselm errors with messages that say what to do."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fuselm import SamplingParams
from fuselm.errors import (
    ContextLengthError,
    EngineDeadError,
    InvalidRequestError,
    ModelNotFoundError,
    QueueFullError,
    UnsupportedModelError,
    UnsupportedQuantizationError,
)
from fuselm.loading.loader import resolve_model


def test_missing_model_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="Hugging Face directory"):
        resolve_model(str(tmp_path / "nope"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))


def test_unknown_architecture(tmp_path):
    from fuselm import LLM

    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        LLM(str(tmp_path), device="cpu")


def test_unknown_quantization_type():
    import torch

    from fuselm.loading.gguf import dequantize

    with pytest.raises(UnsupportedQuantizationError, match="Q8_0"):
        dequantize(torch.zeros(4, dtype=torch.uint8), "IQ2_XXS", (4,))


def test_prompt_longer_than_context(default_llm):
    too_long = [1] * (default_llm.engine.max_model_len + 1)
    with pytest.raises(ContextLengthError, match="shorten the prompt"):
        default_llm.generate([too_long], SamplingParams(max_tokens=1))
    assert not default_llm.engine.has_unfinished_requests()


def test_prompt_plus_max_tokens_over_context(default_llm):
    prompt = [1] * (default_llm.engine.max_model_len - 4)
    with pytest.raises(ContextLengthError, match="lower max_tokens"):
        default_llm.generate([prompt], SamplingParams(max_tokens=10))


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=0),
                                 dict(n=0), dict(max_tokens=0), dict(logprobs=100),
                                 dict(min_p=2), dict(presence_penalty=5),
                                 dict(repetition_penalty=0)])
def test_bad_sampling_params(bad):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**bad)
    assert info.value.param == next(iter(bad))


def test_bad_token_ids(default_llm):
    with pytest.raises(InvalidRequestError, match="token ids"):
        default_llm.generate([[10**9]], SamplingParams(max_tokens=1))


def test_cli_reports_missing_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fuselm", "generate", "hi", "--model",
                           str(tmp_path / "missing.gguf")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "error: model" in proc.stderr and "not found" in proc.stderr


@pytest.mark.parametrize("exc, status, code", [
    (ContextLengthError("too long", param="prompt"), 400, "context_length_exceeded"),
    (InvalidRequestError("bad", param="top_p"), 400, None),
    (ModelNotFoundError("no such model"), 404, "model_not_found"),
    (QueueFullError("full"), 429, "queue_full"),
    (EngineDeadError("dead"), 503, "engine_unavailable"),
])
def test_server_error_body(exc, status, code):
    pytest.importorskip("fastapi")
    from fuselm.server.serving import error_json

    body = error_json(exc)["error"]
    assert exc.status_code == status
    assert body == {"message": str(exc), "type": exc.error_type,
                    "param": getattr(exc, "param", None), "code": code}
