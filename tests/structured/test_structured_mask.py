"""Token masks of compiled constraints against independent references: xgrammar's own bitmask
kernel, and masks computed by brute force over the default model's vocabulary with Python's
string operations."""

from __future__ import annotations

import re

import pytest
import torch
import xgrammar as xgr

from fuselm.errors import InvalidRequestError
from fuselm.layers.sampler import SamplingTensors, apply_token_bitmask, sample
from fuselm.sampling_params import StructuredOutputsParams
from fuselm.structured import GrammarCompiler, fill_token_bitmask
from fuselm.tokenizer import Tokenizer

VOCAB = 49152
EOS = 2  # <|im_end|>, the default model's EOS


@pytest.fixture(scope="module")
def tok(default_gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(default_gguf_path)


@pytest.fixture(scope="module")
def compiler(tok) -> GrammarCompiler:
    return GrammarCompiler(tok, VOCAB, {EOS})


@pytest.fixture(scope="module")
def texts(tok) -> list[str]:
    """Each token's text; special tokens as None (never allowed by a grammar)."""
    special = {i for i, t in tok.tokenizer.get_added_tokens_decoder().items() if t.special}
    return [None if i in special else tok.decode([i], skip_special_tokens=False)
            for i in range(VOCAB)]


def allowed_ids(bitmask_row: torch.Tensor, vocab: int = VOCAB) -> set[int]:
    bits = (bitmask_row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return set(bits.flatten()[:vocab].nonzero().flatten().tolist())


def mask_after(compiler: GrammarCompiler, params: StructuredOutputsParams,
               history: list[int]) -> set[int]:
    grammar = compiler.compile(params).matcher()
    return allowed_ids(fill_token_bitmask([grammar], [history], VOCAB)[0])


@pytest.mark.parametrize("rows,vocab", [(1, 32), (3, 1000), (4, VOCAB + 7)])
def test_apply_token_bitmask_matches_xgrammar(rows, vocab):
    gen = torch.Generator().manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab, generator=gen)
    width = -(-vocab // 32)
    bitmask = torch.randint(-2**31, 2**31 - 1, (rows, width), dtype=torch.int32, generator=gen)
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask, backend="torch_native")
    got = apply_token_bitmask(logits, bitmask)
    assert torch.equal(got, expected), (got != expected).sum().item()
    assert torch.isinf(got).any() and torch.isfinite(got).any()


def test_apply_token_bitmask_refuses_a_short_bitmask():
    with pytest.raises(ValueError, match="does not cover"):
        apply_token_bitmask(torch.zeros(2, 100), torch.zeros(2, 3, dtype=torch.int32))


def test_regex_mask_equals_brute_force(compiler, tok, texts):
    params = StructuredOutputsParams(regex="[0-9]{1,3}")
    expected = {i for i, t in enumerate(texts) if t and t.isascii() and t.isdigit()
                and len(t) <= 3}
    assert mask_after(compiler, params, []) == expected
    twelve = tok.encode("12", add_special_tokens=False)
    assert tok.decode(twelve) == "12"
    one_more = {i for i in expected if len(texts[i]) == 1}
    assert mask_after(compiler, params, twelve) == one_more | {EOS}


def test_choice_mask_equals_brute_force(compiler, tok, texts):
    choices = ["yes", "no", "maybe so"]
    expected = {i for i, t in enumerate(texts) if t and any(c.startswith(t) for c in choices)}
    params = StructuredOutputsParams(choice=choices)
    assert mask_after(compiler, params, []) == expected
    assert mask_after(compiler, params, tok.encode("yes", add_special_tokens=False)) == {EOS}


@pytest.mark.parametrize("grammar", ['start: "a" "b"+', 'root ::= "a" "b"+'])
def test_lark_and_ebnf_grammars_equal_brute_force(compiler, texts, grammar):
    expected = {i for i, t in enumerate(texts) if t and re.fullmatch(r"ab*", t)}
    assert mask_after(compiler, StructuredOutputsParams(grammar=grammar), []) == expected


def test_json_string_never_takes_special_tokens(compiler, tok, texts):
    history = tok.encode('{"a": "', add_special_tokens=False)
    allowed = mask_after(compiler, StructuredOutputsParams(json_object=True), history)
    special = {i for i, t in enumerate(texts) if t is None}
    assert special and not allowed & special
    assert tok.encode("hello", add_special_tokens=False)[0] in allowed


def test_batch_mixes_free_constrained_and_finished_rows(compiler, tok):
    params = StructuredOutputsParams(choice=["yes", "no"])
    grammar = compiler.compile(params)
    done, rejected, live = grammar.matcher(), grammar.matcher(), grammar.matcher()
    yes = tok.encode("yes", add_special_tokens=False)
    bitmask = fill_token_bitmask([None, done, rejected, live],
                                 [[5, 6], yes + [EOS], tok.encode("x", add_special_tokens=False),
                                  []], VOCAB)
    assert allowed_ids(bitmask[0]) == set(range(VOCAB))
    assert done.done and allowed_ids(bitmask[1]) == {EOS}
    assert rejected.failed and allowed_ids(bitmask[2]) == {EOS}
    assert not live.done and EOS not in allowed_ids(bitmask[3])
    assert live.num_accepted == 0 and done.num_accepted == len(yes) + 1


def test_a_reused_buffer_gets_every_row_rewritten(compiler, tok):
    """Rows are written one by one (no whole-buffer fill first), so the garbage of a reused
    pinned buffer must not survive in any row: free rows all ones, constrained rows exactly
    what a fresh buffer gets."""
    grammar = compiler.compile(StructuredOutputsParams(choice=["yes", "no"]))
    width = -(-VOCAB // 32)
    garbage = torch.randint(-2**31, 2**31 - 1, (6, width), dtype=torch.int32,
                            generator=torch.Generator().manual_seed(7))
    rows = [None, grammar.matcher(), None, grammar.matcher()]
    histories = [[], [], [], tok.encode("y", add_special_tokens=False)]
    got = fill_token_bitmask(rows, histories, VOCAB, out=garbage.clone())
    fresh = [None, grammar.matcher(), None, grammar.matcher()]
    want = fill_token_bitmask(fresh, histories, VOCAB, out=torch.zeros(6, width,
                                                                       dtype=torch.int32))
    assert torch.equal(got, want)
    assert allowed_ids(got[0]) == allowed_ids(got[2]) == set(range(VOCAB))
    assert allowed_ids(got[1]) != allowed_ids(got[3])


def test_sampler_draws_only_allowed_tokens():
    gen = torch.Generator().manual_seed(0)
    rows, vocab = 6, 200
    logits = torch.randn(rows, vocab, generator=gen) * 3
    bitmask = torch.randint(-2**31, 2**31 - 1, (rows, 7), dtype=torch.int32, generator=gen)
    bitmask[0] = -1  # a free row
    shifts = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).flatten(1)[:, :vocab].bool()
    temps = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.5, 2.0])
    t = SamplingTensors(temperature=temps, top_k=torch.full((rows,), vocab),
                        top_p=torch.ones(rows), min_p=torch.zeros(rows), all_greedy=False,
                        need_top_k=False, need_top_p=False, need_min_p=False,
                        token_bitmask=bitmask)
    expected_greedy = logits.masked_fill(~allowed, float("-inf")).argmax(-1)
    for _ in range(50):
        ids = sample(logits, t).token_ids
        assert allowed[torch.arange(rows), ids].all()
        assert torch.equal(ids[:2], expected_greedy[:2])
    assert ids[0] == logits[0].argmax()


@pytest.mark.parametrize("kwargs,param", [
    ({"regex": "(abc"}, "regex"),
    ({"json": {"type": "foo"}}, "json"),
    ({"grammar": "root ::= "}, "grammar"),
    ({"grammar": "start: undefined_rule"}, "grammar"),
])
def test_bad_constraint_is_an_invalid_request(compiler, kwargs, param):
    with pytest.raises(InvalidRequestError) as info:
        compiler.compile(StructuredOutputsParams(**kwargs))
    assert info.value.param == param
    assert "project/cpp" not in str(info.value)


@pytest.mark.parametrize("kwargs,param", [
    ({}, "structured_outputs"),
    ({"regex": "a", "choice": ["a"]}, "structured_outputs"),
    ({"choice": []}, "choice"),
    ({"choice": ["a", ""]}, "choice"),
    ({"json": "{not json"}, "json"),
    ({"json": "[1, 2]"}, "json"),
    ({"regex": "  "}, "regex"),
])
def test_malformed_params_are_refused(kwargs, param):
    with pytest.raises(InvalidRequestError) as info:
        StructuredOutputsParams(**kwargs)
    assert info.value.param == param


def test_compiled_grammars_are_cached_by_spec(compiler):
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    first = compiler.compile(StructuredOutputsParams(json=schema))
    assert compiler.compile(StructuredOutputsParams(json=dict(reversed(schema.items())))) \
        is first
    assert compiler.compile(StructuredOutputsParams(json=schema, disable_any_whitespace=True)) \
        is not first
