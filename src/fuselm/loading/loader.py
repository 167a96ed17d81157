"""Resolving ``--model`` to a checkpoint, and building the model with its weights on a device."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fuselm.config import EngineConfig, ModelConfig, check_load_format
from fuselm.errors import ConfigError, ModelNotFoundError, UnsupportedModelError
from fuselm.kernels.kernel_set import KernelSet
from fuselm.loading import hf, hub

if TYPE_CHECKING:
    from fuselm.loading.gguf import GGUFCheckpoint


@dataclass(frozen=True)
class ModelSource:
    """Where a model's config, weights and tokenizer come from.

    ``gguf``: the parsed GGUF file (format "gguf"), shared by config, tokenizer and weights so
    that the file is parsed once. ``tokenizer_path``: a separate tokenizer (``--tokenizer``: a
    HF folder or a .gguf file); None uses the checkpoint's own.
    """

    path: Path
    format: str  # "hf" or "gguf"
    gguf: GGUFCheckpoint | None = field(default=None, compare=False, repr=False)
    tokenizer_path: Path | None = None

    @property
    def name(self) -> str:
        """A short name for logs: the file's stem or the folder's name."""
        return self.path.stem if self.format == "gguf" else self.path.name


def _local_path(name: str, revision: str | None, download_dir: str | None,
                patterns: tuple[str, ...] = hub.MODEL_PATTERNS) -> Path:
    """A local path, or the snapshot folder of a Hub id ``ORG/NAME``."""
    if hub.is_hub_id(name):
        return hub.snapshot_path(name, revision, download_dir, patterns)
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {name!r} not found: pass a local Hugging Face directory (config.json + "
            "*.safetensors + tokenizer.json), a .gguf file, a Hub id ORG/NAME, or omit --model "
            "for the default")
    return path


def _gguf_source(path: Path, tokenizer_path: Path | None = None) -> ModelSource:
    from fuselm.loading.gguf import load_gguf

    return ModelSource(path, "gguf", load_gguf(path), tokenizer_path)


def resolve_model(model: str | None, revision: str | None = None,
                  download_dir: str | None = None, tokenizer: str | None = None) -> ModelSource:
    """Maps ``--model`` (None = default model, a HF directory, a .gguf file or a Hub id
    ``ORG/NAME`` at ``revision``, downloaded into ``download_dir``) and ``--tokenizer`` to a
    source. A GGUF file is parsed here (once); a truncated or corrupt one raises CheckpointError.
    ``revision`` or ``download_dir`` without a Hub id raise ConfigError (they would do nothing).
    """
    hub_ids = [name for name in (model, tokenizer) if name and hub.is_hub_id(name)]
    for flag, value in (("--revision", revision), ("--download-dir", download_dir)):
        if value is not None and not hub_ids:
            raise ConfigError(f"{flag} {value} applies to Hugging Face Hub ids (--model "
                              f"ORG/NAME), but the model is {model or 'the default model'!r}, "
                              "a local path")
    tok = _local_path(tokenizer, revision, download_dir, hub.TOKENIZER_PATTERNS) \
        if tokenizer else None
    if model is None:
        from fuselm.loading.default_model import default_model_path

        return _gguf_source(default_model_path(), tok)
    path = _local_path(model, revision, download_dir)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_source(path, tok)
    if hf.is_hf_dir(path):
        return ModelSource(path, "hf", tokenizer_path=tok)
    raise ModelNotFoundError(
        f"{model!r} is neither a .gguf file nor a directory with config.json"
    )


def load_config_dict(source: ModelSource) -> dict[str, Any]:
    """The Hugging Face style config dict of the source."""
    if source.gguf is not None:
        return dict(source.gguf.config)
    return hf.load_hf_config(source.path)


def check_checkpoint(source: ModelSource) -> int:
    """Reads every weight file's header (no tensor data) and returns the number of tensors;
    a truncated, corrupt or missing file raises CheckpointError naming it."""
    if source.gguf is not None:
        return source.gguf.num_tensors  # checked when parsed
    return hf.check_hf_weights(source.path)


def iterate_weights(source: ModelSource, packed_linear: bool = False, raw_tables: bool = False
                    ) -> Iterable[tuple[str, Any]]:
    """(HF parameter name, tensor or lazy slice) pairs of the checkpoint; ``packed_linear``: a
    GGUF's linear weights stay packed blocks (``<module>.qweight``); ``raw_tables``: so do its
    vocabulary tables (the embedding's loader takes them)."""
    if source.gguf is not None:
        return source.gguf.tensors(dequantize=True, packed_linear=packed_linear,
                                   raw_tables=raw_tables)
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
    quant = model.config.quantization
    weights = iterate_weights(source, packed_linear=quant is not None and quant.method == "gguf",
                              raw_tables=True)
    if progress:
        from tqdm import tqdm

        weights = tqdm(weights, desc=f"Loading {source.path.name}", unit=" tensors",
                       total=check_checkpoint(source), leave=False)
    loaded = model.load_weights(_trimming_heap(weights, source.path.suffix == ".gguf"))
    missing = model.expected_parameters() - loaded
    if missing:
        raise UnsupportedModelError(
            f"checkpoint {source.path} lacks {len(missing)} parameters, e.g. "
            f"{sorted(missing)[:3]}"
        )


def release_freed_heap() -> None:
    """Returns the heap pages that freed temporaries left to the OS (glibc keeps them
    resident otherwise: ~0.1 GB after the default model's dequantization); a no-op elsewhere."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass  # not glibc


def _trimming_heap(weights: Iterable[tuple[str, Any]], dequantizing: bool,
                   every: int = 16) -> Iterable[tuple[str, Any]]:
    """The weights, with the heap trimmed every ``every`` tensors while a GGUF file is
    dequantized on the host (its temporaries would otherwise raise the peak resident memory
    of the default model's load by ~30 MB)."""
    for i, item in enumerate(weights):
        yield item
        if dequantizing and i % every == every - 1:
            release_freed_heap()
    if dequantizing:
        release_freed_heap()


def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights of a sensible scale (benchmarks and tests without a checkpoint)."""
    for i, (name, param) in enumerate(model.named_parameters()):
        gen = torch.Generator(device=param.device).manual_seed(seed * 100003 + i)
        if "norm" in name:
            param.data.uniform_(0.9, 1.1, generator=gen)
        else:
            param.data.normal_(0.0, 0.02, generator=gen)


def load_model_config(config: EngineConfig) -> tuple[ModelSource, ModelConfig]:
    """The source and ModelConfig of ``config.model`` (with hf_overrides applied); every
    weight file's header is checked, so a bad file fails before the engine starts."""
    source = resolve_model(config.model, config.revision, config.download_dir, config.tokenizer)
    cfg = load_config_dict(source)
    cfg.update(config.hf_overrides)
    model_config = ModelConfig.from_hf_dict(cfg)
    check_load_format(config.load_format, source.format, str(source.path))
    if config.load_format != "dummy":
        check_checkpoint(source)
    return source, model_config
