"""Architecture name -> model class."""

from __future__ import annotations

from torch import nn

from fuselm.errors import UnsupportedModelError


def get_model_class(architecture: str) -> type[nn.Module]:
    """The fuselm class that runs ``architecture`` (Hugging Face name)."""
    from fuselm.models.llama import LlamaForCausalLM

    classes = {
        "LlamaForCausalLM": LlamaForCausalLM,
        "MistralForCausalLM": LlamaForCausalLM,
        "Qwen2ForCausalLM": LlamaForCausalLM,
    }
    if architecture not in classes:
        raise UnsupportedModelError(
            f"unsupported architecture {architecture!r}; fuselm runs {', '.join(sorted(classes))}"
        )
    return classes[architecture]
