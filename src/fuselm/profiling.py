"""Profiling: NVTX ranges for the engine, and ``fuselm profile`` (torch.profiler front end).

``nvtx_range(name)`` marks an engine phase for Nsight Systems (and, while a torch profiler is
recording, for its trace too); without CUDA it does nothing.

``fuselm profile`` runs ``--batch-size`` random prompts of ``--input-len`` tokens for
``--output-len`` tokens under ``torch.profiler`` (CPU, and CUDA when present; shapes and memory),
each engine step in a ``fuselm::step`` range, and writes into ``--output-dir``:

- ``trace.json``: Chrome / Perfetto trace (``json.load`` reads it);
- ``tensorboard/<worker>.<ms>.pt.trace.json``: the same trace where the TensorBoard profiler
  plugin looks for it;
- ``summary.json``: what is printed: the top kernels by device time (CPU ops by self time when
  there is no GPU) with their share of the summed step time, kernel launches (or ops) per step, GPU
  idle fraction inside steps, and NCCL kernels' time per step.

``--ncu`` re-runs the workload under Nsight Compute (when ``ncu`` is installed) and reads the
achieved occupancy and DRAM throughput of the top kernels.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

_NVTX = torch.cuda.is_available()  # fixed at import: the process has CUDA or not
STEP_RANGE = "fuselm::step"
_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
             "cudaLaunchCooperativeKernel")
NCU_METRICS = {"sm__warps_active.avg.pct_of_peak_sustained_active": "achieved_occupancy_pct",
               "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_throughput_pct"}


class nvtx_range:  # noqa: N801  (used like a function: ``with nvtx_range("schedule"):``)
    """Context manager: an NVTX range (CUDA) and a ``record_function`` range while a torch
    profiler records; free of work otherwise."""

    __slots__ = ("name", "_rf")

    def __init__(self, name: str) -> None:
        self.name = name
        self._rf: Any = None

    def __enter__(self) -> nvtx_range:
        if _NVTX:
            torch.cuda.nvtx.range_push(self.name)
        if torch.autograd._profiler_enabled():
            self._rf = torch.profiler.record_function(self.name)
            self._rf.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._rf is not None:
            self._rf.__exit__(*exc)
            self._rf = None
        if _NVTX:
            torch.cuda.nvtx.range_pop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fuselm profile`` (engine flags come from ``fuselm.cli_args``)."""
    a = parser.add_argument
    a("--batch-size", type=int, default=1)
    a("--input-len", type=int, default=32)
    a("--output-len", type=int, default=8)
    a("--output-dir", default="fuselm_profile", help="trace, TensorBoard log and summary")
    a("--top", type=int, default=15, help="kernels (or CPU ops) to list")
    a("--no-record-shapes", dest="record_shapes", action="store_false")
    a("--no-profile-memory", dest="profile_memory", action="store_false")
    a("--with-stack", action="store_true", help="record Python stacks (slower)")
    a("--ncu", action="store_true", help="also run Nsight Compute on the top kernels")
    a("--output-json", default=None, help="also write the summary here")
    a("--disable-tqdm", action="store_true")


def _prompts(vocab_size: int, args: argparse.Namespace, salt: int) -> list[list[int]]:
    import numpy as np

    from fuselm.bench.report import random_token_ids, workload_seed

    rng = np.random.default_rng(workload_seed(args) + salt)
    return [random_token_ids(vocab_size, args.input_len, rng) for _ in range(args.batch_size)]


def run_workload(engine: Any, prompts: list[list[int]], output_len: int, tag: str) -> int:
    """Runs the prompts to completion, each step in a ``fuselm::step`` range; returns steps."""
    from fuselm.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"profile-{tag}-{i}", p, params)
    steps = 0
    while engine.has_unfinished_requests():
        with torch.profiler.record_function(STEP_RANGE):
            engine.step()
        steps += 1
    return steps


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            total += (cur_e - cur_s) if cur_e is not None else 0.0
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + ((cur_e - cur_s) if cur_e is not None else 0.0)


def gpu_idle_per_step(events: list[Any], steps: int) -> dict[str, float]:
    """The GPU's busy and idle time per step between its first and last activity (the union of
    every kernel and copy interval: PDL overlaps kernels), and the largest idle gap."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if str(e.device_type).endswith("CUDA"))
    if not spans:
        return {}
    gaps, reach = [], spans[0][1]
    for start, end in spans[1:]:
        if start > reach:
            gaps.append(start - reach)
        reach = max(reach, end)
    idle = sum(gaps)
    return {"gpu_busy_us_per_step": (reach - spans[0][0] - idle) / steps,
            "gpu_idle_us_per_step": idle / steps,
            "gpu_largest_gap_us": max(gaps, default=0.0)}


def _clip(iv: tuple[float, float], windows: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(max(iv[0], s), min(iv[1], e)) for s, e in windows if iv[0] < e and iv[1] > s]


def _in_aten(e: Any) -> bool:
    parent = getattr(e, "cpu_parent", None)
    return parent is not None and parent.name.startswith("aten::")


def summarize_events(events: list[Any], top: int) -> dict[str, Any]:
    """Top kernels, launches per step, GPU idle fraction and NCCL time from profiler events
    (``FunctionEvent``: name, device_type, time_range in us, self_cpu_time_total, cpu_parent).

    Without CUDA, "kernels" are aten ops ranked by self CPU time, and launches are the aten ops
    called from outside another aten op (what the Python code dispatches).
    """
    steps = [(e.time_range.start, e.time_range.end) for e in events if e.name == STEP_RANGE]
    step_us = sum(e - s for s, e in steps)
    num_steps = max(1, len(steps))
    gpu = [e for e in events if str(e.device_type).endswith("CUDA")]
    by_name: dict[str, list[float]] = defaultdict(list)
    if gpu:
        for e in gpu:
            by_name[e.name].append(e.time_range.end - e.time_range.start)
        busy = union_us([c for e in gpu for c in _clip((e.time_range.start, e.time_range.end),
                                                        steps)])
        idle = 1.0 - busy / step_us if step_us else None
        launches = sum(e.name in _LAUNCHES for e in events)
        graphs = sum(e.name == "cudaGraphLaunch" for e in events)
    else:  # CPU: aten ops by self time
        for e in events:
            if e.name.startswith("aten::"):
                by_name[e.name].append(e.self_cpu_time_total)
        launches = sum(e.name.startswith("aten::") and not _in_aten(e) for e in events)
        idle, graphs = None, 0
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    kernels = [{"name": n, "calls": len(ts), "total_us": sum(ts),
                "per_step_us": sum(ts) / num_steps,
                "share_of_step": sum(ts) / step_us if step_us else None} for n, ts in ranked]
    nccl = [t for n, ts in by_name.items() if "nccl" in n.lower() for t in ts]
    return {
        "device": "cuda" if gpu else "cpu", "num_steps": len(steps), "step_time_us": step_us,
        "kernels": kernels, "launches_per_step": launches / num_steps,
        "graph_launches_per_step": graphs / num_steps, "gpu_idle_fraction": idle,
        "nccl_us_per_step": sum(nccl) / num_steps if gpu else None,
        "nccl_calls_per_step": len(nccl) / num_steps if gpu else None,
    }


def profile_engine(engine: Any, prompts: list[list[int]], args: argparse.Namespace,
                   out_dir: Path) -> tuple[dict[str, Any], Path]:
    """Runs the workload under torch.profiler; writes the traces; returns (summary, trace)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=args.record_shapes,
                 profile_memory=args.profile_memory, with_stack=args.with_stack) as prof:
        run_workload(engine, prompts, args.output_len, "profiled")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    trace = out_dir / "trace.json"
    prof.export_chrome_trace(str(trace))
    tb = out_dir / "tensorboard"
    tb.mkdir(parents=True, exist_ok=True)  # the file name tensorboard_trace_handler would use
    shutil.copyfile(trace, tb / f"fuselm.{time.time_ns() // 1_000_000}.pt.trace.json")
    return summarize_events(list(prof.events()), args.top), trace


def _workload_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--batch-size", str(args.batch_size), "--input-len", str(args.input_len),
            "--output-len", str(args.output_len)]
    model = getattr(args, "model", None)
    return argv + (["--model", model] if model else []) + [
        "--load-format", str(vars(args).get("engine.load_format") or "auto")]


def parse_ncu_csv(text: str) -> dict[str, dict[str, float]]:
    """Mean of each metric per kernel name from ``ncu --csv`` output."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        metric = NCU_METRICS.get(row.get("Metric Name", ""))
        if metric is None:
            continue
        try:
            value = float(row["Metric Value"].replace(",", ""))
        except (KeyError, ValueError):
            continue
        acc[row.get("Kernel Name", "?")][metric].append(value)
    return {k: {m: sum(v) / len(v) for m, v in ms.items()} for k, ms in acc.items()}


def run_ncu(args: argparse.Namespace, top_names: list[str]) -> dict[str, Any]:
    """Nsight Compute on a re-run of the workload: occupancy and DRAM throughput of the top
    kernels (matched by function name); ``{"error": ...}`` when ncu is absent or fails."""
    ncu = shutil.which("ncu")
    if ncu is None:
        return {"error": "ncu is not installed"}
    cmd = [ncu, "--csv", "--metrics", ",".join(NCU_METRICS), "--launch-count", "400",
           sys.executable, "-m", "fuselm.profiling", *_workload_argv(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"error": f"ncu exited with {proc.returncode}: {proc.stderr[-500:]}"}
    per_kernel = parse_ncu_csv(proc.stdout)

    def short(n: str) -> str:
        return re.sub(r"^void\s+", "", n).split("<")[0].split("(")[0]

    return {name: next((v for k, v in per_kernel.items() if short(name) in k), None)
            for name in top_names}


def _table(summary: dict[str, Any]) -> str:
    from fuselm.tables import format_table

    rows = [{"kernel" if summary["device"] == "cuda" else "op": k["name"][:70], "calls": k["calls"],
             "total ms": k["total_us"] / 1e3, "ms/step": k["per_step_us"] / 1e3,
             "% of step": 100 * k["share_of_step"] if k["share_of_step"] else None}
            for k in summary["kernels"]]
    idle = summary["gpu_idle_fraction"]
    unit = "kernel launches" if summary["device"] == "cuda" else "aten ops"
    tail = (f"{summary['num_steps']} steps, {summary['step_time_us'] / 1e3:.2f} ms in steps; "
            f"{summary['launches_per_step']:.1f} {unit}/step")
    if summary["device"] == "cuda":
        tail += (f", {summary['graph_launches_per_step']:.1f} graph launches/step, GPU idle "
                 f"{100 * idle:.1f}% of step time, NCCL {summary['nccl_us_per_step'] / 1e3:.3f}"
                 f" ms/step" if idle is not None else "")
    return f"{format_table(rows)}\n{tail}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``fuselm profile``: warm up, profile, print the top kernels, write traces and summary."""
    from fuselm.bench.report import build_llm, environment, write_json

    if min(args.batch_size, args.input_len, args.output_len) < 1:
        raise ValueError("--batch-size, --input-len and --output-len must be at least 1")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    llm = build_llm(args)
    vocab = llm.model_config.vocab_size
    run_workload(llm.engine, _prompts(vocab, args, 1), min(args.output_len, 4), "warmup")
    summary, trace = profile_engine(llm.engine, _prompts(vocab, args, 2), args, out_dir)
    result = {"bench": "profile", "env": environment(), "model": llm.engine.model_name,
              "batch_size": args.batch_size, "input_len": args.input_len,
              "output_len": args.output_len, "trace": str(trace),
              "tensorboard_dir": str(out_dir / "tensorboard"), **summary}
    if args.ncu:
        result["ncu"] = run_ncu(args, [k["name"] for k in summary["kernels"]])
    print(_table(summary))
    print(f"trace: {trace} (chrome://tracing or ui.perfetto.dev); "
          f"TensorBoard: {out_dir / 'tensorboard'}")
    write_json(out_dir / "summary.json", result)
    if args.output_json:
        write_json(args.output_json, result)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m fuselm.profiling``: the workload alone, unprofiled (what ``--ncu`` runs)."""
    from fuselm.bench.report import build_llm
    from fuselm.cli_args import add_engine_arguments

    parser = argparse.ArgumentParser(description="run the profile workload without a profiler")
    add_engine_arguments(parser)
    add_arguments(parser)
    args = parser.parse_args(argv)
    llm = build_llm(args)
    run_workload(llm.engine, _prompts(llm.model_config.vocab_size, args, 2), args.output_len,
                 "ncu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
