"""``fuselm bench serve``: a load generator against any OpenAI-compatible server.

Sends streaming ``/v1/completions`` requests (httpx, asyncio) with Poisson or gamma arrivals at
``--request-rate`` req/s (``inf``: all at once; ``--burstiness`` is the gamma shape, 1 = Poisson),
optionally capped at ``--max-concurrency`` in flight. Several rates sweep one after the other.
Per request, from the client side: TTFT (first non-empty text chunk), ITL (gaps between chunks),
TPOT ((end-to-end - TTFT) / (output tokens - 1)), end-to-end latency; token counts come from the
server's ``usage`` (``stream_options.include_usage``), else from chunk counts. Goodput counts the
requests per second that meet every SLO given by ``--goodput ttft:ms tpot:ms e2el:ms``.
Metric names follow vLLM's ``benchmark_serving.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fuselm.bench import plots, report
from fuselm.bench.throughput import BenchRequest, lengths, load_jsonl

NAME = "serve"
SLO_KEYS = ("ttft", "tpot", "e2el")
# Common English words that most BPE vocabularies hold as one token (with the leading space):
# random text of N words is about N prompt tokens; the server's usage gives the exact count.
_WORDS = ("the of and to in is was for on that with as by at from his it an were are which "
          "this be or has had not but first one their its new after who they have her she two "
          "been other when there all during into school time may years more most only over city "
          "some world would where later up such used many can state about national out known "
          "university united then made").split()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fuselm bench serve`` (vLLM's benchmark_serving names)."""
    a = parser.add_argument
    a("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    a("--endpoint", default="/v1/completions")
    a("--model", default=None, help="model name to send; default: the first of GET /v1/models")
    a("--api-key", default=None, help="sent as a Bearer token")
    a("--num-prompts", type=int, default=100)
    a("--input-len", type=int, default=32, help="prompt words of a random request")
    a("--output-len", type=int, default=32, help="max_tokens of a request")
    a("--random-range-ratio", type=float, default=0.0)
    a("--dataset", default=None, help="JSONL of {prompt | prompt_token_ids, output_len?}")
    a("--request-rate", type=float, nargs="+", default=[math.inf],
      help="requests/s (several values sweep); inf sends all at once")
    a("--burstiness", type=float, default=1.0, help="gamma shape of arrivals; 1 = Poisson")
    a("--max-concurrency", type=int, default=None, help="most requests in flight")
    a("--goodput", nargs="*", default=[], help="SLOs as key:ms, keys ttft, tpot, e2el")
    a("--ignore-eos", action="store_true", help="send ignore_eos (vLLM extension)")
    a("--seed", type=int, default=0)
    a("--timeout", type=float, default=600.0, help="seconds per request")
    a("--output-json", default=None)
    a("--plot", default=None, help="write throughput/latency vs rate and distributions (PNG)")
    a("--disable-tqdm", action="store_true")


@dataclass
class RequestResult:
    """What the client saw of one request."""

    success: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def parse_goodput(items: list[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos = {}
    for item in items:
        key, _, value = item.partition(":")
        if key not in SLO_KEYS or not value:
            raise ValueError(f"--goodput takes key:ms with key in {SLO_KEYS}, not {item!r}")
        slos[key] = float(value)
    return slos


def random_text_requests(num: int, input_len: int, output_len: int, ratio: float,
                         seed: int) -> list[BenchRequest]:
    """``num`` prompts of about ``input_len`` random common words."""
    if min(num, input_len, output_len) < 1:
        raise ValueError("--num-prompts, --input-len and --output-len must be at least 1")
    rng = np.random.default_rng(seed)
    ins = lengths(input_len, ratio, num, rng)
    outs = lengths(output_len, ratio, num, rng)
    return [BenchRequest(" ".join(rng.choice(_WORDS, size=n)), o)
            for n, o in zip(ins, outs, strict=True)]


async def arrivals(n: int, rate: float, burstiness: float,
                   rng: np.random.Generator) -> AsyncIterator[int]:
    """Yields 0..n-1, sleeping gamma(shape=burstiness, mean=1/rate) seconds between them."""
    for i in range(n):
        yield i
        if math.isinf(rate) or i == n - 1:
            continue
        await asyncio.sleep(float(rng.gamma(burstiness, 1.0 / (rate * burstiness))))


def _payload(model: str, req: BenchRequest, ignore_eos: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len,
                            "temperature": 0.0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def _apply_chunk(obj: dict[str, Any], r: RequestResult, start: float, last: float) -> float:
    """Updates ``r`` from one SSE chunk; returns the time of the latest text chunk."""
    if obj.get("error"):
        raise RuntimeError(str(obj["error"])[:300])
    usage = obj.get("usage")
    if usage:
        r.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        r.output_tokens = int(usage.get("completion_tokens") or 0)
    choices = obj.get("choices") or []
    if not choices or not choices[0].get("text"):
        return last
    now = time.perf_counter()
    if r.ttft == 0.0:
        r.ttft = now - start
    else:
        r.itl.append(now - last)
    return now


async def send_request(client: Any, url: str, body: dict[str, Any],
                       headers: dict[str, str]) -> RequestResult:
    """One streaming completion; failures are recorded in the result, never raised."""
    r = RequestResult()
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                r.error = f"HTTP {resp.status_code}: {text[:300]}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                prev = last
                last = _apply_chunk(json.loads(data), r, start, last)
                chunks += last != prev
        r.latency = last - start
        r.output_tokens = r.output_tokens or chunks
        r.success = chunks > 0
        r.error = "" if r.success else "no text in the stream"
    except Exception as exc:  # noqa: BLE001  (a failed request is a result, not a crash)
        r.error = f"{type(exc).__name__}: {exc}"[:300]
    return r


def compute_metrics(results: list[RequestResult], duration: float,
                    slos: dict[str, float]) -> dict[str, Any]:
    """Aggregates of one run (times in ms, throughputs per second)."""
    ok = [r for r in results if r.success]
    num_in = sum(r.prompt_tokens for r in ok)
    num_out = sum(r.output_tokens for r in ok)
    ttft = [r.ttft for r in ok]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    itl = [x for r in ok for x in r.itl]
    e2el = [r.latency for r in ok]
    good = None
    if slos:
        def meets(r: RequestResult) -> bool:
            vals = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
            return all(vals[k] * 1e3 <= v for k, v in slos.items())
        good = sum(meets(r) for r in ok) / duration
    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration, "total_input_tokens": num_in, "total_output_tokens": num_out,
        "request_throughput": len(ok) / duration, "output_throughput": num_out / duration,
        "total_token_throughput": (num_in + num_out) / duration, "goodput": good,
        "ttft_ms": report.summarize(ttft, 1e3), "tpot_ms": report.summarize(tpot, 1e3),
        "itl_ms": report.summarize(itl, 1e3), "e2el_ms": report.summarize(e2el, 1e3),
        "ttft_samples_ms": [x * 1e3 for x in ttft], "itl_samples_ms": [x * 1e3 for x in itl],
    }


def _client(args: argparse.Namespace) -> Any:
    import httpx

    # trust_env=False: a proxy from the environment must not sit between us and a local server;
    # ``args.transport`` (not a flag) lets tests talk to an in-process ASGI app
    return httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), trust_env=False,
                             transport=getattr(args, "transport", None),
                             limits=httpx.Limits(max_connections=None,
                                                 max_keepalive_connections=None))


def _headers(args: argparse.Namespace) -> dict[str, str]:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


async def discover_model(args: argparse.Namespace) -> str:
    """``--model``, or the first model the server lists at /v1/models."""
    if args.model:
        return args.model
    async with _client(args) as client:
        resp = await client.get(args.base_url.rstrip("/") + "/v1/models", headers=_headers(args))
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]


async def benchmark(args: argparse.Namespace, requests: list[BenchRequest], model: str,
                    rate: float, slos: dict[str, float]) -> dict[str, Any]:
    """One run at one request rate."""
    from tqdm import tqdm

    url = args.base_url.rstrip("/") + args.endpoint
    limit = (asyncio.Semaphore(args.max_concurrency) if args.max_concurrency
             else contextlib.nullcontext())
    bar = tqdm(total=len(requests), desc=f"rate {rate}", disable=args.disable_tqdm, leave=False)
    rng = np.random.default_rng(args.seed)

    async def one(client: Any, req: BenchRequest) -> RequestResult:
        async with limit:
            res = await send_request(client, url, _payload(model, req, args.ignore_eos), headers)
        bar.update(1)
        return res

    headers = _headers(args)
    async with _client(args) as client:
        start = time.perf_counter()
        tasks = [asyncio.create_task(one(client, requests[i]))
                 async for i in arrivals(len(requests), rate, args.burstiness, rng)]
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    metrics = compute_metrics(list(results), duration, slos)
    return {"request_rate": None if math.isinf(rate) else rate,
            "max_concurrency": args.max_concurrency, "burstiness": args.burstiness, **metrics}


def _row(run: dict[str, Any]) -> dict[str, Any]:
    return {"rate": run["request_rate"] if run["request_rate"] is not None else "inf",
            "conc": run["max_concurrency"] or "-", "done": run["completed"],
            "failed": run["failed"], "sec": run["duration_s"], "req/s": run["request_throughput"],
            "out tok/s": run["output_throughput"], "TTFT p50": run["ttft_ms"]["median"],
            "TTFT p99": run["ttft_ms"]["p99"], "TPOT p50": run["tpot_ms"]["median"],
            "TPOT p99": run["tpot_ms"]["p99"], "ITL p50": run["itl_ms"]["median"],
            "ITL p99": run["itl_ms"]["p99"], "E2E p50": run["e2el_ms"]["median"],
            "E2E p99": run["e2el_ms"]["p99"], "goodput": run["goodput"]}


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    slos = parse_goodput(args.goodput)
    if args.dataset:
        requests = load_jsonl(args.dataset, args.num_prompts, args.output_len)
    else:
        requests = random_text_requests(args.num_prompts, args.input_len, args.output_len,
                                        args.random_range_ratio, args.seed)
    model = await discover_model(args)
    async with _client(args) as client:  # one request first: fail fast on a wrong URL
        url = args.base_url.rstrip("/") + args.endpoint
        probe = await send_request(client, url, _payload(model, requests[0], args.ignore_eos),
                                   _headers(args))
    if not probe.success:
        raise RuntimeError(f"the test request to {url} failed: {probe.error}")
    runs = [await benchmark(args, requests, model, rate, slos) for rate in args.request_rate]
    return {"bench": NAME, "env": report.environment(), "base_url": args.base_url,
            "endpoint": args.endpoint, "model": model, "num_prompts": len(requests),
            "goodput_slos_ms": slos, "runs": runs}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every request rate; prints the table, writes JSON and (with --plot) the PNG."""
    result = asyncio.run(_main(args))
    table = report.format_table([_row(r) for r in result["runs"]])
    table += "\n(times in ms; goodput in requests/s meeting every SLO)"
    return report.finish(args, result, table, plots.plot_serving)
