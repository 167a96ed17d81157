"""Helpers of the bench tests: parsing a bench's flags the way ``fuselm`` does."""

from __future__ import annotations

import argparse
from types import ModuleType
from typing import Any


def parse_bench_args(module: ModuleType, argv: list[str], engine: bool = True,
                     llm: Any = None) -> argparse.Namespace:
    """Parses ``argv`` with the engine flags (as ``fuselm.cli`` adds them) and the module's own;
    ``llm`` is handed over so that the bench reuses the session's model."""
    from fuselm.cli_args import add_engine_arguments

    parser = argparse.ArgumentParser()
    if engine:
        add_engine_arguments(parser)
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    args.llm = llm
    return args


def assert_png(path: Any) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

