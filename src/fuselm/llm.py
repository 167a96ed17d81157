"""The offline API: ``LLM(model=...).generate(prompts, params)`` and ``LLM.chat(messages)``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from fuselm.config import CONFIG_SECTIONS, EngineConfig
from fuselm.engine.engine import LLMEngine
from fuselm.outputs import RequestOutput
from fuselm.runtime import build_engine
from fuselm.sampling_params import SamplingParams


def engine_config_from_kwargs(model: str | None = None, **kwargs: Any) -> EngineConfig:
    """An EngineConfig from flat keyword arguments (vLLM-style names, e.g. ``block_size``)."""
    sections: dict[str, dict[str, Any]] = {name: {} for name in CONFIG_SECTIONS}
    top: dict[str, Any] = {}
    for key, value in kwargs.items():
        section = next((s for s, cls in CONFIG_SECTIONS.items()
                        if key in cls.__dataclass_fields__), None)
        if section is not None:
            sections[section][key] = value
        elif key in EngineConfig.__dataclass_fields__:
            top[key] = value
        else:
            raise TypeError(f"unknown engine argument {key!r}")
    return EngineConfig(model=model, **top,
                        **{s: CONFIG_SECTIONS[s](**v) for s, v in sections.items()})


class LLM:
    """Synchronous offline generation over the engine."""

    def __init__(self, model: str | None = None, config: EngineConfig | None = None,
                 **kwargs: Any) -> None:
        self.config = config or engine_config_from_kwargs(model, **kwargs)
        self.engine: LLMEngine = build_engine(self.config)
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self._ids = itertools.count()

    def generate(self, prompts: str | Sequence[str] | Sequence[list[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generates for every prompt (text or token ids); outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        per_prompt = params if isinstance(params, Sequence) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        ids = []
        for prompt, p in zip(prompts, per_prompt, strict=True):
            rid = f"offline-{next(self._ids)}"
            self.engine.add_request(rid, prompt, p)
            ids.append(rid)
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="Generating", unit=" req")
        while self.engine.has_unfinished_requests():
            for out in self.engine.step(stream=False):
                if out.finished:
                    finished[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [finished[rid] for rid in ids]

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """Applies the chat template (with the generation prompt) and generates."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True)
                   for c in conversations]
        return self.generate(prompts, sampling_params)
