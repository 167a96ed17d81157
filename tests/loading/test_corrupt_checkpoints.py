"""Corrupted or truncated checkpoint files, through the real CLI: one stderr line naming the
file and what is wrong, exit status 1, no traceback, before the engine starts."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint("llama2-mha-untied", tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def default_gguf_head(default_gguf_path, tmp_path_factory) -> bytes:
    """The first 6 MB of the default model's GGUF: the whole header and a few tensors."""
    with open(default_gguf_path, "rb") as f:
        return f.read(6 * 2**20)


def _truncate(file: Path, size: int) -> None:
    with file.open("r+b") as f:
        f.truncate(size)


def _lying_header(file: Path) -> None:
    """Doubles the first dim of one tensor in the header, keeping its data_offsets."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"][0] *= 2
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _missing_shard(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "lm_head.weight": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


# case -> (how to break the tiny HF folder, the file the error names, words it says)
HF_CASES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "truncated safetensors": (
        lambda d: _truncate(d / "model.safetensors", (d / "model.safetensors").stat().st_size // 2),
        "model.safetensors", "truncated"),
    "safetensors shorter than its header": (
        lambda d: _truncate(d / "model.safetensors", 4), "model.safetensors", "truncated"),
    "safetensors header that lies": (
        lambda d: _lying_header(d / "model.safetensors"), "model.safetensors", "header lies"),
    "safetensors header not JSON": (
        lambda d: (d / "model.safetensors").write_bytes(struct.pack("<Q", 8) + b"{garbage" +
                                                        b"\0" * 64),
        "model.safetensors", "not valid JSON"),
    "missing shard of an index": (
        _missing_shard, "model.safetensors.index.json", "model-00002-of-00002.safetensors"),
    "config.json not JSON": (
        lambda d: (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],'),
        "config.json", "not valid JSON"),
}


def _run_cli(model: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fuselm", "generate", "--model", str(model), "--device", "cpu",
         "--max-tokens", "2", "hi"],
        capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def _assert_one_line_error(result: subprocess.CompletedProcess[str], file_name: str,
                           words: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert file_name in lines[0] and words in lines[0], lines[0]
    assert result.stdout == ""  # the engine never started, so nothing was generated


@pytest.mark.parametrize("case", list(HF_CASES))
def test_corrupt_hf_checkpoint(case: str, tiny_dir: Path, tmp_path: Path) -> None:
    breaker, file_name, words = HF_CASES[case]
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    breaker(folder)
    _assert_one_line_error(_run_cli(folder, tmp_path), file_name, words)


@pytest.mark.parametrize("size,words", [(6 * 2**20, "truncated: tensor"),
                                        (2**20, "header is truncated"),
                                        (3, "header is truncated"),
                                        (0, "not a GGUF file")])
def test_truncated_gguf(size: int, words: str, default_gguf_head: bytes, tmp_path: Path) -> None:
    """The default model cut after its header (tensors missing), inside it, at 3 bytes; and
    (size 0) a file of another format named .gguf."""
    file = tmp_path / "cut.gguf"
    file.write_bytes(default_gguf_head[:size] if size else b"PK\x03\x04" + bytes(60))
    _assert_one_line_error(_run_cli(file, tmp_path), "cut.gguf", words)


def test_intact_copy_runs(tiny_dir: Path, tmp_path: Path) -> None:
    """Control: the same folder, unbroken, answers through the same command."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    result = _run_cli(folder, tmp_path)
    assert result.returncode == 0, result.stderr
