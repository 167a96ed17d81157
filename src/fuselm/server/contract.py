"""The request contract: which accepted fields fuselm ignores (where they cannot apply) and
which it refuses with a 400 naming them (not implemented). Fields in neither list are honoured;
fields in no schema at all are refused by the schemas themselves (`extra="forbid"`).

The schemas in `protocol.py` declare every field of OpenAI's completions and chat completions
references and vLLM's extensions, so that each is documented in /openapi.json and named in its
error; this module decides what a sent value means. The field table of the server README lists
the same decisions.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from fuselm.errors import InvalidRequestError

STRUCTURED_OUTPUT_FIELDS = ("functions", "function_call", "guided_whitespace_pattern")
"""Structured-output and tool fields fuselm does not implement: OpenAI's deprecated functions
(send `tools`) and a whitespace pattern (xgrammar has none; `structured_outputs` takes
`disable_any_whitespace`). The others are `fuselm.server.serving_structured`'s."""

NOT_IMPLEMENTED: dict[str, tuple[Any, ...]] = {
    # field -> values that ask for nothing (accepted); any other value is a 400
    "suffix": (None, ""),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "modalities": (None, ["text"]),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1.0),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "prompt_logprobs": (None,),
    "logits_processors": (None,),
    "return_tokens_as_token_ids": (None, False),
    "return_token_ids": (None, False),
    "spaces_between_special_tokens": (None, True),
    "cache_salt": (None,),
    "kv_transfer_params": (None,),
    "vllm_xargs": (None,),
    "mm_processor_kwargs": (None,),
    "prompt_embeds": (None,),
    "documents": (None,),
    "continue_final_message": (None, False),
    "chat_template": (None,),
    "priority": (None, 0),
}
"""Fields of OpenAI or vLLM that fuselm does not implement; a request that uses one gets a 400
naming it rather than an answer that silently lacks it."""

IGNORED = (
    "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
    "reasoning_effort", "verbosity",
)
"""Accepted and without effect: bookkeeping for OpenAI's platform (user, metadata, store, service
tier, cache key, safety id), or options of features this model or server does not have
(reasoning effort and verbosity of reasoning models)."""


def check_supported(req: BaseModel) -> None:
    """InvalidRequestError (400, `param` = the field) for a field that fuselm does not
    implement, sent with a value that asks for something."""
    sent = req.model_fields_set
    for name in STRUCTURED_OUTPUT_FIELDS:
        if name in sent and getattr(req, name, None) is not None:
            raise InvalidRequestError(
                f"{name} is not supported by fuselm", param=name)
    for name, harmless in NOT_IMPLEMENTED.items():
        if name in sent and getattr(req, name, None) not in harmless:
            message = f"{name} is not supported by fuselm"
            if name == "chat_template":
                message = ("a chat_template sent in a request is not accepted (as in vLLM "
                           "without --trust-request-chat-template); the model's own is used")
            raise InvalidRequestError(message, param=name)
