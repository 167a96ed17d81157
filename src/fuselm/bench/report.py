"""Shared pieces of the benches: statistics, tables, the JSON record, building the engine.

Where ``fuselm.bench.common`` (kernel benches) has the same helper, that one is used, so that every
bench writes the same environment block and table layout.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

STAT_KEYS = ("mean", "median", "p90", "p99", "min", "max")


def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0-100) with linear interpolation (numpy's default); nan if empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """mean, median, p90, p99, min, max of ``values`` times ``scale`` (1e3: seconds -> ms)."""
    xs = [v * scale for v in values]
    if not xs:
        return {k: math.nan for k in STAT_KEYS}
    return {"mean": sum(xs) / len(xs), "median": percentile(xs, 50), "p90": percentile(xs, 90),
            "p99": percentile(xs, 99), "min": min(xs), "max": max(xs)}


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-2):
            return f"{v:.3g}"
        return f"{v:,.2f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows of equal keys as an aligned text table (numbers right-aligned)."""
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [[_cell(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    numeric = [all(isinstance(r.get(k), (int, float)) or r.get(k) is None for r in rows)
               for k in keys]

    def line(items: list[str]) -> str:
        return "  ".join(s.rjust(w) if n else s.ljust(w)
                         for s, w, n in zip(items, widths, numeric, strict=True)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(keys), rule, *(line(c) for c in cells)])


def git_commit() -> str | None:
    """The fuselm checkout's commit (with ``-dirty``), or None outside a git tree."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=here,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment() -> dict[str, Any]:
    """GPU, driver, CUDA, torch, Python, CPU and fuselm commit of this run."""
    try:
        from fuselm.bench import common  # the kernel benches' version, when present

        env = getattr(common, "environment", None) or getattr(common, "env_info", None)
        if env is not None:
            return dict(env())
    except ImportError:
        pass
    import torch

    info: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(), "commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "gpu": None, "driver": None, "cuda": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["num_gpus"] = torch.cuda.device_count()
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=10)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def _json_default(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(o)
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def _finite(o: Any) -> Any:
    """NaN/inf -> None, so that the file is strict JSON."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def write_json(path: str | Path, result: dict[str, Any]) -> Path:
    """Writes ``result`` as strict, indented JSON (NaN as null); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite(json.loads(json.dumps(result, default=_json_default))), indent=2,
                      allow_nan=False)
    p.write_text(text + "\n")
    return p


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
