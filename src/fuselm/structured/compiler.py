"""Compiles a request's ``StructuredOutputsParams`` into an xgrammar grammar for one model's
vocabulary, with a per-compiler LRU cache (a schema sent with every request compiles once).

xgrammar was chosen over llguidance by measurement (docs/perf/log/structured-outputs.md): its
per-step mask is 5-10x cheaper at batch 1 and 64; its compile is slower, which the cache hides.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from fuselm import envs
from fuselm.errors import InvalidRequestError
from fuselm.sampling_params import StructuredOutputsParams
from fuselm.structured.grammar_spec import choice_ebnf, grammar_is_lark

if TYPE_CHECKING:
    from fuselm.structured.matcher import SequenceGrammar
    from fuselm.tokenizer import Tokenizer

INSTALL_HINT = "structured outputs need xgrammar: pip install 'fuselm[structured]'"


def import_xgrammar() -> Any:
    """The xgrammar module; InvalidRequestError naming the extra when it is not installed."""
    try:
        import xgrammar
    except ImportError:
        raise InvalidRequestError(INSTALL_HINT, param="structured_outputs") from None
    return xgrammar


@dataclass(frozen=True)
class Grammar:
    """A compiled constraint: ``matcher()`` starts a sequence at its beginning."""

    compiled: Any  # xgrammar.CompiledGrammar
    compiler: GrammarCompiler

    def matcher(self) -> SequenceGrammar:
        """A fresh per-sequence matcher (each of a request's n sequences gets its own)."""
        from fuselm.structured.matcher import SequenceGrammar

        return SequenceGrammar(self)


class GrammarCompiler:
    """Compiles constraints for one model: ``vocab_size`` is the logits' width (the bitmask
    covers it; ids past the tokenizer's vocabulary are never allowed), ``stop_token_ids`` the
    ids that end a sequence (allowed once the grammar is complete, forced after it).
    Thread-safe: the server may compile ahead of the engine's step thread."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Iterable[int],
                 cache_size: int = 256, max_threads: int | None = None) -> None:
        # the batched fill of step k+1's masks must fit beside step k+1's forward: at batch 64
        # (128k vocabulary, open JSON strings) it took 5.4 ms on 8 threads of an H200 host
        # against a 5.3 ms step, so it takes every core the step thread leaves
        spare_cores = max(1, (os.cpu_count() or 2) - 1)
        max_threads = max_threads or envs.grammar_threads() or min(16, spare_cores)
        if vocab_size < 1 or cache_size < 1 or max_threads < 1:
            raise ValueError("vocab_size, cache_size and max_threads must be >= 1")
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.stop_token_ids = sorted(t for t in set(stop_token_ids) if 0 <= t < vocab_size)
        self.cache_size, self.max_threads = cache_size, max_threads
        self._cache: OrderedDict[tuple[str, str, bool], Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self._xgr_parts: tuple[Any, Any] | None = None

    @property
    def _xgr(self) -> tuple[Any, Any]:
        """xgrammar's compiler and batch matcher, built on the first constrained request (the
        tokenizer info takes 0.1-0.7 s for 49k-128k tokens)."""
        with self._lock:
            if self._xgr_parts is None:
                self._xgr_parts = self._build_xgr()
            return self._xgr_parts

    def _build_xgr(self) -> tuple[Any, Any]:
        xgr = import_xgrammar()
        vocab_type, add_prefix_space = vocab_spelling(json.loads(self.tokenizer.tokenizer.to_str()))
        info = xgr.TokenizerInfo(
            encoded_vocab(self.tokenizer, self.vocab_size), getattr(xgr.VocabType, vocab_type),
            vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids,
            add_prefix_space=add_prefix_space)
        return (xgr.GrammarCompiler(info, max_threads=self.max_threads, cache_enabled=False),
                xgr.BatchGrammarMatcher(max_threads=self.max_threads))

    @cached_property
    def stop_only_row(self) -> torch.Tensor:
        """int32 ``[ceil(vocab_size / 32)]``: the bitmask row allowing only the stop tokens."""
        row = torch.zeros(bitmask_width(self.vocab_size), dtype=torch.int32)
        for token in self.stop_token_ids:
            row[token // 32] |= _bit(token % 32)
        return row

    def compile(self, params: StructuredOutputsParams) -> Grammar:
        """The grammar of ``params`` (cached); InvalidRequestError naming the field when the
        schema, regex or grammar does not compile."""
        if not self.stop_token_ids:
            raise InvalidRequestError("structured outputs need a model with a stop token",
                                      param="structured_outputs")
        key = _cache_key(params)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        grammar = Grammar(self._compile(params), self)
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _compile(self, params: StructuredOutputsParams) -> Any:
        compiler, _ = self._xgr
        kind = params.kind
        try:
            if kind == "json":
                return compiler.compile_json_schema(
                    json.dumps(params.json), any_whitespace=not params.disable_any_whitespace,
                    strict_mode=True)
            if kind == "json_object":
                return compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=not params.disable_any_whitespace)
            if kind == "regex":
                return compiler.compile_regex(params.regex)
            if kind == "choice":
                return compiler.compile_grammar(choice_ebnf(params.choice or []))
            if grammar_is_lark(params.grammar or ""):
                return compiler.compile_lark(params.grammar)
            return compiler.compile_grammar(params.grammar)
        except (RuntimeError, ValueError, TypeError) as exc:
            message = str(exc).strip().splitlines()
            detail = next((line for line in message if "error" in line.lower()),
                          message[0] if message else type(exc).__name__)
            raise InvalidRequestError(f"invalid {kind}: {_without_source_path(detail)}",
                                      param=kind) from None

    def fill_batch(self, matchers: list[Any], bitmask: torch.Tensor, rows: list[int]) -> None:
        """Writes xgrammar matchers' next-token masks into ``bitmask`` rows, on threads."""
        _, batch = self._xgr
        batch.batch_fill_next_token_bitmask(matchers, bitmask, rows)


def bitmask_width(vocab_size: int) -> int:
    """int32 words per bitmask row: ``ceil(vocab_size / 32)``."""
    return -(-vocab_size // 32)


def _bit(j: int) -> int:
    """The int32 value with only bit ``j`` set (bit 31 is the sign bit)."""
    return (1 << j) - (1 << 32) if j == 31 else 1 << j


def encoded_vocab(tokenizer: Tokenizer, vocab_size: int) -> list[str]:
    """The vocabulary as xgrammar reads it: the tokenizer's spelling of each id, "" (never
    allowed) for special tokens, so that a JSON string cannot contain ``<|im_end|>``, and for
    ids past the tokenizer's vocabulary."""
    hf = tokenizer.tokenizer
    vocab = [""] * vocab_size
    for token, token_id in hf.get_vocab(with_added_tokens=True).items():
        if token_id < vocab_size:
            vocab[token_id] = token
    for token_id, added in hf.get_added_tokens_decoder().items():
        if added.special and token_id < vocab_size:
            vocab[token_id] = ""
    return vocab


def vocab_spelling(tokenizer_json: dict[str, Any]) -> tuple[str, bool]:
    """How the vocabulary spells bytes, read from the decoder of a tokenizer.json:
    ``BYTE_LEVEL`` (GPT-2's byte alphabet), ``BYTE_FALLBACK`` (``<0x0A>`` tokens, SentencePiece's
    ``▁`` for spaces) or ``RAW``; and whether a prefix space is added (SentencePiece)."""
    decoder = tokenizer_json.get("decoder") or {}
    steps = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    types = {step.get("type") for step in steps}
    if "ByteLevel" in types:
        return "BYTE_LEVEL", False
    prefix = any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never"
                 for s in steps) or any(s.get("type") == "Strip" and s.get("start") for s in steps)
    if "ByteFallback" in types:
        return "BYTE_FALLBACK", prefix
    return "RAW", prefix


def _cache_key(params: StructuredOutputsParams) -> tuple[str, str, bool]:
    kind = params.kind
    value = True if kind == "json_object" else getattr(params, kind)
    return kind, json.dumps(value, sort_keys=True), params.disable_any_whitespace


def _without_source_path(line: str) -> str:
    """xgrammar's message without its ``[time] /project/cpp/file.cc:123:`` prefix."""
    head, sep, tail = line.partition(".cc:")
    if sep and head.lstrip().startswith("["):
        return tail.split(":", 1)[-1].strip()
    return line.strip()
