"""Property-based fuzzing of /openapi.json with schemathesis (fake engine): no input, valid or
not, may produce a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fake_engine import FakeEngine
from server_harness import LiveServer

from fuselm.server.api import build_app

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

MAX_EXAMPLES = 30
"""Per operation; about 15 operations, the whole run stays under a minute."""


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[LiveServer]:
    # No step delay and a short context: generations that fuzzing asks for end fast.
    engine = FakeEngine(step_delay=0.0, max_model_len=64, num_total_blocks=1 << 16)
    with LiveServer(build_app(engine, api_key=None)) as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(fuzz_server: LiveServer) -> Any:
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.timeout(120)
@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: Any, fuzz_server: LiveServer) -> None:
    case.call_and_validate(checks=[not_a_server_error], timeout=30)
    assert fuzz_server.stats()["num_requests_running"] >= 0
