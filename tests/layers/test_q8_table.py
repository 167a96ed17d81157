"""A vocabulary table kept in Q8_0 blocks on the CPU: its rows against ``gguf.quants``'
dequantization, its logits against a float64 matmul, and the embedding / tied LM head that use
it against the same modules holding the dequantized float32 table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fuselm.layers import q8_table
from fuselm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from fuselm.loading.gguf import QuantizedTensor

gguf = pytest.importorskip("gguf")


def _q8_0_table(rows: int, dim: int, seed: int) -> tuple[QuantizedTensor, torch.Tensor]:
    """Random rows quantized to Q8_0 by gguf's own quantizer, and gguf's dequantization."""
    values = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    blocks = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
    want = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)
    return (QuantizedTensor("Q8_0", torch.from_numpy(blocks.copy()), (rows, dim)),
            torch.from_numpy(want.copy()).reshape(rows, dim))


def test_rows_equal_gguf_dequantization_exactly():
    table, want = _q8_0_table(37, 96, seed=1)
    values, scales = q8_table.from_q8_0_blocks(table.data, 37, 96)
    assert values.dtype == torch.int8 and scales.shape == (37, 3)
    torch.testing.assert_close(q8_table.dequantize_rows(values, scales), want, atol=0, rtol=0)
    ids = torch.tensor([36, 0, 5, 5, 17])
    torch.testing.assert_close(q8_table.lookup(ids, values, scales), want[ids], atol=0, rtol=0)


@pytest.mark.parametrize("chunk", [7, 1024], ids=["ragged-chunks", "one-chunk"])
def test_logits_match_float64(chunk):
    table, want = _q8_0_table(53, 64, seed=2)
    values, scales = q8_table.from_q8_0_blocks(table.data, 53, 64)
    hidden = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    got = q8_table.logits(hidden, values, scales, chunk=chunk)
    torch.testing.assert_close(got.double(), hidden.double() @ want.double().T,
                               atol=1e-4, rtol=1e-5)


def test_width_not_a_multiple_of_the_block_is_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        q8_table.from_q8_0_blocks(torch.zeros(2, 34, dtype=torch.uint8), 2, 48)


@pytest.mark.parametrize("keep", [True, False], ids=["kept-q8", "dequantized"])
def test_tied_embedding_and_head_from_a_q8_0_table(keep):
    table, want = _q8_0_table(50, 64, seed=4)
    embedding = VocabParallelEmbedding(50, 64)
    head = ParallelLMHead(50, 64)
    head.tie_to(embedding)
    embedding.keep_q8_table = keep
    embedding.weight.weight_loader(embedding.weight, table)
    assert embedding.weight.dtype == (torch.int8 if keep else torch.float32)
    assert head.weight is embedding.weight
    ids = torch.tensor([49, 3, 0, 3])
    torch.testing.assert_close(embedding(ids), want[ids], atol=0, rtol=0)
    hidden = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    reference = hidden.double() @ want.double().T
    torch.testing.assert_close(head(hidden).double(), reference, atol=1e-4, rtol=1e-5)
    buffer = torch.full((5, 50), float("nan"))
    head(hidden, buffer[:3])
    torch.testing.assert_close(buffer[:3].double(), reference, atol=1e-4, rtol=1e-5)
    assert buffer[3:].isnan().all()


def test_a_q8_0_table_of_the_wrong_shape_is_refused():
    table, _ = _q8_0_table(40, 64, seed=6)
    embedding = VocabParallelEmbedding(50, 64)
    embedding.keep_q8_table = True
    with pytest.raises(ValueError, match=r"shape \(40, 64\), expected \(50, 64\)"):
        embedding.weight.weight_loader(embedding.weight, table)


def test_the_default_model_keeps_its_q8_0_table(default_llm):
    """The default GGUF's tied table (Q8_0 in the file) stays int8 on the CPU engine, and the
    engine still answers (its logits against transformers: tests/models)."""
    model = default_llm.engine.runner.model
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.embed_tokens.weight.dtype == torch.int8
    assert model.embed_tokens.weight.q8_scales.shape == (49152, 576 // 32)
    assert default_llm.generate(["The capital of France is"])[0].outputs[0].text.strip()
