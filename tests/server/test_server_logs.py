"""Server logs as vLLM writes them: a line per request received and finished (not with
--disable-log-requests), a throughput line per interval while there is work (not with
--disable-log-stats)."""

from __future__ import annotations

import argparse
import logging
import re
import time
from typing import Any

import pytest
from fake_engine import FakeEngine
from server_harness import CMPL, wait_until

from fuselm.server.launcher import add_serve_arguments, options_from_args

LOGGER = "fuselm.server.request_log"


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_requests_and_throughput_are_logged(make_server: Any,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = make_server(FakeEngine(step_delay=0.02), log_stats_interval=0.2, max_log_len=2)
    with server.client() as client:
        r = client.post(CMPL, json={"prompt": "hello", "max_tokens": 30, "ignore_eos": True})
        assert r.status_code == 200
    assert wait_until(lambda: any("throughput" in m for m in _lines(caplog)), 3)
    lines = _lines(caplog)
    received = [m for m in lines if m.startswith("Received request cmpl-")]
    assert len(received) == 1 and "prompt_token_ids: [107, 104] (5 tokens)" in received[0]
    finished = [m for m in lines if m.startswith("Finished request cmpl-")]
    assert len(finished) == 1 and "finish_reason=length" in finished[0]
    assert "generation_tokens=30" in finished[0]
    stats = [m for m in lines if m.startswith("Avg prompt throughput")]
    rates = [float(m.group(1)) for line in stats
             if (m := re.search(r"Avg generation throughput: ([\d.]+) tokens/s", line))]
    assert rates and max(rates) > 0
    assert "KV cache usage" in stats[0] and "Running:" in stats[0]
    count = len(_lines(caplog))
    time.sleep(0.6)  # idle: no more throughput lines
    assert len([m for m in _lines(caplog)[count:] if "throughput" in m]) <= 1


def test_disable_log_requests_and_stats(make_server: Any,
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = make_server(FakeEngine(step_delay=0.02), log_requests=False, log_stats=False,
                         log_stats_interval=0.1)
    with server.client() as client:
        assert client.post(CMPL, json={"prompt": "x", "max_tokens": 20}).status_code == 200
    time.sleep(0.3)
    assert _lines(caplog) == []


def test_serve_flags_use_vllms_names() -> None:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    options = options_from_args(parser.parse_args([
        "--disable-log-requests", "--disable-log-stats", "--max-log-len", "10",
        "--allowed-origins", '["http://a.example"]', "--allowed-methods", '["GET", "POST"]',
        "--uvicorn-log-level", "warning", "--served-model-name", "a", "b",
        "--root-path", "/api"]))
    assert not options.log_requests and not options.log_stats and options.max_log_len == 10
    assert options.allowed_origins == ("http://a.example",)
    assert options.allowed_methods == ("GET", "POST")
    assert options.uvicorn_log_level == "warning" and options.root_path == "/api"
    assert options.served_model_name == ("a", "b")
    defaults = options_from_args(parser.parse_args([]))
    assert defaults.log_requests and defaults.log_stats and defaults.allowed_origins == ("*",)
    with pytest.raises(ValueError, match="--allowed-origins"):
        options_from_args(parser.parse_args(["--allowed-origins", '"*"']))
    with pytest.raises(ValueError, match="--ssl-keyfile"):
        options_from_args(parser.parse_args(["--ssl-keyfile", "k.pem"]))
