"""Structured outputs: JSON schemas, regexes, choices and grammars compiled into per-sequence
matchers whose token bitmasks constrain sampling (see README.md)."""

from fuselm.structured.bitmask import fill_token_bitmask
from fuselm.structured.compiler import GrammarCompiler
from fuselm.structured.matcher import SequenceGrammar

__all__ = ["GrammarCompiler", "SequenceGrammar", "fill_token_bitmask"]
