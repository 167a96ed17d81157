"""Lazy safetensors slices through the shard helpers: whole tensors of every rank (a 0-d
per-tensor scale too) and narrowed rows, against the tensors written."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fuselm.layers.weight_utils import materialize, narrow, tensor_shape


def test_lazy_slices_of_every_rank(tmp_path) -> None:
    gen = torch.Generator().manual_seed(3)
    written = {"scalar": torch.tensor(0.0371), "vector": torch.randn(5, generator=gen),
               "matrix": torch.randn(6, 4, generator=gen)}
    path = tmp_path / "t.safetensors"
    save_file(written, str(path))
    with safe_open(str(path), "pt") as f:
        for name, want in written.items():
            lazy = f.get_slice(name)
            assert tensor_shape(lazy) == tuple(want.shape)
            got = materialize(lazy)
            assert got.shape == want.shape and torch.equal(got, want), name
        assert torch.equal(narrow(f.get_slice("matrix"), 0, 2, 3), written["matrix"][2:5])
        assert torch.equal(narrow(f.get_slice("matrix"), 1, 1, 2), written["matrix"][:, 1:3])
