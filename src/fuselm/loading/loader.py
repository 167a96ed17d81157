"""Resolving ``--model`` to a checkpoint, and building the model with its weights on a device."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fuselm.config import EngineConfig, ModelConfig
from fuselm.errors import ModelNotFoundError, UnsupportedModelError
from fuselm.kernels.kernel_set import KernelSet
from fuselm.loading import hf


@dataclass(frozen=True)
class ModelSource:
    """Where a model's config, weights and tokenizer come from."""

    path: Path
    format: str  # "hf" or "gguf"


def resolve_model(model: str | None) -> ModelSource:
    """Maps ``--model`` (None = default model, a HF directory or a .gguf file) to its source."""
    if model is None:
        from fuselm.loading.default_model import default_model_path

        return ModelSource(default_model_path(), "gguf")
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {model!r} not found: pass a local Hugging Face directory (config.json + "
            "*.safetensors + tokenizer.json) or a .gguf file, or omit --model for the default"
        )
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path, "gguf")
    if hf.is_hf_dir(path):
        return ModelSource(path, "hf")
    raise ModelNotFoundError(
        f"{model!r} is neither a .gguf file nor a directory with config.json"
    )


def load_config_dict(source: ModelSource) -> dict[str, Any]:
    """The Hugging Face style config dict of the source."""
    if source.format == "gguf":
        from fuselm.loading.gguf import load_gguf

        return dict(load_gguf(source.path).config)
    return hf.load_hf_config(source.path)


def iterate_weights(source: ModelSource) -> Iterable[tuple[str, Any]]:
    """(HF parameter name, tensor or lazy slice) pairs of the checkpoint."""
    if source.format == "gguf":
        from fuselm.loading.gguf import load_gguf

        return load_gguf(source.path).tensors(dequantize=True)
    return hf.iterate_hf_weights(source.path)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto -> bfloat16 on CUDA, float32 elsewhere; else the named dtype."""
    names = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto, {', '.join(names)}")
    return names[dtype]


def resolve_device(device: str) -> torch.device:
    """auto -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def build_model(model_config: ModelConfig, max_position: int, dtype: torch.dtype,
                device: torch.device, layer_partition: list[int] | None = None,
                kernels: KernelSet | None = None) -> nn.Module:
    """Instantiates the architecture's class with empty weights in ``dtype`` on ``device``,
    its layers using ``kernels`` (default: the reference kernels)."""
    from fuselm.models.registry import get_model_class

    cls = get_model_class(model_config.architecture)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(model_config, max_position=max_position,
                        layer_partition=layer_partition, kernels=kernels)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def load_weights(model: nn.Module, source: ModelSource, progress: bool = False) -> None:
    """Loads the checkpoint's weights; raises if a parameter stays unloaded."""
    weights = iterate_weights(source)
    if progress:
        from tqdm import tqdm

        weights = tqdm(weights, desc=f"Loading {source.path.name}", unit=" tensors",
                       leave=False)
    loaded = model.load_weights(weights)
    missing = model.expected_parameters() - loaded
    if missing:
        raise UnsupportedModelError(
            f"checkpoint {source.path} lacks {len(missing)} parameters, e.g. "
            f"{sorted(missing)[:3]}"
        )


def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights of a sensible scale (benchmarks and tests without a checkpoint)."""
    for i, (name, param) in enumerate(model.named_parameters()):
        gen = torch.Generator(device=param.device).manual_seed(seed * 100003 + i)
        if "norm" in name:
            param.data.uniform_(0.9, 1.1, generator=gen)
        else:
            param.data.normal_(0.0, 0.02, generator=gen)


def load_model_config(config: EngineConfig) -> tuple[ModelSource, ModelConfig]:
    """The source and ModelConfig of ``config.model`` (with hf_overrides applied)."""
    source = resolve_model(config.model)
    cfg = load_config_dict(source)
    cfg.update(config.hf_overrides)
    return source, ModelConfig.from_hf_dict(cfg)
