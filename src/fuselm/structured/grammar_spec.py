"""Turns the constraints xgrammar has no direct compiler for into one it has: a choice into
EBNF; tells a Lark grammar from an EBNF/GBNF one (vLLM's ``guided_grammar`` takes both)."""

from __future__ import annotations

import json
import re

_EBNF_RULE = re.compile(r"^\s*[A-Za-z_][\w.-]*\s*::=", re.MULTILINE)


def choice_ebnf(choices: list[str]) -> str:
    """An EBNF grammar whose only sentences are ``choices``, each written as a JSON string
    literal (xgrammar's EBNF takes the same escapes)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def grammar_is_lark(grammar: str) -> bool:
    """True for Lark (``rule: ...``), False for EBNF/GBNF (``rule ::= ...``)."""
    return _EBNF_RULE.search(grammar) is None
