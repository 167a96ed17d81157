"""fuselm: a fast LLM inference engine and OpenAI-compatible server."""

from fuselm.llm import LLM
from fuselm.outputs import CompletionOutput, RequestOutput
from fuselm.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "__version__"]
