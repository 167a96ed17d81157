"""A sequence's generated text: incremental detokenization, stop strings, streaming deltas.

While a stop string could still be completing, the last ``max(len(stop)) - 1`` characters are
held back from the stream, so no part of a stop string is ever sent.
"""

from __future__ import annotations

from fuselm.sampling_params import SamplingParams
from fuselm.tokenizer import Tokenizer


class SequenceText:
    """Text of one sequence and how much of it has been streamed."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int],
                 params: SamplingParams) -> None:
        self.detokenizer = tokenizer.incremental_detokenizer(prompt_ids,
                                                             params.skip_special_tokens)
        self.stop_strings = list(params.stop)
        self.include_stop = params.include_stop_str_in_output
        self.holdback = max((len(s) for s in self.stop_strings), default=1) - 1
        self.text = ""
        self.detokenize = params.detokenize
        self.stopped = False
        self._emitted_chars = 0
        self._emitted_tokens = 0

    def append(self, token_id: int, finished: bool) -> str | None:
        """Adds a token's text; returns the stop string it completed, if any."""
        if self.stopped or not self.detokenize:
            return None
        new = self.detokenizer.step(token_id)
        if finished:
            new += self.detokenizer.flush()
        if not new or not self.stop_strings:
            self.text += new
            return None
        search_from = max(0, len(self.text) - self.holdback)
        self.text += new
        hits = [(self.text.find(s, search_from), s) for s in self.stop_strings]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return None
        index, stop = min(hits)
        self.text = self.text[: index + (len(stop) if self.include_stop else 0)]
        self.stopped = True
        return stop

    def visible_text(self, finished: bool) -> str:
        """The text that may be shown now (all of it once finished)."""
        if finished or self.stopped or not self.holdback:
            return self.text
        return self.text[: max(len(self.text) - self.holdback, self._emitted_chars)]

    def take_delta(self, finished: bool, num_tokens: int) -> tuple[str, int]:
        """Text added since the last call, and the index of the first token not yet reported."""
        visible = self.visible_text(finished)
        delta = visible[self._emitted_chars :]
        self._emitted_chars = len(visible)
        start, self._emitted_tokens = self._emitted_tokens, num_tokens
        return delta, start
