"""fuselm bench serve: SSE parsing, arrivals and metrics against a fake OpenAI server, then a
short run against our own server (zero failed requests)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from bench_helpers import assert_png, parse_bench_args
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

import fuselm
from fuselm.bench import serving
from fuselm.bench.serving import RequestResult


def fake_app(fail_every: int = 0) -> Starlette:
    """/v1/models and a streaming /v1/completions that sends max_tokens one-word chunks;
    every ``fail_every``-th request answers 500."""
    count = {"n": 0}

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "fake-model"}]})

    async def completions(request: Request):
        body = await request.json()
        count["n"] += 1
        if fail_every and count["n"] % fail_every == 0:
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        assert body["stream"] and body["model"] == "fake-model"

        async def gen():
            for i in range(body["max_tokens"]):
                await asyncio.sleep(0.001)
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': f' w{i}'}]})}\n\n"
            usage = {"prompt_tokens": 5, "completion_tokens": body["max_tokens"]}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models),
                             Route("/v1/completions", completions, methods=["POST"])])


def test_parse_goodput():
    assert serving.parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    with pytest.raises(ValueError):
        serving.parse_goodput(["latency:5"])


def test_compute_metrics_and_goodput():
    a = RequestResult(success=True, prompt_tokens=10, output_tokens=5, ttft=0.1, latency=0.5,
                      itl=[0.1] * 4)
    b = RequestResult(success=True, prompt_tokens=10, output_tokens=3, ttft=0.4, latency=0.6,
                      itl=[0.1, 0.1])
    c = RequestResult(error="HTTP 500: boom")
    m = serving.compute_metrics([a, b, c], duration=2.0, slos={"ttft": 200, "tpot": 150})
    assert m["completed"] == 2 and m["failed"] == 1 and m["errors"] == ["HTTP 500: boom"]
    assert m["output_throughput"] == 4.0 and m["request_throughput"] == 1.0
    assert a.tpot == pytest.approx(0.1) and b.tpot == pytest.approx(0.1)
    assert m["goodput"] == 0.5  # only a meets TTFT <= 200 ms
    assert m["ttft_ms"]["median"] == pytest.approx(250.0)
    assert m["itl_ms"]["mean"] == pytest.approx(100.0)


@pytest.mark.parametrize("burstiness", [1.0, 0.5])
def test_arrivals_have_the_requested_mean_rate(monkeypatch, burstiness):
    waits = []

    async def fake_sleep(s):
        waits.append(s)

    monkeypatch.setattr(serving.asyncio, "sleep", fake_sleep)

    async def collect():
        return [i async for i in serving.arrivals(2001, 50.0, burstiness,
                                                  np.random.default_rng(0))]

    assert asyncio.run(collect()) == list(range(2001))
    assert len(waits) == 2000 and np.mean(waits) == pytest.approx(1 / 50, rel=0.1)
    # gamma(k): coefficient of variation 1/sqrt(k): burstier arrivals for k < 1
    assert np.std(waits) / np.mean(waits) == pytest.approx(1 / burstiness ** 0.5, rel=0.15)


def _fake_args(tmp_path: Path, *extra: str, fail_every: int = 0):
    args = parse_bench_args(serving, [
        "--base-url", "http://fake", "--num-prompts", "6", "--input-len", "4",
        "--output-len", "3", "--disable-tqdm", "--output-json", str(tmp_path / "s.json"),
        *extra], engine=False)
    args.transport = httpx.ASGITransport(app=fake_app(fail_every))
    return args


def test_run_against_fake_server(tmp_path):
    args = _fake_args(tmp_path, "--request-rate", "200", "inf", "--max-concurrency", "2",
                      "--goodput", "ttft:10000", "--plot", str(tmp_path / "s.png"))
    result = serving.run(args)
    assert result["model"] == "fake-model" and len(result["runs"]) == 2
    for run in result["runs"]:
        assert run["completed"] == 6 and run["failed"] == 0
        assert run["total_output_tokens"] == 18 and run["total_input_tokens"] == 30
        assert len(run["itl_samples_ms"]) == 6 * 2 and run["goodput"] > 0
    assert result["runs"][0]["request_rate"] == 200 and result["runs"][1]["request_rate"] is None
    assert json.loads((tmp_path / "s.json").read_text())["runs"][0]["completed"] == 6
    assert_png(tmp_path / "s.png")


def test_failures_are_counted_not_raised(tmp_path):
    args = _fake_args(tmp_path, fail_every=3)  # the probe is request 1; 3 and 6 fail
    run = serving.run(args)["runs"][0]
    assert run["failed"] == 2 and run["completed"] == 4
    assert run["errors"] and run["errors"][0].startswith("HTTP 500")


@pytest.fixture(scope="module")
def our_server():
    """``fuselm.server.launcher.serve`` on the default model in a subprocess, on a free port."""
    code = ("from fuselm.config import CacheConfig, EngineConfig, SchedulerConfig\n"
            "from fuselm.server.launcher import serve\n"
            "serve(EngineConfig(device='cpu', cache=CacheConfig(cpu_kv_cache_gib=0.25),"
            " scheduler=SchedulerConfig(max_model_len=2048)), port=0, log_level='warning')\n")
    env = dict(os.environ, PYTHONPATH=str(Path(fuselm.__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        url = None
        for line in proc.stdout:  # type: ignore[union-attr]
            if "listening on" in line:
                url = line.strip().split()[-1]
                break
        if url is None:
            pytest.fail(f"the server did not start (exit {proc.wait(timeout=30)})")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.timeout(240)
def test_bench_serve_against_our_server(our_server, tmp_path):
    out = tmp_path / "serve.json"
    args = parse_bench_args(serving, [
        "--base-url", our_server, "--num-prompts", "4", "--input-len", "6", "--output-len", "3",
        "--request-rate", "20", "--ignore-eos", "--disable-tqdm", "--output-json", str(out),
        "--plot", str(tmp_path / "serve.png")], engine=False)
    result = serving.run(args)
    run = result["runs"][0]
    assert run["failed"] == 0 and run["completed"] == 4, run["errors"]
    assert run["total_output_tokens"] == 12 and run["ttft_ms"]["median"] > 0
    assert json.loads(out.read_text())["runs"][0]["failed"] == 0
    assert_png(tmp_path / "serve.png")
