"""The per-step token bitmask of a batch mixing constrained and free sequences.

Row ``i`` of the int32 bitmask ``[num_rows, ceil(vocab_size / 32)]`` is sequence ``i``'s:
bit ``j`` of word ``w`` set means token ``32 * w + j`` may be sampled. Free rows are all ones.
"""

from __future__ import annotations

from typing import Any

import torch

from fuselm.structured.compiler import GrammarCompiler, bitmask_width
from fuselm.structured.matcher import SequenceGrammar


def fill_token_bitmask(grammars: list[SequenceGrammar | None], histories: list[list[int]],
                       vocab_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Advances each row's grammar by its sequence's new tokens (``histories[i]``: the
    generated ids) and returns the bitmask of the tokens allowed next, on the CPU (into
    ``out[:num_rows]`` when given, e.g. a pinned buffer)."""
    if len(grammars) != len(histories):
        raise ValueError("one token history per grammar row")
    width = bitmask_width(vocab_size)
    if out is None:
        bitmask = torch.empty(len(grammars), width, dtype=torch.int32)
    else:
        bitmask = out[: len(grammars)]
        if bitmask.shape != (len(grammars), width) or bitmask.dtype != torch.int32:
            raise ValueError(f"bitmask buffer must be int32 [>= {len(grammars)}, {width}]")
    # one batched (multi-threaded) fill per compiler (an engine has one); it writes whole
    # rows, so only the free rows are set here, one small fill each: a fill of the whole
    # bitmask is large enough for torch's OpenMP pool, whose threads then spin for a while
    # on the cores the grammar fill needs (it doubled the fill on 2 cores, 4.3x on 16)
    by_compiler: dict[GrammarCompiler, tuple[list[Any], list[int]]] = {}
    for row, (grammar, history) in enumerate(zip(grammars, histories, strict=True)):
        if grammar is None:
            bitmask[row].fill_(-1)
            continue
        grammar.advance(history)
        if grammar.done:
            grammar.fill_stop_only(bitmask, row)
            continue
        matchers, rows = by_compiler.setdefault(grammar.grammar.compiler, ([], []))
        matchers.append(grammar.xgr_matcher)
        rows.append(row)
    for compiler, (matchers, rows) in by_compiler.items():
        compiler.fill_batch(matchers, bitmask, rows)
    return bitmask
