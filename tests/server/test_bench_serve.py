"""`fuselm bench serve` as a `vllm bench serve` user runs it, against our server (fake engine):
it waits for a server that starts late, names a server that never comes, runs the completions
and chat backends on random (exact token lengths), ShareGPT JSON and JSONL datasets, and
`--save-result` writes vLLM's keys."""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fake_engine import FakeEngine
from server_harness import LiveServer

from fuselm.bench import serving
from fuselm.bench.dummy_model import write_dummy_checkpoint
from fuselm.server.api import build_app

pytestmark = pytest.mark.timeout(120)

# The keys of `vllm bench serve --save-result` (vllm/benchmarks/serve.py).
VLLM_KEYS = {
    "date", "backend", "model_id", "tokenizer_id", "num_prompts", "request_rate",
    "burstiness", "max_concurrency", "duration", "completed", "total_input_tokens",
    "total_output_tokens", "request_throughput", "request_goodput", "output_throughput",
    "total_token_throughput", "input_lens", "output_lens", "ttfts", "itls", "generated_texts",
    "errors",
    *(f"{stat}_{metric}_ms" for stat in ("mean", "median", "std", "p99")
      for metric in ("ttft", "tpot", "itl", "e2el")),
}


def _args(url: str, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serving.add_arguments(parser)
    return parser.parse_args(["--base-url", url, "--num-prompts", "4", "--disable-tqdm",
                              "--random-input-len", "12", "--random-output-len", "5",
                              "--ignore-eos", *extra])


def test_waits_for_a_server_that_starts_late_and_saves_vllms_keys(tmp_path: Path) -> None:
    server = LiveServer(build_app(FakeEngine(max_model_len=512)))  # bound, not listening yet
    timer = threading.Timer(10.0, server.start)
    timer.start()
    try:
        start = time.monotonic()
        result = serving.run(_args(server.url, "--save-result", "--result-dir", str(tmp_path),
                                   "--result-filename", "r.json", "--request-rate", "50"))
        assert time.monotonic() - start >= 9.5
    finally:
        timer.join()
        server.stop()
    run = result["runs"][0]
    assert run["completed"] == 4 and run["failed"] == 0, run["errors"]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert VLLM_KEYS <= set(saved), VLLM_KEYS - set(saved)
    assert saved["completed"] == 4 and saved["backend"] == "openai"
    assert saved["input_lens"] == [12] * 4, "random prompts of exact token lengths"
    assert saved["output_lens"] == [5] * 4 and all(saved["generated_texts"])
    assert saved["model_id"] == "fake-model" and saved["mean_ttft_ms"] > 0


def test_a_server_that_never_comes_is_named_in_one_line() -> None:
    server = LiveServer(build_app(FakeEngine()))  # bound, never started: connection refused
    try:
        with pytest.raises(SystemExit) as info:
            serving.run(_args(server.url, "--ready-check-timeout-sec", "1"))
    finally:
        server.sock.close()
    message = str(info.value)
    assert server.url in message and "not ready after 1 s" in message
    assert "\n" not in message


def test_chat_backend_and_sharegpt_datasets(fake_server: Any, tmp_path: Path) -> None:
    conversations = [{"conversations": [{"from": "human", "value": f"question {i}"},
                                        {"from": "gpt", "value": "one two three"}]}
                     for i in range(6)]
    as_json = tmp_path / "sharegpt.json"
    as_json.write_text(json.dumps(conversations))
    as_jsonl = tmp_path / "sharegpt.jsonl"
    as_jsonl.write_text("\n".join(json.dumps(c) for c in conversations))
    for backend in ("openai", "openai-chat"):
        for path in (as_json, as_jsonl):
            result = serving.run(_args(fake_server.url, "--backend", backend,
                                       "--dataset-name", "sharegpt", "--dataset-path",
                                       str(path)))
            run = result["runs"][0]
            assert run["completed"] == 4 and run["failed"] == 0, run["errors"]
            assert run["total_output_tokens"] == 4 * 3  # the words of each reply
    assert result["endpoint"] == "/v1/chat/completions"
    chat = serving.run(_args(fake_server.url, "--backend", "openai-chat"))["runs"][0]
    assert chat["completed"] == 4 and chat["total_output_tokens"] == 4 * 5


def test_dummy_tokenizer_decodes_the_whole_vocabulary(tmp_path: Path) -> None:
    """With dummy weights any id can be sampled: each of the 8B shape's 128256 ids decodes to
    text (the byte tokenizer alone decoded none above 257)."""
    from tokenizers import Tokenizer

    path = write_dummy_checkpoint("llama-3-8b", tmp_path / "m")
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert tok.get_vocab_size() == 128256
    ids = [258, 1000, 65535, 128255]
    texts = [tok.decode([i]) for i in ids]
    assert all(t.startswith(" w") and len(t) > 2 for t in texts)
    assert len(set(texts)) == len(ids)
    assert tok.token_to_id("<s>") == 256 and tok.token_to_id("</s>") == 257
    assert tok.decode(tok.encode("héllo").ids) == "héllo"  # bytes still round-trip
