"""Tokenizer: encode/decode with a `tokenizers.Tokenizer`, chat templates, streaming detokenization.

    tok = Tokenizer.from_gguf(path)            # or Tokenizer.from_hf_dir(model_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tok.encode(prompt, add_special_tokens=False)
    detok = tok.incremental_detokenizer()
    for token_id in generated:
        print(detok.step(token_id), end="")
    print(detok.flush())

Chat templates are rendered like Hugging Face transformers does (sandboxed jinja2 with
trim_blocks/lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from fuselm.errors import InvalidRequestError, ModelNotFoundError

if TYPE_CHECKING:
    from fuselm.loading.gguf_file import GGUFFile
    from fuselm.loading.loader import ModelSource

# End-of-turn tokens that, when the chat template writes them, end generation.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus special token ids and an optional chat template."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        chat_template: str | None = None,
        extra_stop_token_ids: Iterable[int] = (),
    ) -> None:
        """`extra_stop_token_ids`: ids that end generation besides EOS (e.g. from
        generation_config.json); end-of-turn tokens the chat template writes are added too."""
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template
        stops = set(extra_stop_token_ids)
        if eos_token_id is not None:
            stops.add(eos_token_id)
        for token in _END_OF_TURN_TOKENS:
            token_id = tokenizer.token_to_id(token)
            if token_id is not None and chat_template is not None and token in chat_template:
                stops.add(token_id)
        self.stop_token_ids: set[int] = stops

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | Path | GGUFFile) -> Tokenizer:
        """Tokenizer of a GGUF file, given by path or as its parsed header (byte-level BPE
        vocabularies; see `tokenizer_from_gguf`)."""
        from fuselm.loading.gguf import metadata_value, tokenizer_from_gguf
        from fuselm.loading.gguf_file import GGUFFile

        reader = path if isinstance(path, GGUFFile) else GGUFFile.open(path)
        return cls(
            tokenizer_from_gguf(reader),
            bos_token_id=metadata_value(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_id=metadata_value(reader, "tokenizer.ggml.eos_token_id"),
            chat_template=metadata_value(reader, "tokenizer.chat_template"),
        )

    @classmethod
    def from_source(cls, source: ModelSource) -> Tokenizer:
        """The tokenizer of ``--tokenizer`` (``source.tokenizer_path``: a HF folder or a .gguf
        file) if given, else the one that ships with the checkpoint (a GGUF's parsed header is
        reused, not read again)."""
        path = source.tokenizer_path
        if path is None:
            return cls.from_gguf(source.gguf.reader) if source.gguf is not None \
                else cls.from_hf_dir(source.path)
        return cls.from_gguf(path) if path.suffix == ".gguf" else cls.from_hf_dir(path)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Tokenizer of a Hugging Face model folder: tokenizer.json, tokenizer_config.json
        (special tokens, added tokens, chat template), chat_template.jinja and
        generation_config.json (extra EOS ids), each used when present."""
        folder = Path(path)
        if not (folder / "tokenizer.json").is_file():
            raise ModelNotFoundError(f"no tokenizer.json in {folder}")
        tokenizer = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "tokenizer_config.json")
        added_tokens = config.get("added_tokens_decoder", {})
        for _, spec in sorted(added_tokens.items(), key=lambda item: int(item[0])):
            if tokenizer.token_to_id(spec["content"]) is None:  # normally in tokenizer.json
                added = AddedToken(spec["content"], special=spec.get("special", False))
                if spec.get("special", False):
                    tokenizer.add_special_tokens([added])
                else:
                    tokenizer.add_tokens([added])
        template = _select_template(config.get("chat_template"))
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        eos_ids = _read_json(folder / "generation_config.json").get("eos_token_id", [])
        return cls(
            tokenizer,
            bos_token_id=_token_id(tokenizer, config.get("bos_token")),
            eos_token_id=_token_id(tokenizer, config.get("eos_token")),
            chat_template=template,
            extra_stop_token_ids=[eos_ids] if isinstance(eos_ids, int) else eos_ids,
        )

    # -- encode / decode ----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included (the model's embedding may be larger)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (`<|im_start|>`) stay whole.
        `add_special_tokens` adds BOS/EOS where the tokenizer's post-processor does."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of token `ids`."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str | None:
        """The vocabulary string of `token_id` (byte-level spelling), or None."""
        return self.tokenizer.id_to_token(token_id)

    def incremental_detokenizer(
        self, prompt_ids: Iterable[int] = (), skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        """A fresh per-request streaming detokenizer (see `IncrementalDetokenizer`)."""
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)

    # -- chat template ------------------------------------------------------------------------

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        if self.chat_template is None:
            raise InvalidRequestError("this model has no chat template", param="messages")
        return _jinja_env().from_string(self.chat_template)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) to a prompt string with the chat
        template. `kwargs` (e.g. `tools`: OpenAI tool objects, as HF templates expect) are passed
        to the template; a template that cannot render the messages (e.g. no content in a tool
        call turn) is an InvalidRequestError."""
        special = {
            "bos_token": self._token_text_or_empty(self.bos_token_id),
            "eos_token": self._token_text_or_empty(self.eos_token_id),
        }
        try:
            return self._compiled_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **special, **kwargs
            )
        except (jinja2.TemplateError, TypeError, ValueError) as exc:
            raise InvalidRequestError(f"chat template failed: {exc}", param="messages") from exc

    def _token_text_or_empty(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


class IncrementalDetokenizer:
    """Streaming detokenization for one request: `step(token_id)` returns the new text.

    Decodes the window ids[prefix_offset:read_offset] (text already emitted) and
    ids[prefix_offset:] (with the new token) and emits the difference, holding back text while it
    ends in U+FFFD (a UTF-8 character split across tokens) -- vLLM's / TextStreamer's approach.
    Decoding a short window keeps each step O(window), and decoding with left context keeps
    tokenizer-dependent spacing right. Concatenating every `step` and a final `flush` equals
    `decode(all generated ids)`.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Iterable[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)[-5:]  # a little left context is enough
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def step(self, token_id: int) -> str:
        """Append `token_id`; return the text it completes ("" while a character is partial)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Text still held back at the end of the request (e.g. a truncated UTF-8 character)."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]


# -- helpers ----------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _jinja_env() -> ImmutableSandboxedEnvironment:
    """The sandbox HF renders chat templates in."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _select_template(template: str | list[dict[str, str]] | None) -> str | None:
    """tokenizer_config.json's chat_template: a string, or named templates (take "default")."""
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        return named.get("default", next(iter(named.values()), None))
    return template


def _token_id(tokenizer: HFTokenizer, token: str | dict[str, Any] | None) -> int | None:
    """Id of a tokenizer_config.json special token (a string or an AddedToken dict)."""
    if isinstance(token, dict):
        token = token.get("content")
    return None if token is None else tokenizer.token_to_id(token)
