"""vocab_embedding (a tensor-parallel rank's masked embedding lookup): every backend against a
row-by-row reference written out here."""

from __future__ import annotations

import pytest
import torch
from tolerances import count_cuda_kernels

from fuselm.kernels import KernelSet, available_backends
from fuselm.kernels import vocab_embedding as ve

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _expected(ids, weight, start):
    out = torch.zeros(ids.shape[0], weight.shape[1], dtype=weight.dtype)
    for t, i in enumerate(ids.tolist()):
        if start <= i < start + weight.shape[0]:
            out[t] = weight[i - start].cpu()
    return out.to(weight.device)


def _impls():
    yield "reference", ve.vocab_embedding_ref
    if "triton" in available_backends("vocab_embedding"):
        yield "triton", torch.ops.fuselm.vocab_embedding


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,dim,start", [(50, 64, 0), (37, 100, 37), (20, 4200, 60)])
def test_masked_lookup_matches_rows(dtype, rows, dim, start):
    g = torch.Generator().manual_seed(rows + dim)
    weight = torch.randn(rows, dim, generator=g).to(dtype).to(DEVICE)
    ids = torch.randint(0, start + rows + 30, (9,), generator=g).to(DEVICE)
    ids[0], ids[1] = start, start + rows - 1  # both ends of the range
    if start:
        ids[2] = start - 1  # just below it
    ids[3] = start + rows  # just above it
    want = _expected(ids, weight, start)
    for name, fn in _impls():
        assert torch.equal(fn(ids, weight, start), want), name


def test_strided_weight_rows_empty_ids_and_bad_input():
    if "triton" not in available_backends("vocab_embedding"):
        pytest.skip("triton backend of vocab_embedding not available here")
    wide = torch.randn(30, 96, device=DEVICE)
    weight = wide[:, 16:80]  # rows 96 apart
    ids = torch.tensor([3, 40, 29, -1], device=DEVICE)
    assert torch.equal(torch.ops.fuselm.vocab_embedding(ids, weight, 0),
                       _expected(ids, weight, 0))
    empty = torch.ops.fuselm.vocab_embedding(ids[:0], weight, 0)
    assert empty.shape == (0, 64)
    torch.library.opcheck(torch.ops.fuselm.vocab_embedding.default, (ids, weight.contiguous(), 5))
    with pytest.raises(ValueError, match="int64"):
        ve.vocab_embedding_triton(ids.int(), weight, 0)
    with pytest.raises(ValueError, match="contiguous"):
        ve.vocab_embedding_triton(ids, weight.t(), 0)


@pytest.mark.gpu
def test_gpu_bf16_llama3_shard_one_launch():
    if "triton" not in available_backends("vocab_embedding"):
        pytest.skip("triton backend of vocab_embedding not available here")
    weight = torch.randn(64128, 4096, dtype=torch.bfloat16, device=DEVICE)
    ids = torch.tensor([5, 64127, 64128, 128000], device=DEVICE)
    out = torch.ops.fuselm.vocab_embedding(ids, weight, 64128)
    assert torch.equal(out, _expected(ids, weight, 64128))
    assert count_cuda_kernels(torch.ops.fuselm.vocab_embedding.default, ids, weight, 0) == 1


def test_tp_embedding_shards_sum_to_the_full_lookup(monkeypatch):
    """Three simulated tensor-parallel ranks of VocabParallelEmbedding (vocabulary 100, padded to
    102) with each backend bound: their outputs, summed as the all-reduce would, equal the full
    table's lookup."""
    from fuselm.layers.embedding import VocabParallelEmbedding
    from fuselm.parallel import comm
    from fuselm.parallel import parallel_state as ps

    full = torch.randn(100, 24, device=DEVICE)
    ids = torch.tensor([0, 33, 34, 67, 68, 99, 5], device=DEVICE)
    monkeypatch.setattr(comm, "tp_all_reduce", lambda x: x)
    for backend in ["reference"] + (["triton"] if "triton" in available_backends(
            "vocab_embedding") else []):
        total = torch.zeros(ids.shape[0], 24, device=DEVICE)
        for rank in range(3):
            monkeypatch.setattr(ps, "get_tp_rank", lambda r=rank: r)
            monkeypatch.setattr(ps, "get_tp_size", lambda: 3)
            emb = VocabParallelEmbedding(100, 24, kernels=KernelSet(backend, DEVICE)).to(DEVICE)
            emb.weight_loader(emb.weight, full)
            expected = (ve.vocab_embedding_ref if backend == "reference"
                        else torch.ops.fuselm.vocab_embedding.default)
            assert emb._lookup.fn is expected
            total += emb(ids)
        assert torch.equal(total, full[ids]), backend
