"""CLI flags generated from the config dataclasses, so help and defaults never drift."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import re
import typing
from functools import cache
from typing import Any

from fuselm.config import CONFIG_SECTIONS, DTYPE_ALIASES, EngineConfig, literal_choices

_SKIP = {"model", "cache", "scheduler", "parallel"}
_SHORT_FLAGS = {"tensor_parallel_size": "-tp", "pipeline_parallel_size": "-pp"}  # vLLM's


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


@cache
def _field_flags() -> dict[str, str]:
    """Every engine config field name -> its flag, to write flags where docstrings name fields."""
    names = [f.name for cls in (EngineConfig, *CONFIG_SECTIONS.values())
             for f in dataclasses.fields(cls) if f.name not in _SKIP]
    return {name: _flag_name(name) for name in names}


def plain_help(text: str) -> str:
    """A field docstring as CLI help: no reST markup, flags instead of field names, "unset"
    instead of None."""
    text = text.replace("``", "")
    text = re.sub(r"\bNone\b", "unset", text)
    flags = _field_flags()
    # only multi-word names: "device" or "seed" in prose is the word, not the flag
    return re.sub(r"\b[a-z0-9]+(?:_[a-z0-9]+)+\b", lambda m: flags.get(m.group(), m.group()),
                  text)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _add_fields(group: argparse._ArgumentGroup, cls: type, prefix: str,
                defaults: dict[str, Any] | None = None) -> None:
    """One flag per field of `cls`: ``--field-name FIELD_NAME``, its docstring as help, the
    values of a ``Literal`` type as choices, booleans as ``--x/--no-x``; `defaults` replaces
    some fields' defaults (by field name)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in _SKIP:
            continue
        flags = [_flag_name(f.name)] + ([_SHORT_FLAGS[f.name]] if f.name in _SHORT_FLAGS else [])
        default = f.default if f.default is not dataclasses.MISSING else None
        default = (defaults or {}).get(f.name, default)
        help_text = plain_help(docs.get(f.name, ""))
        hint = hints[f.name]
        kwargs: dict[str, Any] = {"dest": f"{prefix}{f.name}", "default": default}
        if hint is bool or set(typing.get_args(hint)) == {bool, type(None)}:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = f.name.upper()
            if choices := literal_choices(hint):
                kwargs["choices"] = choices
                # aliases are accepted but not advertised (the docstring names them)
                kwargs["metavar"] = "{" + ",".join(c for c in choices
                                                   if c not in DTYPE_ALIASES) + "}"
            if "dict" in str(hint):
                kwargs["type"] = json.loads
            else:
                kwargs["type"] = next((t for t in (int, float, str)
                                       if t in typing.get_args(hint) or t is hint), str)
        if default is not None:  # unset (None) is described by the field's docstring
            help_text += f" (default: {default})"
        # argparse < 3.14 appends "(default: ...)" to BooleanOptionalAction help by itself,
        # "(default: None)" on tri-state flags; the "%(default)" marker stops it
        help_text = help_text.replace("%", "%%")
        if kwargs.get("action") is argparse.BooleanOptionalAction:
            help_text += "%(default).0s"
        group.add_argument(*flags, help=help_text, **kwargs)


def add_engine_arguments(parser: argparse.ArgumentParser, model_positional: bool = False,
                         defaults: dict[str, Any] | None = None) -> None:
    """Adds ``--model`` (or a positional MODEL) and every engine config flag; `defaults`
    replaces some fields' defaults for this command (by field name, e.g. max_num_seqs)."""
    if model_positional:
        parser.add_argument("model_pos", nargs="?", metavar="MODEL", default=None,
                            help="HF directory, .gguf file or Hub id ORG/NAME "
                            "(default: SmolLM2-135M-Instruct)")
    parser.add_argument("--model", default=None, metavar="MODEL",
                        help="HF directory, .gguf file or Hub id ORG/NAME "
                        "(default: SmolLM2-135M-Instruct)")
    _add_fields(parser.add_argument_group("engine"), EngineConfig, "engine.", defaults)
    for name, cls in CONFIG_SECTIONS.items():
        _add_fields(parser.add_argument_group(name), cls, f"{name}.", defaults)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Builds the EngineConfig from parsed flags."""
    values = vars(args)
    sections = {name: cls(**{f.name: values[f"{name}.{f.name}"]
                             for f in dataclasses.fields(cls)})
                for name, cls in CONFIG_SECTIONS.items()}
    top = {f.name: values[f"engine.{f.name}"] for f in dataclasses.fields(EngineConfig)
           if f.name not in _SKIP}
    if top.get("hf_overrides") is None:
        top["hf_overrides"] = {}
    model = values.get("model") or values.get("model_pos")
    return EngineConfig(model=model, **top, **sections)
