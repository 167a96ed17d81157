"""Prometheus metrics under vLLM's names and labels (`vllm:*`, label `model_name`), in a
per-app registry, so that vLLM's published Grafana dashboard works unchanged.

Two sources:
- the engine's `stats()` (running/waiting requests, KV usage, preemptions, prefix cache), read at
  scrape time by `EngineStatsCollector`;
- the server's own view of each request (`RequestTracker`): token counters, time to first token,
  inter-token latency, queue/prefill/decode/end-to-end times, finished requests by reason
  (aborts included). Token counters are summed from the outputs the server receives, so they
  equal the summed `usage` of the responses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fuselm.outputs import RequestOutput

logger = logging.getLogger(__name__)

# vLLM's buckets (seconds, tokens).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)

# engine stats key -> (metric names, help, kind). `gpu_cache_usage_perc` is the name vLLM's
# published dashboard still reads; vLLM itself now exports `kv_cache_usage_perc`.
_ENGINE_METRICS = {
    "num_requests_running": (("vllm:num_requests_running",),
                             "Requests in the running batch.", "gauge"),
    "num_requests_waiting": (("vllm:num_requests_waiting",),
                             "Requests waiting to be scheduled.", "gauge"),
    "kv_cache_usage_perc": (("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
                            "Fraction of KV cache blocks in use (1 = full).", "gauge"),
    "num_preemptions_total": (("vllm:num_preemptions",),
                              "Preemptions of running sequences.", "counter"),
    "prefix_cache_queries_total": (("vllm:prefix_cache_queries",),
                                   "Prompt tokens looked up in the prefix cache.", "counter"),
    "prefix_cache_hits_total": (("vllm:prefix_cache_hits",),
                                "Prompt tokens found in the prefix cache.", "counter"),
    # swap space and the prefix cache's CPU tier (--swap-space, --kv-offloading-size)
    "cpu_kv_cache_usage_perc": (("vllm:cpu_cache_usage_perc",),
                                "Fraction of CPU KV blocks (swap + prefix tier) in use.", "gauge"),
    "cpu_prefix_cache_hits_total": (("fuselm:cpu_prefix_cache_hits",),
                                    "Prompt tokens restored from the CPU prefix tier.",
                                    "counter"),
    "num_swapped_preemptions_total": (("fuselm:num_swapped_preemptions",),
                                      "Preemptions that swapped KV to the CPU.", "counter"),
    "recomputed_tokens_total": (("fuselm:recomputed_tokens",),
                                "Tokens computed again after a preemption.", "counter"),
    "kv_swapped_out_bytes_total": (("fuselm:kv_swapped_out_bytes",),
                                   "KV bytes swapped to the CPU.", "counter"),
    "kv_swapped_in_bytes_total": (("fuselm:kv_swapped_in_bytes",),
                                  "KV bytes swapped back from the CPU.", "counter"),
    "kv_offloaded_bytes_total": (("fuselm:kv_offloaded_bytes",),
                                 "Evicted prefix KV bytes kept in the CPU tier.", "counter"),
    "kv_restored_bytes_total": (("fuselm:kv_restored_bytes",),
                                "Prefix KV bytes restored from the CPU tier.", "counter"),
}


class EngineStatsCollector:
    """Reads `engine.stats()` on each scrape and exposes it as gauges and counters."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.engine.stats()
        except Exception:  # a scrape must not fail because the engine is gone
            logger.exception("engine.stats() failed")
            return
        for key, (names, doc, kind) in _ENGINE_METRICS.items():
            if key not in stats:
                continue
            for name in names:
                family_cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
                family = family_cls(name, doc, labels=["model_name"])
                family.add_metric([self.model_name], float(stats[key]))
                yield family


def _histogram(name: str, doc: str, buckets: tuple[float, ...], registry: CollectorRegistry,
               model_name: str) -> Any:
    return Histogram(name, doc, ["model_name"], buckets=buckets,
                     registry=registry).labels(model_name)


class ServerMetrics:
    """The app's registry and its request-level metrics."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.model_name = model_name
        self.registry = reg = CollectorRegistry()
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.",
                                     ["model_name"], registry=reg).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.",
                                         ["model_name"], registry=reg).labels(model_name)
        self.request_success = Counter("vllm:request_success", "Finished requests by reason.",
                                       ["model_name", "finished_reason"], registry=reg)
        self.ttft = _histogram("vllm:time_to_first_token_seconds", "Time to first token.",
                               TTFT_BUCKETS, reg, model_name)
        self.itl = _histogram("vllm:inter_token_latency_seconds", "Time between outputs.",
                              ITL_BUCKETS, reg, model_name)
        self.tpot = _histogram("vllm:time_per_output_token_seconds",
                               "Time between outputs (vLLM's older name of the inter-token "
                               "latency, still read by its dashboard).", ITL_BUCKETS, reg,
                               model_name)
        self.e2e = _histogram("vllm:e2e_request_latency_seconds", "Request latency.",
                              REQUEST_BUCKETS, reg, model_name)
        self.queue_time = _histogram("vllm:request_queue_time_seconds",
                                     "Time from arrival to first scheduling.", REQUEST_BUCKETS,
                                     reg, model_name)
        self.prefill_time = _histogram("vllm:request_prefill_time_seconds",
                                       "Time from first scheduling to the first token.",
                                       REQUEST_BUCKETS, reg, model_name)
        self.decode_time = _histogram("vllm:request_decode_time_seconds",
                                      "Time from the first token to the last.",
                                      REQUEST_BUCKETS, reg, model_name)
        self.inference_time = _histogram("vllm:request_inference_time_seconds",
                                         "Time from first scheduling to the last token.",
                                         REQUEST_BUCKETS, reg, model_name)
        self.request_prompt_tokens = _histogram(
            "vllm:request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS, reg,
            model_name)
        self.request_generation_tokens = _histogram(
            "vllm:request_generation_tokens", "Generated tokens per request (all n choices).",
            TOKEN_BUCKETS, reg, model_name)
        self.request_max_generation_tokens = _histogram(
            "vllm:request_max_num_generation_tokens",
            "Generated tokens of a request's longest choice.", TOKEN_BUCKETS, reg, model_name)
        reg.register(EngineStatsCollector(engine, model_name))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def tracker(self) -> RequestTracker:
        """A tracker for one engine request, started now."""
        return RequestTracker(self)


class RequestTracker:
    """Feeds one engine request's outputs into the metrics; `close()` counts a request that
    ended without a finished output (client gone, error) as aborted."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_generated = 0
        self.num_prompt_tokens = 0
        self.max_generated = 0
        self.engine_times: dict[str, float] = {}
        self.admitted = False
        self.done = False

    def observe(self, out: RequestOutput) -> None:
        """Counts the tokens of `out` (deltas since the previous output) and its latencies."""
        m, now = self.metrics, time.monotonic()
        if not self.admitted:
            self.admitted = True
            self.num_prompt_tokens = len(out.prompt_token_ids)
            m.prompt_tokens.inc(self.num_prompt_tokens)
        self.engine_times.update(out.metrics or {})
        new = sum(len(c.token_ids_delta) for c in out.outputs)
        self.max_generated = max([self.max_generated, *(len(c.token_ids) for c in out.outputs)])
        if new:
            self.num_generated += new
            m.generation_tokens.inc(new)
            if self.last_token_time is None:
                self.first_token_time = now
                m.ttft.observe(now - self.start)
            else:
                m.itl.observe(now - self.last_token_time)
                m.tpot.observe(now - self.last_token_time)
            self.last_token_time = now
        if out.finished:
            reason = (out.outputs[0].finish_reason if out.outputs else None) or "abort"
            self._finish(reason, now)

    def close(self) -> None:
        """Counts the request as aborted unless it already finished."""
        if not self.done:
            self._finish("abort", time.monotonic())

    def _finish(self, reason: str, now: float) -> None:
        m = self.metrics
        self.done = True
        m.e2e.observe(now - self.start)
        m.request_success.labels(m.model_name, reason).inc()
        if not self.admitted:
            return
        m.request_prompt_tokens.observe(self.num_prompt_tokens)
        m.request_generation_tokens.observe(self.num_generated)
        m.request_max_generation_tokens.observe(self.max_generated)
        self._observe_phases(now)

    def _observe_phases(self, now: float) -> None:
        """Queue, prefill, decode and inference times, from the engine's timestamps where it
        reports them (`arrival_time`, `scheduled_time`: the engine's monotonic clock, which is
        this process's)."""
        m, times = self.metrics, self.engine_times
        arrival = times.get("arrival_time", self.start)
        scheduled = times.get("scheduled_time", arrival)
        first = self.first_token_time
        last = self.last_token_time or now
        m.queue_time.observe(max(scheduled - arrival, 0.0))
        m.inference_time.observe(max(last - scheduled, 0.0))
        if first is not None:
            m.prefill_time.observe(max(first - scheduled, 0.0))
            m.decode_time.observe(max(last - first, 0.0))
