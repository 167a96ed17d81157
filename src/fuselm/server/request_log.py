"""The server's logs, as vLLM writes them: one line when a request is received and one when it
ends (unless --disable-log-requests), and every 10 s the prompt and generation throughput with
the scheduler's state (unless --disable-log-stats)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from fuselm.outputs import RequestOutput
from fuselm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class RequestLogger:
    """Logs a request's arrival (its prompt ids cut to `max_log_len`) and its end."""

    def __init__(self, max_log_len: int | None = None) -> None:
        self.max_log_len = max_log_len

    def received(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Logs an engine request as it is queued."""
        ids = prompt_ids if self.max_log_len is None else prompt_ids[:self.max_log_len]
        logger.info("Received request %s: params: %s, prompt_token_ids: %s (%d tokens).",
                    request_id, params, ids, len(prompt_ids))

    def finished(self, request_id: str, final: RequestOutput | None, seconds: float) -> None:
        """Logs how an engine request ended (None: aborted before its last output)."""
        if final is None or not final.finished:
            logger.info("Aborted request %s after %.3f s.", request_id, seconds)
            return
        reasons = ",".join(str(c.finish_reason) for c in final.outputs)
        logger.info("Finished request %s: finish_reason=%s, prompt_tokens=%d, "
                    "generation_tokens=%d, %.3f s.", request_id, reasons,
                    len(final.prompt_token_ids), sum(len(c.token_ids) for c in final.outputs),
                    seconds)


class StatsLogger:
    """Every `interval` seconds while there is work: throughput since the previous line and
    the engine's running/waiting requests, KV cache usage and prefix cache hit rate."""

    def __init__(self, stats: Callable[[], dict[str, float]], interval: float = 10.0) -> None:
        self.stats = stats
        self.interval = interval
        self._last: dict[str, float] | None = None
        self._last_time = time.monotonic()

    async def run(self) -> None:
        """Logs until cancelled."""
        self._last, self._last_time = dict(self.stats()), time.monotonic()
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.log_once()
            except Exception:  # a failed stats read must not end the logging
                logger.exception("stats logging failed")

    def log_once(self) -> None:
        """Writes one line if anything ran or waits since the previous call."""
        now, stats = time.monotonic(), dict(self.stats())
        last, elapsed = self._last or stats, max(now - self._last_time, 1e-9)
        self._last, self._last_time = stats, now
        prompt = (stats.get("prompt_tokens_total", 0) - last.get("prompt_tokens_total", 0))
        generation = (stats.get("generation_tokens_total", 0)
                      - last.get("generation_tokens_total", 0))
        running = stats.get("num_requests_running", 0)
        waiting = stats.get("num_requests_waiting", 0)
        if not (prompt or generation or running or waiting):
            return
        queries = stats.get("prefix_cache_queries_total", 0)
        hit_rate = stats.get("prefix_cache_hits_total", 0) / queries if queries else 0.0
        logger.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f "
                    "tokens/s, Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, "
                    "Prefix cache hit rate: %.1f%%", prompt / elapsed, generation / elapsed,
                    running, waiting, 100 * stats.get("kv_cache_usage_perc", 0.0),
                    100 * hit_rate)


def start_stats_logging(stats: Callable[[], dict[str, float]], interval: float) -> Any:
    """Starts a StatsLogger on the running loop; returns its task (cancel it to stop)."""
    return asyncio.get_running_loop().create_task(StatsLogger(stats, interval).run())
