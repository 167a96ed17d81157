"""Per-request sampling parameters, validated on construction."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fuselm.errors import InvalidRequestError

MAX_LOGPROBS = 20


@dataclass
class StructuredOutputsParams:
    """A constraint on the generated text, as vLLM's ``StructuredOutputsParams``: exactly one of
    ``json`` (a JSON schema), ``regex``, ``choice``, ``grammar`` (EBNF/GBNF or Lark) and
    ``json_object`` (any JSON object) is set."""

    json: str | dict[str, Any] | None = None
    """A JSON schema (a dict, or its JSON text) the output must satisfy."""
    regex: str | None = None
    """A regular expression the whole output must match."""
    choice: list[str] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """A context-free grammar: EBNF/GBNF (rules written ``name ::= ...``, start rule ``root``)
    or Lark (start rule ``start``)."""
    json_object: bool = False
    """Any JSON object (``response_format: {"type": "json_object"}``)."""
    disable_any_whitespace: bool = False
    """JSON without free whitespace between tokens."""

    def __post_init__(self) -> None:
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as exc:
                raise InvalidRequestError(f"the JSON schema is not valid JSON: {exc}",
                                          param="json") from None
        if self.json is not None and not isinstance(self.json, dict | bool):
            raise InvalidRequestError("a JSON schema must be an object", param="json")
        self.validate()

    def validate(self) -> None:
        """Raises InvalidRequestError unless exactly one well-formed constraint is set."""
        kinds = [name for name in ("json", "regex", "choice", "grammar")
                 if getattr(self, name) is not None]
        if self.json_object:
            kinds.append("json_object")
        if len(kinds) != 1:
            raise InvalidRequestError(
                "structured outputs take exactly one of json, regex, choice, grammar and "
                f"json_object; got {', '.join(kinds) or 'none'}", param="structured_outputs")
        if self.choice is not None and (
                not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidRequestError("choice must be a non-empty list of non-empty strings",
                                      param="choice")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise InvalidRequestError(f"{name} must be a non-empty string", param=name)

    @property
    def kind(self) -> str:
        """Which constraint is set: json, regex, choice, grammar or json_object."""
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "json_object"


@dataclass
class SamplingParams:
    """How to pick each new token and when to stop. Defaults match vLLM's."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    """Per prompt token after the first: its logprob given the tokens before it, plus the top
    ``prompt_logprobs`` ones (vLLM's; 0: the prompt token's alone)."""
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self.validate()

    def validate(self) -> None:
        """Raises InvalidRequestError naming the first out-of-range parameter."""
        checks = [
            (self.n >= 1, "n", "n must be at least 1"),
            (self.temperature >= 0.0, "temperature", "temperature must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p", "top_p must be in (0, 1]"),
            (self.top_k == -1 or self.top_k >= 1, "top_k", "top_k must be -1 (off) or >= 1"),
            (0.0 <= self.min_p <= 1.0, "min_p", "min_p must be in [0, 1]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
             "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
             "frequency_penalty must be in [-2, 2]"),
            (self.repetition_penalty > 0.0, "repetition_penalty",
             "repetition_penalty must be > 0"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
             "max_tokens must be at least 1"),
            (self.min_tokens >= 0, "min_tokens", "min_tokens must be >= 0"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
             f"logprobs must be between 0 and {MAX_LOGPROBS}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             "prompt_logprobs", f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop",
             "stop must be a list of non-empty strings"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidRequestError(message, param=param)

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        """True when a repetition, presence or frequency penalty reads the token history."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)
