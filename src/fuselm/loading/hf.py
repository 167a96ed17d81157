"""Hugging Face checkpoint directories: config.json and (sharded or not) safetensors.

Before any weight loads, `check_hf_weights` reads each safetensors header (an 8-byte
little-endian length, then that many bytes of JSON: per tensor its dtype, shape and
``data_offsets`` into the data that follows) and checks it against the file's size, so that a
truncated file or a header that lies is an error naming the file, not a failure mid-load.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fuselm.errors import CheckpointError, ModelNotFoundError

_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2,
                "BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1,
                "F8_E5M2": 1, "F8_E8M0": 1}
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


def is_hf_dir(path: Path) -> bool:
    """True for a directory holding config.json."""
    return path.is_dir() and (path / "config.json").exists()


def load_hf_config(path: Path) -> dict[str, Any]:
    """The parsed config.json of a checkpoint directory."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelNotFoundError(f"{path} has no config.json; pass a Hugging Face model "
                                 "directory or a .gguf file")
    config = read_json(config_file)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object, got "
                              f"{type(config).__name__}")
    if "quantization_config" not in config:
        quant = _side_quantization_config(path)
        if quant is not None:
            config["quantization_config"] = quant
    return config


# AutoGPTQ and AutoAWQ checkpoints keep their settings beside config.json (older ones without
# a quant_method), as vLLM also reads them.
_QUANT_SIDE_FILES = (("quantize_config.json", "gptq"), ("quant_config.json", "awq"))


def _side_quantization_config(path: Path) -> dict[str, Any] | None:
    """The quantization settings of ``quantize_config.json`` (AutoGPTQ) or
    ``quant_config.json`` (AutoAWQ), with ``quant_method`` filled in; None without either."""
    for name, method in _QUANT_SIDE_FILES:
        file = path / name
        if file.is_file():
            quant = read_json(file)
            if not isinstance(quant, dict):
                raise CheckpointError(f"{file}: expected a JSON object, got "
                                      f"{type(quant).__name__}")
            return {"quant_method": method, **quant}
    return None


def read_json(file: Path) -> Any:
    """The parsed JSON of `file`; invalid JSON raises CheckpointError naming the file."""
    try:
        return json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from exc


def safetensors_files(path: Path) -> list[Path]:
    """The weight files: those named by model.safetensors.index.json, else every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        index_json = read_json(index)
        weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: has no \"weight_map\" object")
        files = [path / n for n in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names {len(missing)} missing weight file(s): "
                                  f"{', '.join(missing)}")
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors weights in {path}")
    return files


def read_safetensors_header(file: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {dtype, shape, data_offsets} of safetensors `file`, checked against the
    file: raises CheckpointError naming it when truncated or when the header lies."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated: {size} bytes, too short for a "
                                  "safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(f"{file}: truncated or not safetensors: the header claims "
                                  f"{header_len} bytes, the file has {size}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: the safetensors header is not valid JSON ({exc})") \
            from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    for name, entry in header.items():
        _check_entry(file, name, entry, data_size)
    return header


def _check_entry(file: Path, name: str, entry: Any, data_size: int) -> None:
    """One tensor's header entry: a known dtype, offsets spanning exactly its bytes, inside
    the file."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        num_bytes = _DTYPE_BYTES[dtype] * math.prod(int(d) for d in shape)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: the header entry of tensor {name!r} is malformed "
                              f"({entry!r:.120})") from exc
    if end - begin != num_bytes or begin < 0:
        raise CheckpointError(
            f"{file}: the header lies: tensor {name!r} ({dtype} {list(shape)}, {num_bytes} "
            f"bytes) has data_offsets [{begin}, {end}]")
    if end > data_size:
        raise CheckpointError(
            f"{file}: truncated: tensor {name!r} ends at byte {end} of the data, which holds "
            f"{data_size} bytes")


def check_hf_weights(path: Path) -> int:
    """Checks the header of every weight file of checkpoint `path`; returns the tensor count."""
    return sum(len(read_safetensors_header(f)) for f in safetensors_files(path))


def iterate_hf_weights(path: Path) -> Iterator[tuple[str, Any]]:
    """(name, lazy slice) pairs; a slice is read only where a layer asks for it."""
    from safetensors import safe_open

    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
                yield name, f.get_slice(name)
