"""Session-wide test setup: Triton's interpreter on CPU, the `gpu` marker, shared models."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips `gpu` tests where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _release_gpu_memory_after_module():
    """Engines that a module built (8B-shape GPU tests) are freed before the next module runs:
    their reference cycles would otherwise keep the card full for the rest of the session."""
    yield
    if torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def default_llm():
    """The default model (SmolLM2-135M-Instruct GGUF) on CPU, loaded once per session."""
    from fuselm import LLM

    return LLM(device="cpu", cpu_kv_cache_gib=0.25, max_model_len=2048)


@pytest.fixture(scope="session")
def default_gguf_path():
    """Path of the default model's GGUF file."""
    from fuselm.loading.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def hf_default_model(default_gguf_path):
    """transformers' model read from the same GGUF (float32), loaded once per session."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_gguf_path.parent), gguf_file=default_gguf_path.name,
        torch_dtype=torch.float32)
    return model.eval()
