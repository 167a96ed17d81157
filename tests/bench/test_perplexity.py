"""fuselm bench perplexity: windows, variants, and a run whose perplexity equals transformers'
teacher-forced one on the same windows of the packaged text."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch
from bench_helpers import parse_bench_args

from fuselm.bench import perplexity


def test_windows_cover_the_text_and_stop_at_the_budget():
    ids = list(range(10))
    assert perplexity.windows(ids, 4, None) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert perplexity.windows(ids, 4, 3) == [[0, 1, 2, 3]]
    assert perplexity.windows(list(range(9)), 4, None) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(SystemExit, match="--window"):
        perplexity.windows(ids, 1, None)


def test_variants_refused_by_name_and_applied():
    with pytest.raises(SystemExit, match="'fp4'"):
        perplexity.parse_variants("base,fp4")
    from fuselm.config import EngineConfig

    cfg = EngineConfig(model="x")
    assert perplexity.variant_config(cfg, "int4").quantization == "int4"
    assert perplexity.variant_config(cfg, "kv-fp8").cache.kv_cache_dtype == "fp8"
    gptq = perplexity.variant_config(cfg, "fp8-gptq")
    assert (gptq.quantization, gptq.quantization_calibration) == ("fp8", "gptq")
    assert perplexity.variant_config(cfg, "base") is cfg


def test_packaged_text_and_gz_files(tmp_path):
    text = perplexity.read_text("shakespeare")
    assert text.startswith("First Citizen:") and len(text) > 180_000
    path = tmp_path / "t.txt.gz"
    path.write_bytes(gzip.compress(b"to be or not to be"))
    assert perplexity.read_text(str(path)) == "to be or not to be"
    with pytest.raises(SystemExit, match="no such file"):
        perplexity.read_text(str(tmp_path / "missing.txt"))


def test_perplexity_equals_transformers(default_llm, hf_default_model, tmp_path):
    out = tmp_path / "ppl.json"
    args = parse_bench_args(perplexity, ["shakespeare", "--window", "96",
                                         "--max-scored-tokens", "300", "--output-json",
                                         str(out)], llm=default_llm)
    perplexity.run(args)
    data = json.loads(out.read_text())["variants"][0]
    ids = default_llm.engine.tokenizer.encode(perplexity.read_text("shakespeare"),
                                              add_special_tokens=False)
    nll, n = 0.0, 0
    with torch.inference_mode():
        for window in perplexity.windows(ids, 96, 300):
            logits = hf_default_model(torch.tensor([window])).logits[0].double()
            logprobs = torch.log_softmax(logits, dim=-1)
            for pos in range(1, len(window)):
                nll -= float(logprobs[pos - 1, window[pos]])
                n += 1
    assert data["scored_tokens"] == n >= 300
    assert math.isclose(data["nll"], nll / n, abs_tol=1e-4)
    assert math.isclose(data["perplexity"], math.exp(nll / n), rel_tol=1e-4)
