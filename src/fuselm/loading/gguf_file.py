"""Reading a GGUF file: its metadata as Python values and where each tensor's bytes lie.

    f = GGUFFile.open(path)       # parses the header, checks every tensor lies inside the file
    f.metadata["general.architecture"]   # "llama"
    f.tensors["blk.0.attn_q.weight"]     # TensorInfo(name, shape, ggml_type, offset, num_bytes)
    f.read_tensor(info)                  # uint8 [num_bytes], a fresh tensor read from disk

Layout (GGUF v2/v3, little-endian): magic ``GGUF``, uint32 version, uint64 tensor count, uint64
metadata count; metadata as (string key, uint32 type, value); tensor infos as (string name,
uint32 n_dims, uint64 dims ne0 first, uint32 ggml type, uint64 offset from the data section);
the data section starts at the next multiple of ``general.alignment`` (default 32).

The header is parsed from one read of its bytes with ``struct`` (numeric arrays through numpy),
which takes about 0.1 s for a 49k-token vocabulary, where ``gguf.GGUFReader`` builds a numpy view
per field part (3.5 s on a 2-core CPU). Tensor bytes are read with ``readinto`` into the tensor
that keeps them, so nothing stays memory-mapped (and resident) after loading.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from fuselm.errors import CheckpointError, ModelNotFoundError

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_HEADER_CHUNK = 1 << 22  # bytes read at a time while parsing the header

# metadata value type -> struct format of one scalar (8 = string, 9 = array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9
_STRUCTS = {fmt: struct.Struct("<" + fmt) for fmt in _SCALARS.values()}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file.

    shape: the torch order of dims (GGUF lists ne0, the contiguous one, first).
    offset: absolute byte offset in the file; num_bytes: its size in its ggml encoding.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: str
    offset: int
    num_bytes: int


class _Cursor:
    """Sequential little-endian reads over the header, refilled from the file as needed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("rb")
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.pos = 0  # read position in buf

    def _need(self, n: int) -> None:
        if self.pos + n <= len(self.buf):
            return
        self.base += self.pos
        self.file.seek(self.base)
        chunk = self.file.read(max(n, _HEADER_CHUNK))
        if len(chunk) < n:
            raise CheckpointError(
                f"{self.path}: the GGUF header is truncated (needs {n} bytes at byte "
                f"{self.base}, the file has {self.base + len(chunk)})")
        self.buf, self.pos = chunk, 0

    def unpack(self, fmt: str) -> Any:
        """One little-endian scalar of struct format `fmt`."""
        packer = _STRUCTS[fmt]
        self._need(packer.size)
        (value,) = packer.unpack_from(self.buf, self.pos)
        self.pos += packer.size
        return value

    def string(self) -> str:
        n = self.unpack("Q")
        if n > 1 << 30:
            raise CheckpointError(f"{self.path}: a GGUF string of {n} bytes: corrupt header "
                                  f"at byte {self.offset}")
        self._need(n)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def array(self) -> list[Any]:
        elem_type, count = self.unpack("I"), self.unpack("Q")
        if elem_type == _STRING:
            return [self.string() for _ in range(count)]
        if elem_type == _ARRAY:
            return [self.array() for _ in range(count)]
        fmt = self._scalar_format(elem_type)
        size = struct.calcsize(fmt) * count
        self._need(size)
        values = np.frombuffer(self.buf, dtype="<" + fmt, count=count, offset=self.pos)
        self.pos += size
        return values.tolist()

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            return self.array()
        return self.unpack(self._scalar_format(value_type))

    def _scalar_format(self, value_type: int) -> str:
        if value_type not in _SCALARS:
            raise CheckpointError(f"{self.path}: unknown GGUF metadata type {value_type} at "
                                  f"byte {self.offset}: corrupt header")
        return _SCALARS[value_type]

    @property
    def offset(self) -> int:
        return self.base + self.pos


def _ggml_type_name(type_id: int) -> str:
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"ggml type {type_id}"


def _num_bytes(shape: tuple[int, ...], ggml_type: str) -> int | None:
    """Bytes of a tensor of torch `shape` in `ggml_type` (None for a type of unknown size)."""
    if ggml_type not in GGMLQuantizationType.__members__:
        return None
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    numel = int(np.prod(shape, dtype=np.int64))
    return numel // block_size * type_size


class GGUFFile:
    """A parsed GGUF header: ``metadata`` (key -> value), ``tensors`` (name -> TensorInfo, in
    file order) and the file's ``path``; tensor bytes are read on demand."""

    def __init__(self, path: Path, version: int, metadata: dict[str, Any],
                 tensors: dict[str, TensorInfo]) -> None:
        self.path = path
        self.version = version
        self.metadata = metadata
        self.tensors = tensors

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        """Parses the header of GGUF `path`. A missing file raises ModelNotFoundError; a file
        that is not GGUF, truncated or corrupt raises CheckpointError naming it."""
        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        cur = _Cursor(path)
        try:
            return cls._parse(path, cur)
        finally:
            cur.file.close()

    @classmethod
    def _parse(cls, path: Path, cur: _Cursor) -> GGUFFile:
        cur._need(4)
        if cur.buf[:4] != _MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (starts with {cur.buf[:4]!r}, "
                                  "expected b'GGUF')")
        cur.pos = 4
        version = cur.unpack("I")
        if version not in _SUPPORTED_VERSIONS:
            raise CheckpointError(f"{path}: GGUF version {version} is not supported (only "
                                  f"{', '.join(map(str, _SUPPORTED_VERSIONS))}, little-endian)")
        num_tensors, num_kv = cur.unpack("Q"), cur.unpack("Q")
        metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.unpack("I"))
        raw_infos = []
        for _ in range(num_tensors):
            name = cur.string()
            dims = [cur.unpack("Q") for _ in range(cur.unpack("I"))]
            raw_infos.append((name, tuple(reversed(dims)), cur.unpack("I"), cur.unpack("Q")))
        alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = -(-cur.offset // alignment) * alignment
        file_size = path.stat().st_size
        tensors: dict[str, TensorInfo] = {}
        for name, shape, type_id, rel_offset in raw_infos:
            ggml_type = _ggml_type_name(type_id)
            num_bytes = _num_bytes(shape, ggml_type) or 0
            info = TensorInfo(name, shape, ggml_type, data_start + rel_offset, num_bytes)
            if info.offset + num_bytes > file_size:
                raise CheckpointError(
                    f"{path}: truncated: tensor {name!r} needs bytes up to "
                    f"{info.offset + num_bytes}, the file has {file_size}")
            tensors[name] = info
        return cls(path, version, metadata, tensors)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of metadata `key`, or `default`."""
        return self.metadata.get(key, default)

    def read_tensor(self, info: TensorInfo) -> torch.Tensor:
        """uint8 ``[info.num_bytes]``: the tensor's bytes in its ggml encoding, read from disk."""
        out = torch.empty(info.num_bytes, dtype=torch.uint8)
        with self.path.open("rb") as f:
            f.seek(info.offset)
            got = f.readinto(out.numpy())
        if got != info.num_bytes:
            raise CheckpointError(f"{self.path}: truncated: tensor {info.name!r} has {got} of "
                                  f"{info.num_bytes} bytes")
        return out
