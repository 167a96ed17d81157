"""``fuselm bench serve``: a load generator against any OpenAI-compatible server, with the
flags and the ``--save-result`` JSON of ``vllm bench serve``.

Waits for the server's ``/health`` (``--ready-check-timeout-sec``), then sends streaming
``/v1/completions`` (``--backend openai``) or ``/v1/chat/completions`` (``openai-chat``)
requests (httpx, asyncio) of a dataset (random token-length controlled prompts, ShareGPT JSON or
JSONL, or JSONL of prompts) with Poisson or gamma arrivals at
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
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
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


BACKENDS = {"openai": "/v1/completions", "vllm": "/v1/completions",
            "openai-chat": "/v1/chat/completions"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fuselm bench serve`` (``vllm bench serve``'s names)."""
    a = parser.add_argument
    a("--backend", choices=sorted(BACKENDS), default="openai",
      help="openai/vllm: /v1/completions; openai-chat: /v1/chat/completions")
    a("--base-url", default=None, help="server root (without /v1); default: http://HOST:PORT")
    a("--host", default="127.0.0.1")
    a("--port", type=int, default=8000)
    a("--endpoint", default=None, help="default: the backend's route")
    a("--model", default=None, help="model name to send; default: the first of GET /v1/models")
    a("--api-key", default=None, help="sent as a Bearer token (default: $OPENAI_API_KEY)")
    a("--num-prompts", type=int, default=100)
    a("--dataset-name", choices=["random", "sharegpt", "jsonl"], default="random",
      help="random: token-length controlled prompts; sharegpt: ShareGPT JSON or JSONL "
           "(--dataset-path); jsonl: {prompt | prompt_token_ids, output_len?} lines")
    a("--dataset-path", default=None)
    a("--random-input-len", "--input-len", dest="input_len", type=int, default=1024,
      help="prompt tokens of a random request (exact on /v1/completions, from the server's "
           "/tokenize; chat prompts are words, counted by the server)")
    a("--random-output-len", "--output-len", dest="output_len", type=int, default=128,
      help="max_tokens of a request")
    a("--sharegpt-output-len", type=int, default=None,
      help="max_tokens of every ShareGPT request; default: the words of its reply")
    a("--random-range-ratio", type=float, default=0.0)
    a("--dataset", default=None, help=argparse.SUPPRESS)  # older name of --dataset-path
    a("--ready-check-timeout-sec", type=float, default=600.0,
      help="seconds to wait for the server's /health before the first request")
    a("--save-result", action="store_true", help="write the result JSON with vLLM's keys")
    a("--result-dir", default=".", help="folder of --save-result")
    a("--result-filename", default=None,
      help="file of --save-result (default: BACKEND-RATEqps-MODEL-DATE.json)")
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
    text: str = ""

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
                         seed: int, token_pool: list[int] | None = None) -> list[BenchRequest]:
    """``num`` prompts of ``input_len`` token ids drawn from ``token_pool`` (exact lengths), or
    without a pool of about ``input_len`` random common words."""
    if min(num, input_len, output_len) < 1:
        raise ValueError("--num-prompts, --input-len and --output-len must be at least 1")
    rng = np.random.default_rng(seed)
    ins = lengths(input_len, ratio, num, rng)
    outs = lengths(output_len, ratio, num, rng)
    if token_pool:
        return [BenchRequest([int(t) for t in rng.choice(token_pool, size=n)], o)
                for n, o in zip(ins, outs, strict=True)]
    return [BenchRequest(" ".join(rng.choice(_WORDS, size=n)), o)
            for n, o in zip(ins, outs, strict=True)]


def load_sharegpt(path: str, num: int, output_len: int | None, seed: int) -> list[BenchRequest]:
    """The first human turn of ``num`` ShareGPT conversations (JSON list or JSONL, shuffled with
    ``seed`` as vLLM does); max_tokens is ``output_len`` or the words of the reply."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):
        data = [data]
    pairs = []
    for item in data:
        turns = item.get("conversations") or item.get("conversation") or []
        if len(turns) >= 2 and turns[0].get("value") and turns[1].get("value"):
            pairs.append((turns[0]["value"], turns[1]["value"]))
    if not pairs:
        raise ValueError(f"{path}: no ShareGPT conversation with a prompt and a reply")
    order = np.random.default_rng(seed).permutation(len(pairs))[:num]
    return [BenchRequest(pairs[i][0], output_len or max(1, len(pairs[i][1].split())))
            for i in order]


async def arrivals(n: int, rate: float, burstiness: float,
                   rng: np.random.Generator) -> AsyncIterator[int]:
    """Yields 0..n-1, sleeping gamma(shape=burstiness, mean=1/rate) seconds between them."""
    for i in range(n):
        yield i
        if math.isinf(rate) or i == n - 1:
            continue
        await asyncio.sleep(float(rng.gamma(burstiness, 1.0 / (rate * burstiness))))


def _payload(model: str, req: BenchRequest, ignore_eos: bool,
             chat: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": req.output_len, "temperature": 0.0,
                            "stream": True, "stream_options": {"include_usage": True}}
    if chat:
        if not isinstance(req.prompt, str):
            raise ValueError("chat requests need text prompts, not token ids")
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def _chunk_text(choice: dict[str, Any]) -> str:
    """A chunk's text: `text` (completions) or `delta.content` (chat)."""
    if "delta" in choice:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def _apply_chunk(obj: dict[str, Any], r: RequestResult, start: float, last: float) -> float:
    """Updates ``r`` from one SSE chunk; returns the time of the latest text chunk."""
    if obj.get("error"):
        raise RuntimeError(str(obj["error"])[:300])
    usage = obj.get("usage")
    if usage:
        r.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        r.output_tokens = int(usage.get("completion_tokens") or 0)
    choices = obj.get("choices") or []
    text = _chunk_text(choices[0]) if choices else ""
    if not text:
        return last
    r.text += text
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
    key = args.api_key or os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def base_url(args: argparse.Namespace) -> str:
    """``--base-url``, else ``http://--host:--port``."""
    return (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")


def endpoint(args: argparse.Namespace) -> str:
    """``--endpoint``, else the backend's route."""
    return args.endpoint or BACKENDS[args.backend]


async def wait_for_server(args: argparse.Namespace) -> None:
    """Polls ``/health`` until the server answers (a server without that route counts as up
    once it answers 404); SystemExit with one line naming the URL after the timeout."""
    import httpx

    url, timeout = base_url(args) + "/health", args.ready_check_timeout_sec
    deadline, last, told = time.monotonic() + timeout, "", False
    async with _client(args) as client:
        while True:
            try:
                resp = await client.get(url, headers=_headers(args))
                if resp.status_code in (200, 404):
                    return
                last = f"HTTP {resp.status_code}"
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if time.monotonic() >= deadline:
                raise SystemExit(
                    f"fuselm bench serve: the server at {base_url(args)} is not ready after "
                    f"{timeout:g} s ({last}); start it with `fuselm serve` or pass --base-url")
            if not told:
                print(f"waiting for {url} (up to {timeout:g} s): {last}", flush=True)
                told = True
            await asyncio.sleep(0.5)


async def discover_model(args: argparse.Namespace) -> str:
    """``--model``, or the first model the server lists at /v1/models."""
    if args.model:
        return args.model
    async with _client(args) as client:
        resp = await client.get(base_url(args) + "/v1/models", headers=_headers(args))
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]


async def token_pool(args: argparse.Namespace, model: str) -> list[int] | None:
    """Token ids of common words from the server's ``/tokenize`` (vLLM's and fuselm's), to
    draw random prompts of exact lengths; None where the server has no such route."""
    async with _client(args) as client:
        resp = await client.post(base_url(args) + "/tokenize", headers=_headers(args), json={
            "model": model, "prompt": " " + " ".join(_WORDS), "add_special_tokens": False})
    if resp.status_code != 200:
        return None
    return sorted(set(resp.json().get("tokens") or [])) or None


async def benchmark(args: argparse.Namespace, requests: list[BenchRequest], model: str,
                    rate: float, slos: dict[str, float]) -> dict[str, Any]:
    """One run at one request rate."""
    from tqdm import tqdm

    url, chat = base_url(args) + endpoint(args), endpoint(args).endswith("/chat/completions")
    limit = (asyncio.Semaphore(args.max_concurrency) if args.max_concurrency
             else contextlib.nullcontext())
    bar = tqdm(total=len(requests), desc=f"rate {rate}", disable=args.disable_tqdm, leave=False)
    rng = np.random.default_rng(args.seed)

    async def one(client: Any, req: BenchRequest) -> RequestResult:
        async with limit:
            res = await send_request(client, url, _payload(model, req, args.ignore_eos, chat),
                                     headers)
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
    run = {"request_rate": None if math.isinf(rate) else rate,
           "max_concurrency": args.max_concurrency, "burstiness": args.burstiness, **metrics}
    if args.save_result:
        run["vllm_result"] = vllm_result(args, model, rate, list(results), metrics)
    return run


def vllm_result(args: argparse.Namespace, model: str, rate: float,
                results: list[RequestResult], m: dict[str, Any]) -> dict[str, Any]:
    """One run under the keys of ``vllm bench serve --save-result``."""
    out: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": args.backend,
        "model_id": model, "tokenizer_id": model, "num_prompts": len(results),
        "request_rate": "inf" if math.isinf(rate) else rate, "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency, "duration": m["duration_s"],
        "completed": m["completed"], "failed": m["failed"],
        "total_input_tokens": m["total_input_tokens"],
        "total_output_tokens": m["total_output_tokens"],
        "request_throughput": m["request_throughput"], "request_goodput": m["goodput"],
        "output_throughput": m["output_throughput"],
        "total_token_throughput": m["total_token_throughput"],
        "input_lens": [r.prompt_tokens for r in results],
        "output_lens": [r.output_tokens for r in results],
        "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
        "generated_texts": [r.text for r in results], "errors": [r.error for r in results],
    }
    ok = [r for r in results if r.success]
    samples = {"ttft": [r.ttft for r in ok], "tpot": [r.tpot for r in ok if r.tpot is not None],
               "itl": [x for r in ok for x in r.itl], "e2el": [r.latency for r in ok]}
    for key, values in samples.items():
        ms = np.asarray(values, dtype=np.float64) * 1e3
        empty = not len(ms)
        out[f"mean_{key}_ms"] = math.nan if empty else float(ms.mean())
        out[f"median_{key}_ms"] = math.nan if empty else float(np.median(ms))
        out[f"std_{key}_ms"] = math.nan if empty else float(ms.std())
        out[f"p99_{key}_ms"] = math.nan if empty else float(np.percentile(ms, 99))
    return out


def save_vllm_results(args: argparse.Namespace, model: str, runs: list[dict[str, Any]],
                      ) -> list[Path]:
    """Writes each run's ``vllm_result`` as vLLM names its files; returns the paths."""
    paths = []
    for run in runs:
        result = run.pop("vllm_result")
        name = args.result_filename
        if name is None or len(runs) > 1:
            rate = result["request_rate"]
            stem = f"{args.backend}-{rate}qps-{model.split('/')[-1]}-{result['date']}"
            name = f"{Path(name).stem}-{rate}qps.json" if name else f"{stem}.json"
        path = Path(args.result_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        paths.append(path)
    return paths


def _row(run: dict[str, Any]) -> dict[str, Any]:
    return {"rate": run["request_rate"] if run["request_rate"] is not None else "inf",
            "conc": run["max_concurrency"] or "-", "done": run["completed"],
            "failed": run["failed"], "sec": run["duration_s"], "req/s": run["request_throughput"],
            "out tok/s": run["output_throughput"], "TTFT p50": run["ttft_ms"]["median"],
            "TTFT p99": run["ttft_ms"]["p99"], "TPOT p50": run["tpot_ms"]["median"],
            "TPOT p99": run["tpot_ms"]["p99"], "ITL p50": run["itl_ms"]["median"],
            "ITL p99": run["itl_ms"]["p99"], "E2E p50": run["e2el_ms"]["median"],
            "E2E p99": run["e2el_ms"]["p99"], "goodput": run["goodput"]}


async def _requests(args: argparse.Namespace, model: str) -> list[BenchRequest]:
    path = args.dataset_path or args.dataset
    name = "jsonl" if args.dataset and not args.dataset_path else args.dataset_name
    if name != "random" and not path:
        raise SystemExit(f"fuselm bench serve: --dataset-name {name} needs --dataset-path")
    if name == "sharegpt":
        return load_sharegpt(path, args.num_prompts, args.sharegpt_output_len, args.seed)
    if name == "jsonl":
        return load_jsonl(path, args.num_prompts, args.output_len)
    chat = endpoint(args).endswith("/chat/completions")
    pool = None if chat else await token_pool(args, model)
    return random_text_requests(args.num_prompts, args.input_len, args.output_len,
                                args.random_range_ratio, args.seed, pool)


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    slos = parse_goodput(args.goodput)
    await wait_for_server(args)
    model = await discover_model(args)
    requests = await _requests(args, model)
    url, chat = base_url(args) + endpoint(args), endpoint(args).endswith("/chat/completions")
    async with _client(args) as client:  # one request first: fail fast on a wrong URL
        probe = await send_request(client, url,
                                   _payload(model, requests[0], args.ignore_eos, chat),
                                   _headers(args))
    if not probe.success:
        raise SystemExit(f"fuselm bench serve: the test request to {url} failed: {probe.error}")
    runs = [await benchmark(args, requests, model, rate, slos) for rate in args.request_rate]
    saved = save_vllm_results(args, model, runs) if args.save_result else []
    for path in saved:
        print(f"result: {path}")
    return {"bench": NAME, "env": report.environment(), "base_url": base_url(args),
            "endpoint": endpoint(args), "backend": args.backend, "model": model,
            "num_prompts": len(requests), "goodput_slos_ms": slos, "runs": runs,
            "saved": [str(p) for p in saved]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every request rate; prints the table, writes JSON and (with --plot) the PNG."""
    result = asyncio.run(_main(args))
    table = report.format_table([_row(r) for r in result["runs"]])
    table += "\n(times in ms; goodput in requests/s meeting every SLO)"
    return report.finish(args, result, table, plots.plot_serving)
