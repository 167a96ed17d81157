"""fuselm's GGUF header reader against the format's own library (gguf.GGUFReader/GGUFWriter):
metadata values, tensor infos and tensor bytes, on a random file and on the default model."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants

from fuselm.errors import CheckpointError
from fuselm.loading.gguf_file import GGUFFile


def _reference(reader: GGUFReader) -> tuple[dict, dict]:
    metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (tuple(reversed(t.shape.tolist())), t.tensor_type.name,
                        int(t.data_offset), int(t.n_bytes),
                        np.asarray(t.data).view(np.uint8).reshape(-1)) for t in reader.tensors}
    return metadata, tensors


def _assert_same(ours: GGUFFile, reader: GGUFReader) -> None:
    metadata, tensors = _reference(reader)
    assert ours.metadata.keys() == metadata.keys()
    for key, want in metadata.items():
        got = ours.metadata[key]
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-7), key
        else:
            assert got == want, key
    assert list(ours.tensors) == list(tensors)  # file order
    for name, (shape, ggml_type, offset, num_bytes, data) in tensors.items():
        info = ours.tensors[name]
        assert (info.shape, info.ggml_type, info.offset, info.num_bytes) == \
            (shape, ggml_type, offset, num_bytes), name
        assert np.array_equal(ours.read_tensor(info).numpy(), data), name


@pytest.fixture()
def random_gguf(tmp_path):
    """A GGUF written by gguf.GGUFWriter with random metadata of every value type and random
    tensors of odd shapes in F32, F16 and Q8_0."""
    rng = np.random.default_rng()
    path = tmp_path / "random.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_uint8("t.u8", int(rng.integers(0, 256)))
    writer.add_uint32("t.u32", int(rng.integers(0, 2**32)))
    writer.add_int64("t.i64", int(rng.integers(-2**62, 2**62)))
    writer.add_float32("t.f32", float(rng.normal()))
    writer.add_float64("t.f64", float(rng.normal()))
    writer.add_bool("t.bool", bool(rng.integers(0, 2)))
    writer.add_string("t.str", "héllo wörld " + str(rng.integers(1000)))
    words = ["".join(chr(c) for c in rng.integers(33, 0x3000, size=int(n)))
             for n in rng.integers(0, 9, size=257)]
    writer.add_array("t.strings", words)
    writer.add_array("t.ints", rng.integers(-1000, 1000, size=333).tolist())
    writer.add_array("t.floats", rng.normal(size=17).astype(np.float32).tolist())
    for i, shape in enumerate([(3, 5), (7,), (2, 3, 4)]):
        writer.add_tensor(f"f32.{i}", rng.normal(size=shape).astype(np.float32))
        writer.add_tensor(f"f16.{i}", rng.normal(size=shape).astype(np.float16))
    q = quants.quantize(rng.normal(size=(3, 64)).astype(np.float32), GGMLQuantizationType.Q8_0)
    writer.add_tensor("q8.0", q, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_random_file_matches_gguf_reader(random_gguf) -> None:
    _assert_same(GGUFFile.open(random_gguf), GGUFReader(random_gguf, "r"))


def test_default_model_matches_gguf_reader(default_gguf_path) -> None:
    _assert_same(GGUFFile.open(default_gguf_path), GGUFReader(default_gguf_path, "r"))


def test_truncated_tensor_data_names_file_and_tensor(random_gguf, tmp_path) -> None:
    last = GGUFReader(random_gguf, "r").tensors[-1]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(random_gguf.read_bytes()[: int(last.data_offset) + int(last.n_bytes) - 1])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: truncated: tensor 'q8\.0'"):
        GGUFFile.open(cut)


def test_truncated_header_names_file(random_gguf, tmp_path) -> None:
    reader = GGUFReader(random_gguf, "r")
    first_tensor = min(int(t.data_offset) for t in reader.tensors)
    for size in np.random.default_rng().integers(5, first_tensor - 64, size=5):
        cut = tmp_path / "cut.gguf"
        cut.write_bytes(random_gguf.read_bytes()[:size])
        with pytest.raises(CheckpointError, match=r"cut\.gguf: (the GGUF header is )?trunc"):
            GGUFFile.open(cut)
