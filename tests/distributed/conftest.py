"""Shared fixture of the distributed tests: tiny checkpoints written once per session."""

from __future__ import annotations

from pathlib import Path

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
