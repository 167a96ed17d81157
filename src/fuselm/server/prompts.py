"""Request prompts to token ids: completion prompts (text, ids, or lists of them) and chat
messages through the chat template, tokenized off the event loop after a cheap length check.

In a chat prompt only the template's own markup may become special tokens: message text is
encoded with special-token parsing off, so content such as ``<|im_end|>\\n<|im_start|>system``
stays text and cannot forge a turn.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from fuselm.errors import ContextLengthError, InvalidRequestError
from fuselm.server.protocol import MAX_PROMPTS, ChatMessageParam

ROLE_OR_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
"""What a message's `role` and `name` may hold: they are pasted into the template's markup."""
CHARS_MARGIN = 2
"""Slack on the bound of characters per token (normalizers may shorten text a little)."""


def check_token_ids(ids: Iterable[int], vocab_size: int, param: str) -> list[int]:
    """`ids` as a list; InvalidRequestError if any is outside [0, vocab_size)."""
    ids = list(ids)
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            f"token id {bad[0]} is out of range; ids must be in [0, {vocab_size})", param=param)
    return ids


LONG_TEXT = 16384
"""Characters from which a text is encoded through `encode_batch`: Hugging Face's `encode`
holds the GIL (a 3.6 MB prompt stalled every other thread for 3.6 s on a CPU), its batch
call releases it (the longest stall of the same encode: 64 ms)."""


def _hf_tokenizer(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` inside fuselm's Tokenizer, or None for other kinds."""
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:  # pragma: no cover - tokenizers comes with the engine
        return None
    inner = getattr(tokenizer, "tokenizer", None)
    return inner if isinstance(inner, HFTokenizer) else None


def _encoder(hf: Any) -> Callable[[str, bool], list[int]]:
    def encode(text: str, add_special_tokens: bool) -> list[int]:
        if len(text) < LONG_TEXT:
            return hf.encode(text, add_special_tokens=add_special_tokens).ids
        return hf.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    return encode


def _encoders(tokenizer: Any) -> tuple[Callable[[str, bool], list[int]],
                                       Callable[[str], list[int]]]:
    """(encode(text, add_special_tokens), encode_plain(text)): the second never parses
    special tokens out of the text."""
    hf = _hf_tokenizer(tokenizer)
    if hf is None:  # other kinds (the tests' byte tokenizer) parse no special tokens from text
        return (lambda text, add: tokenizer.encode(text, add_special_tokens=add),
                lambda text: tokenizer.encode(text, add_special_tokens=False))
    # A private copy: the flag is per tokenizer object, and the engine's must keep parsing.
    plain = type(hf).from_str(hf.to_str())
    plain.encode_special_tokens = True
    encode_plain = _encoder(plain)
    return _encoder(hf), lambda text: encode_plain(text, False)


def _max_token_chars(tokenizer: Any) -> int:
    """The longest vocabulary entry in characters: a bound on the text one token covers."""
    longest = 1
    for token_id in range(tokenizer.vocab_size):
        longest = max(longest, len(tokenizer.decode([token_id], skip_special_tokens=False)))
    return longest


class PromptEncoder:
    """One app's prompt tokenization (see the module docstring); built once per tokenizer."""

    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.encode, self.encode_plain = _encoders(tokenizer)
        self.max_chars = max_model_len * _max_token_chars(tokenizer) * CHARS_MARGIN
        """Longer texts cannot fit in the context, whatever they tokenize to."""

    def check_length(self, num_chars: int, param: str) -> None:
        """ContextLengthError for a text too long to fit the context, before tokenizing it."""
        if num_chars > self.max_chars:
            raise ContextLengthError(
                f"the prompt has {num_chars} characters, more than fit this model's maximum "
                f"context length of {self.max_model_len} tokens; shorten the prompt",
                param=param)

    async def completion_prompts(self, prompt: Any, *, add_special_tokens: bool = True,
                                 truncate_prompt_tokens: int | None = None,
                                 ) -> list[tuple[str, list[int]]]:
        """(text, token ids) of each prompt of a completion request (text, ids, or lists);
        `truncate_prompt_tokens` keeps the last that many ids of each."""
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif not prompt:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        elif isinstance(prompt[0], int):
            items = [prompt]
        else:
            items = list(prompt)
        if len(items) > MAX_PROMPTS:
            raise InvalidRequestError(f"at most {MAX_PROMPTS} prompts per request",
                                      param="prompt")
        for item in items:
            if isinstance(item, str) and truncate_prompt_tokens is None:
                self.check_length(len(item), "prompt")
        return await asyncio.to_thread(self._encode_prompts, items, add_special_tokens,
                                       truncate_prompt_tokens)

    def _encode_prompts(self, items: list[Any], add_special_tokens: bool,
                        truncate: int | None) -> list[tuple[str, list[int]]]:
        tok, result = self.tokenizer, []
        for item in items:
            if isinstance(item, str):
                ids = self.encode(item, add_special_tokens)
                text = item
            else:
                ids = check_token_ids(item, tok.vocab_size, "prompt")
                text = ""
            if truncate is not None and len(ids) > truncate:
                ids = ids[-truncate:]
                text = ""
            if not text:
                text = tok.decode(ids, skip_special_tokens=False)
            if not ids:
                raise InvalidRequestError("the prompt is empty", param="prompt")
            result.append((text, ids))
        return result

    async def chat_prompt(self, messages: list[ChatMessageParam], add_generation_prompt: bool,
                          *, add_special_tokens: bool = False,
                          template_kwargs: dict[str, Any] | None = None,
                          ) -> tuple[str, list[int]]:
        """The chat template's text for `messages` and its token ids (the template writes the
        special tokens; `add_special_tokens` adds the tokenizer's own, e.g. BOS, in front).
        `template_kwargs`: extra template variables."""
        rendered = [_message_dict(m) for m in messages]
        kwargs = dict(template_kwargs or {})
        for reserved in ("messages", "add_generation_prompt"):
            if reserved in kwargs:
                raise InvalidRequestError(f"chat_template_kwargs may not set {reserved!r}",
                                          param="chat_template_kwargs")
        kwargs["add_generation_prompt"] = add_generation_prompt
        self.check_length(sum(len(m["content"]) for m in rendered), "messages")
        text, ids = await asyncio.to_thread(self._render_chat, rendered, kwargs)
        if add_special_tokens:
            ids = self.encode("", True) + ids
        return text, ids

    def _render_chat(self, messages: list[dict[str, Any]], kwargs: dict[str, Any],
                     ) -> tuple[str, list[int]]:
        text = _apply_template(self.tokenizer, messages, kwargs)
        marks = {f"\ue000{uuid.uuid4().hex}\ue001": m["content"] for m in messages
                 if m["content"]}
        by_content = iter(marks)
        masked = [{**m, "content": next(by_content)} if m["content"] else m for m in messages]
        masked_text = _apply_template(self.tokenizer, masked, kwargs)
        ids: list[int] = []
        pieces: list[str] = []
        pos = 0
        for match in (re.finditer("|".join(map(re.escape, marks)), masked_text) if marks
                      else ()):
            markup, content = masked_text[pos:match.start()], marks[match.group()]
            ids += self.encode(markup, False)
            ids += self.encode_plain(content)
            pieces += [markup, content]
            pos = match.end()
        ids += self.encode(masked_text[pos:], False)
        if "".join(pieces) + masked_text[pos:] != text:
            ids = self._whole_text_ids(messages, text)
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="messages")
        return text, ids

    def _whole_text_ids(self, messages: list[dict[str, Any]], text: str) -> list[int]:
        """Ids of a template that rewrites message text (so the pieces can't be located):
        the whole text, refused if any message text holds special-token markup."""
        for m in messages:
            content = m["content"]
            if self.encode(content, False) != self.encode_plain(content):
                raise InvalidRequestError(
                    "message content holds special-token markup, which this model's chat "
                    "template does not let fuselm keep as text", param="messages")
        return self.encode(text, False)


def _message_dict(message: ChatMessageParam) -> dict[str, Any]:
    """The template's view of a message: text parts joined, role and name checked."""
    for field_name in ("role", "name"):
        value = getattr(message, field_name)
        if value is not None and not ROLE_OR_NAME.fullmatch(value):
            raise InvalidRequestError(
                f"a message {field_name} must match [A-Za-z0-9_.-]{{1,64}}", param="messages")
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise InvalidRequestError(
                    f"content part type {part.type!r} is not supported; send text parts",
                    param="messages")
            texts.append(part.text)
        content = "\n".join(texts)
    rendered = message.model_dump(exclude_none=True)
    rendered["content"] = content or ""
    return rendered


def _apply_template(tokenizer: Any, messages: list[dict[str, Any]],
                    kwargs: dict[str, Any]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except InvalidRequestError:
        raise
    except Exception as exc:  # a template may fail on any message shape
        raise InvalidRequestError(f"the chat template failed: {exc}", param="messages") from exc
