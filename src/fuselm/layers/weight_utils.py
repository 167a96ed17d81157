"""Loading a parameter's shard from a full checkpoint tensor without materialising all of it."""

from __future__ import annotations

from typing import Any

import torch


def tensor_shape(loaded: Any) -> tuple[int, ...]:
    """Shape of a checkpoint tensor or a lazy slice (safetensors ``get_slice``)."""
    if isinstance(loaded, torch.Tensor):
        return tuple(loaded.shape)
    return tuple(loaded.get_shape())


def narrow(loaded: Any, dim: int, start: int, length: int) -> torch.Tensor:
    """Rows ``[start, start + length)`` along ``dim`` of a tensor or lazy slice, as a tensor."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, length)
    index = [slice(None)] * len(tensor_shape(loaded))
    index[dim] = slice(start, start + length)
    return loaded[tuple(index)]


def materialize(loaded: Any) -> torch.Tensor:
    """The whole tensor (a lazy slice is read fully)."""
    return loaded if isinstance(loaded, torch.Tensor) else loaded[...]  # [:] fails on 0-d


def copy_checked(param: torch.Tensor, loaded: torch.Tensor, name: str = "") -> None:
    """Copies ``loaded`` into ``param`` after checking the shapes agree."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(
            f"checkpoint tensor {name} has shape {tuple(loaded.shape)}, "
            f"expected {tuple(param.shape)}"
        )
    param.data.copy_(loaded)


def default_weight_loader(param: torch.nn.Parameter, loaded: Any) -> None:
    """Loads a replicated parameter from the full tensor."""
    copy_checked(param, materialize(loaded))
