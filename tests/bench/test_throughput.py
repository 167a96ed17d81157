"""fuselm bench throughput: request generation, metrics, and a tiny run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from bench_helpers import assert_png, parse_bench_args

from fuselm.bench import throughput


def test_random_lengths_stay_in_range():
    rng = np.random.default_rng(0)
    xs = throughput.lengths(100, 0.5, 200, rng)
    assert min(xs) >= 50 and max(xs) <= 150 and len(set(xs)) > 10
    assert throughput.lengths(7, 0.0, 5, rng) == [7] * 5
    with pytest.raises(ValueError):
        throughput.lengths(7, 1.5, 5, rng)


def test_random_requests_shapes():
    reqs = throughput.random_requests(4, 6, 3, 0.0, vocab_size=500, seed=1)
    assert [len(r.prompt) for r in reqs] == [6] * 4 and {r.output_len for r in reqs} == {3}
    with pytest.raises(ValueError):
        throughput.random_requests(0, 6, 3, 0.0, 500, 1)


def test_load_jsonl(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hello there", "output_len": 5}\n\n'
                 '{"prompt_token_ids": [1, 2, 3]}\n{"prompt": "third"}\n')
    reqs = throughput.load_jsonl(f, num=2, default_output_len=9)
    assert [(r.prompt, r.output_len) for r in reqs] == [("hello there", 5), ([1, 2, 3], 9)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError):
        throughput.load_jsonl(bad, None, 1)


def test_request_metrics_from_engine_metrics():
    outs = [SimpleNamespace(metrics={"arrival_time": 1.0, "first_token_time": 1.5,
                                     "finished_time": 3.0}),
            SimpleNamespace(metrics={"arrival_time": 2.0})]
    assert throughput.request_metrics(outs) == {"ttft_s": [0.5], "e2e_s": [2.0]}


def test_throughput_run(default_llm, tmp_path):
    data_file = tmp_path / "prompts.jsonl"
    data_file.write_text('{"prompt": "Tell me a story", "output_len": 3}\n'
                         '{"prompt_token_ids": [100, 200, 300, 400], "output_len": 2}\n')
    out, png = tmp_path / "thr.json", tmp_path / "thr.png"
    args = parse_bench_args(throughput, [
        "--dataset", str(data_file), "--num-prompts", "2", "--num-warmup", "0",
        "--disable-tqdm", "--disable-detokenize", "--output-json", str(out), "--plot", str(png)],
        llm=default_llm)
    throughput.run(args)
    data = json.loads(out.read_text())
    assert data["num_prompts"] == 2 and data["output_tokens"] == 5
    assert data["requests_per_s"] > 0 and data["output_tokens_per_s"] > 0
    assert data["input_tokens"] >= 4 + 3
    assert len(data["requests"]["ttft_s"]) == 2 and data["env"]["python"]
    assert_png(png)
