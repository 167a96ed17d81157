"""CLI flags generated from the config dataclasses, so help and defaults never drift."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import typing
from functools import cache
from typing import Any

from fuselm.config import CONFIG_SECTIONS, EngineConfig, literal_choices

_SKIP = {"model", "cache", "scheduler", "parallel"}


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


def _add_fields(group: argparse._ArgumentGroup, cls: type, prefix: str) -> None:
    """One flag per field of `cls`: ``--field-name FIELD_NAME``, its docstring as help, the
    values of a ``Literal`` type as choices, booleans as ``--x/--no-x``."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = docs.get(f.name, "")
        hint = hints[f.name]
        kwargs: dict[str, Any] = {"dest": f"{prefix}{f.name}", "default": default}
        notes = []
        if hint is bool or set(typing.get_args(hint)) == {bool, type(None)}:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = f.name.upper()
            if choices := literal_choices(hint):
                kwargs["choices"] = choices
                notes.append(f"choices: {', '.join(choices)}")
            if "dict" in str(hint):
                kwargs["type"] = json.loads
            else:
                kwargs["type"] = next((t for t in (int, float, str)
                                       if t in typing.get_args(hint) or t is hint), str)
        if default is not None:  # unset (None) is described by the field's docstring
            notes.append(f"default: {default}")
        if notes:
            help_text += f" ({'; '.join(notes)})"
        group.add_argument(flag, help=help_text.replace("%", "%%"), **kwargs)


def add_engine_arguments(parser: argparse.ArgumentParser, model_positional: bool = False) -> None:
    """Adds ``--model`` (or a positional MODEL) and every engine config flag."""
    if model_positional:
        parser.add_argument("model_pos", nargs="?", metavar="MODEL", default=None,
                            help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--model", default=None,
                        help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
    _add_fields(parser.add_argument_group("engine"), EngineConfig, "engine.")
    for name, cls in CONFIG_SECTIONS.items():
        _add_fields(parser.add_argument_group(name), cls, f"{name}.")


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
