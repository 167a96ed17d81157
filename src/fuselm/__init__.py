"""fuselm: a fast LLM inference engine and OpenAI-compatible server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fuselm.outputs import CompletionOutput, RequestOutput
from fuselm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from fuselm.llm import LLM

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    """``fuselm.LLM`` loads the engine on first use, so that importing the package (and the
    CLI's ``--help``) imports no kernel code."""
    if name == "LLM":
        from fuselm.llm import LLM

        return LLM
    raise AttributeError(f"module 'fuselm' has no attribute {name!r}")
