"""Measurement helpers of the kernel benches: timing, the card's copy bandwidth, environment,
tables and JSON.

GPU times are medians of CUDA-event timings (``triton.testing.do_bench``, which also flushes
L2 between repetitions, so that inputs are read from device memory); CPU times use
``time.perf_counter``. The copy bandwidth is a large device-to-device copy, counting bytes read
plus bytes written, measured in the same run as the kernels it is compared with.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch

from fuselm.tables import format_table, markdown_table, write_json  # noqa: F401


def git_commit() -> str | None:
    """The checkout's commit (``-dirty`` when modified), or None outside a git tree."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if lines else None


def environment() -> dict[str, Any]:
    """GPU, driver, CUDA, torch, Triton, Python, CPU and commit of this run."""
    info: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpu": None,
        "driver": None,
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(
            gpu=props.name,
            num_gpus=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            driver=_driver_version(),
        )
    return info


def gpu_slug(name: str | None) -> str:
    """File-name form of a GPU name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", (name or "cpu").lower()).strip("-") or "cpu"


def gpu_key(name: str) -> str:
    """Key of a GPU in the tuning tables (the form ``kernels.resolver`` looks up)."""
    return name.replace(" ", "_")


# ---- timing ------------------------------------------------------------------------------


def time_gpu_ms(fn: Callable[[], Any], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of ``fn()`` on the GPU (events; L2 flushed between repetitions)."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_events_ms(fn, warmup_ms, rep_ms)
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def _time_events_ms(fn: Callable[[], Any], warmup_ms: float, rep_ms: float) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    times = []
    for _ in range(max(5, int(rep_ms / estimate))):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_time_us(body: Callable[[], Any], calls: int, replays: int = 20) -> float:
    """Median microseconds a call of ``body``, which makes ``calls`` calls back to back, captured
    in one CUDA graph and replayed ``replays`` times (the way a decode step runs kernels)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        body()  # warm-up / compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def time_host_us(fn: Callable[[], Any], device: torch.device, calls: int = 200) -> float:
    """Wall-clock microseconds a call, back to back, synchronised once at the end.

    For launch-bound calls (a few tokens) this is the host cost: Python, dispatcher, launcher.
    """
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / calls * 1e6


def time_cpu_ms(fn: Callable[[], Any], reps: int = 5) -> float:
    """Median milliseconds of ``fn()`` on the CPU."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_ms(fn: Callable[[], Any], device: torch.device, rep_ms: float = 100) -> float:
    """Median milliseconds of ``fn()`` on ``device``."""
    if device.type == "cuda":
        return time_gpu_ms(fn, rep_ms=rep_ms)
    return time_cpu_ms(fn)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth_gbs(device: torch.device, size_bytes: int = 1 << 30) -> float:
    """The card's device-to-device copy bandwidth in GB/s (bytes read + written)."""
    if device.type != "cuda":
        size_bytes = min(size_bytes, 64 << 20)
    src = torch.empty(size_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, rep_ms=200)
    return 2 * size_bytes / (ms * 1e-3) / 1e9


# ---- registration overhead ---------------------------------------------------------------


@cache
def _overhead_ops() -> tuple[torch.library.Library, Callable, Callable]:
    lib = torch.library.Library("fuselm_bench", "FRAGMENT")
    lib.define("noop(Tensor x, Tensor w, float eps) -> ()")
    lib.impl("noop", _noop, "CPU")

    @torch.library.custom_op("fuselm_bench::noop_custom", mutates_args=())
    def noop_custom(x: torch.Tensor, w: torch.Tensor, eps: float) -> None:
        return None

    return lib, torch.ops.fuselm_bench.noop.default, noop_custom  # lib: keeps the op alive


def _noop(x: torch.Tensor, w: torch.Tensor, eps: float) -> None:
    return None


def dispatch_overhead_us(calls: int = 20000) -> dict[str, float]:
    """Host cost of one call of an empty op: direct Python call, ``torch.library.define`` +
    ``impl`` through ``torch.ops`` (OpOverload and OpOverloadPacket) and ``custom_op``."""
    _, op_overload, custom = _overhead_ops()
    x, w = torch.zeros(4), torch.zeros(4)
    fns = {"python function": _noop, "torch.ops (define+impl), .default": op_overload,
           "torch.ops (define+impl), packet": torch.ops.fuselm_bench.noop,
           "custom_op decorator": custom}  # fmt: skip
    out = {}
    for name, fn in fns.items():
        out[name] = min(time_host_us(lambda f=fn: f(x, w, 1e-6), torch.device("cpu"),
                                            calls) for _ in range(3))  # fmt: skip
    return out


# ---- output ------------------------------------------------------------------------------


# the table and JSON writers are fuselm.tables' (the planner uses them too)
