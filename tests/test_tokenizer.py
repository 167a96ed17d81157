"""Tokenizer: encoding, chat template and streaming detokenization vs transformers (same GGUF)."""

from __future__ import annotations

import pytest

from fuselm.errors import InvalidRequestError
from fuselm.loading.default_model import default_model_path
from fuselm.tokenizer import Tokenizer

MIXED_TEXT = (
    "<|im_start|>user\ndef f(x):\n    return x**2  # square\n\tTabs, 'quotes' don't\n"
    "Numbers: 3.14159, 2024-06-01, 1,000,000 and x1y22z333.\n"
    "Unicode: café naïve Ελληνικά русский 日本語の文章 中文 한국어 😀👍🏽 🇫🇷\n"
    "  leading spaces<|im_end|>\n<|endoftext|>"
)
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And in Japanese? 日本語で"},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(default_model_path())


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(tok, hf_tok, add_special_tokens: bool) -> None:
    ours = tok.encode(MIXED_TEXT, add_special_tokens=add_special_tokens)
    assert ours == hf_tok.encode(MIXED_TEXT, add_special_tokens=add_special_tokens)
    assert ours[0] == tok.tokenizer.token_to_id("<|im_start|>")  # special token kept whole


def test_decode_matches_transformers(tok, hf_tok) -> None:
    ids = tok.encode(MIXED_TEXT)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(
            ids, skip_special_tokens=skip
        )
    assert tok.decode(ids, skip_special_tokens=False) == MIXED_TEXT


def test_special_ids(tok) -> None:
    assert tok.vocab_size == 49152
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)  # <|im_start|>, <|im_end|>
    assert tok.stop_token_ids == {tok.tokenizer.token_to_id("<|im_end|>")}


@pytest.mark.parametrize("with_system", [True, False])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf_tok, with_system, add_generation_prompt):
    messages = MESSAGES if with_system else MESSAGES[1:]
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = hf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == expected
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_chat_template_raise_exception() -> None:
    tok = Tokenizer(
        Tokenizer.from_gguf(default_model_path()).tokenizer,
        chat_template="{{ raise_exception('no system role') }}",
    )
    with pytest.raises(InvalidRequestError, match="no system role"):
        tok.apply_chat_template(MESSAGES)


def test_incremental_detokenizer(tok) -> None:
    text = "Grüße, 世界! Emoji 😀👍🏽🇫🇷 and Ελληνικά; 한국어 text."
    ids = tok.encode(text, add_special_tokens=False)
    detok = tok.incremental_detokenizer(prompt_ids=tok.encode("Say hi:"))
    deltas = [detok.step(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas[:-1]  # some character was split across tokens and held back


def test_incremental_detokenizer_truncated_character(tok) -> None:
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1
    detok = tok.incremental_detokenizer()
    assert detok.step(ids[0]) == ""
    assert detok.flush() == tok.decode(ids[:1])  # the partial bytes, only at the end


def test_from_hf_dir_matches_gguf(tok, hf_tok, tmp_path) -> None:
    hf_tok.save_pretrained(tmp_path)
    from_dir = Tokenizer.from_hf_dir(tmp_path)
    assert from_dir.encode(MIXED_TEXT) == tok.encode(MIXED_TEXT)
    assert from_dir.apply_chat_template(MESSAGES) == tok.apply_chat_template(MESSAGES)
    assert (from_dir.bos_token_id, from_dir.eos_token_id) == (1, 2)
    assert from_dir.stop_token_ids == tok.stop_token_ids
