"""Shared fixtures of the distributed tests: tiny checkpoints written once per session, and the
workload's reference result on one rank in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """name -> tiny checkpoint dir."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_tiny_checkpoint(name, tmp_path_factory.mktemp(name))
        return made[name]

    return get


@pytest.fixture(scope="module")
def reference(checkpoint):
    """(name, device) -> the workload's result in this process, one rank."""
    from tests.distributed import dist_driver

    results: dict[tuple[str, str], dict[str, Any]] = {}

    def get(name: str, device: str = "cpu") -> dict[str, Any]:
        if (name, device) not in results:
            results[name, device] = dist_driver.run(str(checkpoint(name)), 1, 1, device=device)
        return results[name, device]

    return get
