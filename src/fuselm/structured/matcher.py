"""One sequence's place in its grammar."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from fuselm.structured.compiler import import_xgrammar

if TYPE_CHECKING:
    from fuselm.structured.compiler import Grammar

logger = logging.getLogger(__name__)


class SequenceGrammar:
    """The grammar state of one sequence: ``advance`` feeds it the sequence's new tokens,
    ``needs_mask``/``xgr_matcher`` let a batch fill its next-token mask. Once the grammar
    has taken a stop token (or rejected a token), only stop tokens are allowed."""

    def __init__(self, grammar: Grammar) -> None:
        self.grammar = grammar
        self.xgr_matcher: Any = import_xgrammar().GrammarMatcher(grammar.compiled)
        self.num_accepted = 0
        """How many of the sequence's generated tokens the matcher has taken."""
        self.failed = False

    def advance(self, output_token_ids: list[int]) -> None:
        """Takes the tokens of ``output_token_ids`` (all the sequence's generated ids, in
        order) that it has not seen yet."""
        for token in output_token_ids[self.num_accepted:]:
            if not self.done and not self.xgr_matcher.accept_token(token):
                # only a token the mask did not allow can land here (e.g. forced by min_tokens
                # past a stop token): end the constraint with stop tokens rather than fail
                logger.warning("grammar rejected token %d; only stop tokens from here", token)
                self.failed = True
            self.num_accepted += 1

    @property
    def done(self) -> bool:
        """True once the grammar took a stop token or rejected a token."""
        return self.failed or self.xgr_matcher.is_terminated()

    @property
    def is_complete(self) -> bool:
        """True when the text so far is a whole sentence of the grammar."""
        return self.done or self.xgr_matcher.is_completed()

    def fill_stop_only(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the row that allows only the stop tokens."""
        bitmask[row].copy_(self.grammar.compiler.stop_only_row)
