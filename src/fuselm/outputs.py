"""What the engine returns for a request: per-sequence completions and the request's state."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One generated sequence of a request (index < n)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    """None while running; ``stop``, ``length`` or ``abort`` once finished."""
    stop_reason: int | str | None = None
    """The stop string or token id that ended it, if any."""
    logprobs: list[dict[int, float]] | None = None
    """Per generated token: {token id: logprob} for the sampled token and the top ones."""
    text_delta: str = ""
    """Text added since the previous output of this request (streaming)."""
    token_ids_delta: list[int] = field(default_factory=list)
    """Token ids added since the previous output of this request (streaming)."""


@dataclass
class RequestOutput:
    """State of one request after an engine step."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache."""
    metrics: dict[str, float] = field(default_factory=dict)
    """arrival_time, first_token_time, finished_time (time.monotonic seconds)."""
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """With ``SamplingParams.prompt_logprobs``: per prompt token, {token id: logprob} of the
    token itself and the top ones, given the tokens before it (the first token: None)."""
