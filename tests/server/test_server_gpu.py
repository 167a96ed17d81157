"""Acceptance 4 of issue #20 on a GPU: `fuselm serve` at the Llama-3-8B shape with dummy weights
under `fuselm bench serve` (random 512 in / 128 out, request rates 8, 32 and inf): no failed
request; the batch-1 inter-token latency through HTTP is printed beside the engine's own
(the lead's A/B compares it with the in-process step time of the same call)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    """This tree's sources first, what the caller's PYTHONPATH holds after (carried wheels)."""
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path)


def _serve(model_dir: Path) -> tuple[subprocess.Popen, str]:
    env = _env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fuselm", "serve", str(model_dir), "--load-format", "dummy",
         "--port", "0", "--disable-log-requests", "--uvicorn-log-level", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            print(line, end="")
            match = re.search(r"listening on (http://\S+)", line)
            if match and not found:
                found.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(900) or not found:
        proc.kill()
        raise RuntimeError("fuselm serve did not start")
    return proc, found[0]


def test_8b_dummy_serve_under_bench_serve(tmp_path: Path) -> None:
    from fuselm.bench.dummy_model import write_dummy_checkpoint

    model_dir = write_dummy_checkpoint("llama-3-8b", tmp_path / "llama-3-8b")
    proc, url = _serve(model_dir)
    try:
        env = _env()
        for argv in (["--request-rate", "8", "32", "inf", "--num-prompts", "200"],
                     ["--max-concurrency", "1", "--num-prompts", "20"]):
            out = tmp_path / "bench.json"
            subprocess.run([sys.executable, "-m", "fuselm", "bench", "serve", "--base-url", url,
                            "--random-input-len", "512", "--random-output-len", "128",
                            "--ignore-eos", "--disable-tqdm", "--output-json", str(out),
                            "--save-result", "--result-dir", str(tmp_path), *argv],
                           cwd=ROOT, env=env, check=True, timeout=1200)
            result = json.loads(out.read_text())
            for run in result["runs"]:
                print(run["request_rate"], run["max_concurrency"], run["completed"],
                      run["failed"], "ITL ms", json.dumps(run["itl_ms"]), "TPOT ms",
                      json.dumps(run["tpot_ms"]))
                assert run["failed"] == 0, run["errors"]
                assert run["total_output_tokens"] == run["completed"] * 128
    finally:
        proc.terminate()
        proc.wait(60)


def test_health_stays_200_for_60_s_under_the_defect_1_load(tmp_path: Path) -> None:
    """Defect 1's repro at full size: 40 concurrent n=16 completions of 64 prompts while
    /health is polled for 60 s: every probe 200 (requests get 200, or 429 when the queue is
    full, never 503)."""
    import asyncio
    import time

    import httpx

    from fuselm.bench.dummy_model import write_dummy_checkpoint

    model_dir = write_dummy_checkpoint("llama-3-8b", tmp_path / "llama-3-8b")
    proc, url = _serve(model_dir)

    async def run() -> tuple[set[int], set[int]]:
        health: set[int] = set()
        answers: set[int] = set()
        body = {"prompt": [f"prompt {i}" for i in range(64)], "n": 16, "max_tokens": 16,
                "temperature": 1.0, "ignore_eos": True}
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            end = time.monotonic() + 60

            async def load() -> None:
                while time.monotonic() < end:
                    answers.add((await client.post("/v1/completions", json=body)).status_code)

            async def poll() -> None:
                while time.monotonic() < end:
                    health.add((await client.get("/health")).status_code)
                    await asyncio.sleep(0.1)

            await asyncio.gather(poll(), *(load() for _ in range(40)))
        return health, answers

    try:
        health, answers = asyncio.run(run())
    finally:
        proc.terminate()
        proc.wait(60)
    assert health == {200}, health
    assert answers <= {200, 429}, answers
