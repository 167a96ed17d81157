"""Architecture name -> model class, for the architectures ``config.SUPPORTED_ARCHITECTURES``
lists (the one list of what fuselm runs)."""

from __future__ import annotations

from torch import nn

from fuselm.config import SUPPORTED_ARCHITECTURES
from fuselm.errors import UnsupportedModelError


def get_model_class(architecture: str) -> type[nn.Module]:
    """The fuselm class that runs ``architecture`` (Hugging Face name)."""
    family = SUPPORTED_ARCHITECTURES.get(architecture)
    if family is None:
        raise UnsupportedModelError(
            f"unsupported architecture {architecture!r}; fuselm runs "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
    if family == "llama":
        from fuselm.models.llama import LlamaForCausalLM

        return LlamaForCausalLM
    raise UnsupportedModelError(f"no model class for the {family!r} family")
