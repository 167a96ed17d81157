"""Shared pieces of the engine benches: statistics, progress, the printed table and JSON record,
building the engine.

The environment block, tables and JSON writing are ``fuselm.bench.common``'s (the kernel benches'),
so that every bench prints and records the same way.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from fuselm.bench.common import environment, format_table, write_json

__all__ = ["environment", "format_table", "write_json", "percentile", "summarize", "progress",
           "finish", "build_llm", "workload_seed", "random_token_ids"]

STAT_KEYS = ("mean", "median", "p90", "p99", "min", "max")


def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0-100) with linear interpolation (numpy's); nan if empty."""
    return float(np.percentile(values, q)) if len(values) else math.nan


def summarize(values: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """mean, median, p90, p99, min, max of ``values`` times ``scale`` (1e3: seconds -> ms)."""
    if not len(values):
        return {k: math.nan for k in STAT_KEYS}
    xs = np.asarray(values, dtype=np.float64) * scale
    median, p90, p99 = np.percentile(xs, (50, 90, 99)).tolist()
    return {"mean": float(xs.mean()), "median": median, "p90": p90, "p99": p99,
            "min": float(xs.min()), "max": float(xs.max())}


def progress(it: Iterable[Any], total: int | None = None, desc: str = "",
             disable: bool = False) -> Iterable[Any]:
    """tqdm progress bar (on stderr) over ``it``."""
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, disable=disable, leave=False)


def finish(args: argparse.Namespace, result: dict[str, Any], table: str,
           plot: Any = None) -> dict[str, Any]:
    """Prints the table, writes --output-json and (when --plot) the PNG; returns ``result``.

    ``plot`` is a callable (result, png path) drawing the figure.
    """
    print(table)
    png = getattr(args, "plot", None)
    if png and plot is not None:
        plot(result, png)
        result["plot"] = str(png)
        print(f"plot: {png}")
    out = getattr(args, "output_json", None)
    if out:
        write_json(out, result)
        print(f"json: {out}")
    return result


# ---- the engine of the offline benches ----


def build_llm(args: argparse.Namespace) -> Any:
    """``fuselm.LLM`` from the engine flags (``fuselm.cli_args``), or ``args.llm`` when the
    caller already holds one (tests load the model once)."""
    llm = getattr(args, "llm", None)
    if llm is not None:
        return llm
    import fuselm
    from fuselm.cli_args import engine_config_from_args

    return fuselm.LLM(config=engine_config_from_args(args))


def workload_seed(args: argparse.Namespace) -> int:
    """Seed of the random prompts: the engine's ``--seed``."""
    return int(vars(args).get("engine.seed") or getattr(args, "seed", 0) or 0)


def random_token_ids(vocab_size: int, length: int, generator: Any) -> list[int]:
    """``length`` token ids drawn uniformly from [100, vocab_size) (skips special-token area)."""
    lo = min(100, max(vocab_size - 1, 0))
    return [lo + int(x) for x in generator.integers(0, max(vocab_size - lo, 1), size=length)]
