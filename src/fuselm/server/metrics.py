"""Prometheus metrics with vLLM's names under the `fuselm:` prefix, in a per-app registry.

Two sources:
- the engine's `stats()` (running/waiting requests, KV usage, preemptions, prefix cache), read at
  scrape time by `EngineStatsCollector`;
- the server's own view of each request (`RequestTracker`): token counters, time to first token,
  inter-token latency, end-to-end latency, finished requests by reason. Token counters are summed
  from the outputs the server receives, so they equal the summed `usage` of the responses.

Every metric carries the `model_name` label, as vLLM's do.
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
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)

# engine stats key -> (metric name, help, kind)
_ENGINE_METRICS = {
    "num_requests_running": ("fuselm:num_requests_running",
                             "Requests in the running batch.", "gauge"),
    "num_requests_waiting": ("fuselm:num_requests_waiting",
                             "Requests waiting to be scheduled.", "gauge"),
    "kv_cache_usage_perc": ("fuselm:kv_cache_usage_perc",
                            "Fraction of KV cache blocks in use (1 = full).", "gauge"),
    "num_preemptions_total": ("fuselm:num_preemptions",
                              "Preemptions of running sequences.", "counter"),
    "prefix_cache_queries_total": ("fuselm:prefix_cache_queries",
                                   "Prompt tokens looked up in the prefix cache.", "counter"),
    "prefix_cache_hits_total": ("fuselm:prefix_cache_hits",
                                "Prompt tokens found in the prefix cache.", "counter"),
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
        for key, (name, doc, kind) in _ENGINE_METRICS.items():
            if key not in stats:
                continue
            family_cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            family = family_cls(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], float(stats[key]))
            yield family


class ServerMetrics:
    """The app's registry and its request-level metrics."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        reg, labels = self.registry, ["model_name"]
        self.prompt_tokens = Counter("fuselm:prompt_tokens", "Prefill tokens processed.",
                                     labels, registry=reg).labels(model_name)
        self.generation_tokens = Counter("fuselm:generation_tokens", "Tokens generated.",
                                         labels, registry=reg).labels(model_name)
        self.request_success = Counter("fuselm:request_success", "Finished requests by reason.",
                                       ["model_name", "finished_reason"], registry=reg)
        self.ttft = Histogram("fuselm:time_to_first_token_seconds", "Time to first token.",
                              labels, buckets=TTFT_BUCKETS, registry=reg).labels(model_name)
        self.itl = Histogram("fuselm:inter_token_latency_seconds", "Time between outputs.",
                             labels, buckets=ITL_BUCKETS, registry=reg).labels(model_name)
        self.e2e = Histogram("fuselm:e2e_request_latency_seconds", "Request latency.",
                             labels, buckets=E2E_BUCKETS, registry=reg).labels(model_name)
        self.request_prompt_tokens = Histogram(
            "fuselm:request_prompt_tokens", "Prompt tokens per request.", labels,
            buckets=TOKEN_BUCKETS, registry=reg).labels(model_name)
        self.request_generation_tokens = Histogram(
            "fuselm:request_generation_tokens", "Generated tokens per request.", labels,
            buckets=TOKEN_BUCKETS, registry=reg).labels(model_name)
        reg.register(EngineStatsCollector(engine, model_name))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def tracker(self) -> RequestTracker:
        """A tracker for one engine request, started now."""
        return RequestTracker(self)


class RequestTracker:
    """Feeds one engine request's outputs into the metrics."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self.last_token_time: float | None = None
        self.num_generated = 0
        self.admitted = False

    def observe(self, out: RequestOutput) -> None:
        """Counts the tokens of `out` (deltas since the previous output) and its latencies."""
        m, now = self.metrics, time.monotonic()
        if not self.admitted:
            self.admitted = True
            m.prompt_tokens.inc(len(out.prompt_token_ids))
        new = sum(len(c.token_ids_delta) for c in out.outputs)
        if new:
            self.num_generated += new
            m.generation_tokens.inc(new)
            if self.last_token_time is None:
                m.ttft.observe(now - self.start)
            else:
                m.itl.observe(now - self.last_token_time)
            self.last_token_time = now
        if out.finished:
            m.e2e.observe(now - self.start)
            reason = (out.outputs[0].finish_reason if out.outputs else None) or "abort"
            m.request_success.labels(m.model_name, reason).inc()
            m.request_prompt_tokens.observe(len(out.prompt_token_ids))
            m.request_generation_tokens.observe(self.num_generated)
