"""Hugging Face checkpoint directories: config.json and (sharded or not) safetensors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import safe_open

from fuselm.errors import ModelNotFoundError


def is_hf_dir(path: Path) -> bool:
    """True for a directory holding config.json."""
    return path.is_dir() and (path / "config.json").exists()


def load_hf_config(path: Path) -> dict[str, Any]:
    """The parsed config.json of a checkpoint directory."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelNotFoundError(f"{path} has no config.json; pass a Hugging Face model "
                                 "directory or a .gguf file")
    return json.loads(config_file.read_text())


def safetensors_files(path: Path) -> list[Path]:
    """The weight files: those named by model.safetensors.index.json, else every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors weights in {path}")
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise ModelNotFoundError(f"{path} lacks weight files {missing}")
    return files


def iterate_hf_weights(path: Path) -> Iterator[tuple[str, Any]]:
    """(name, lazy slice) pairs; a slice is read only where a layer asks for it."""
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
                yield name, f.get_slice(name)
