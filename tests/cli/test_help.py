"""``--help`` is plain text: choices as ``{a,b}``, a default only where the config field has one
(none on tri-state flags), no reST markup or dotted metavars; ``fuselm --version``."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
import subprocess
import sys

import pytest

from fuselm import cli
from fuselm.config import CONFIG_SECTIONS, EngineConfig


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def _config_defaults() -> dict[str, object]:
    """--flag-name -> the dataclass default (None where a field has no plain default)."""
    out = {}
    for cls in (EngineConfig, *CONFIG_SECTIONS.values()):
        for f in dataclasses.fields(cls):
            out["--" + f.name.replace("_", "-")] = (
                None if f.default is dataclasses.MISSING else f.default)
    return out


def _flag_help(text: str, flag: str) -> str:
    """The help text of ``flag`` (after its flags and metavar)."""
    for block in re.split(r"\n(?=  -)|\n\n", text.split("\noptions:", 1)[1]):
        names = []
        for word in block.split():  # the entry's flags and metavars, up to its help text
            if word.startswith("-"):
                names.append(word.rstrip(","))
            elif not re.fullmatch(r"[A-Z_]+,?|\{[^}]*\},?", word):
                break
        if flag in names:
            return " ".join(block.split())
    raise AssertionError(f"{flag} not in the help")


# generate and chat answer one prompt at a time, so their KV cache is sized for one sequence
ONE_SEQUENCE = {"--max-num-seqs": 1}


@pytest.mark.parametrize(("argv", "overrides"), [
    (["generate"], ONE_SEQUENCE), (["chat"], ONE_SEQUENCE), (["serve"], {}),
    (["bench", "latency"], {})])
def test_help_is_plain_and_shows_real_defaults(argv, overrides, capsys):
    raw = _help(argv, capsys)
    text = " ".join(raw.split())
    assert "--dtype {auto,float32,float16,bfloat16}" in text
    assert "--kernel-backend {auto,reference,triton,cuda}" in text
    assert "--load-format {auto,safetensors,gguf,dummy}" in text
    assert "``" not in text and "ENGINE." not in text and "None" not in text
    assert "-tp TENSOR_PARALLEL_SIZE" in text and "-pp PIPELINE_PARALLEL_SIZE" in text
    for flag, default in {**_config_defaults(), **overrides}.items():
        if flag in ("--model", "--cache", "--scheduler", "--parallel"):
            continue
        entry = _flag_help(raw, flag).split(flag, 1)[1]
        if default is None or isinstance(default, dict):
            assert "(default:" not in entry, (flag, entry)
        else:
            assert f"(default: {default})" in entry, (flag, entry)


def test_sampling_flags_show_their_defaults(capsys):
    raw = _help(["generate"], capsys)
    assert "(default: 256)" in _flag_help(raw, "--max-tokens")
    assert "(default: 0.0)" in _flag_help(raw, "--temperature")
    assert "(default:" not in _flag_help(raw, "--sampling-seed")


def test_version_is_the_installed_distributions():
    proc = subprocess.run([sys.executable, "-m", "fuselm", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"fuselm {importlib.metadata.version('fuselm')}"
