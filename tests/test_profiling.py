"""fuselm.profiling: NVTX ranges, and the trace summary on hand-made events."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fuselm import profiling


def ev(name, start, end, device="DeviceType.CPU", self_cpu=0.0, parent=None):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                           device_type=device, self_cpu_time_total=self_cpu, cpu_parent=parent)


def test_nvtx_range_is_a_no_op_without_profiler_and_recorded_with_one():
    with profiling.nvtx_range("outside"):
        x = torch.ones(2) + 1
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with profiling.nvtx_range("fuselm::schedule"):
            x = x * 2
    assert "fuselm::schedule" in {e.name for e in prof.events()}
    assert x.tolist() == [4.0, 4.0]


def test_union_of_intervals():
    assert profiling.union_us([(0, 2), (1, 3), (5, 6)]) == 4
    assert profiling.union_us([]) == 0


def test_summary_of_gpu_events_hand_computed():
    cuda = "DeviceType.CUDA"
    events = [
        ev(profiling.STEP_RANGE, 0, 100), ev(profiling.STEP_RANGE, 200, 300),
        ev("cudaLaunchKernel", 1, 2), ev("cudaLaunchKernel", 3, 4), ev("cudaGraphLaunch", 201, 202),
        ev("gemm", 10, 40, cuda), ev("gemm", 210, 240, cuda), ev("norm", 35, 50, cuda),
        ev("ncclKernel_AllReduce", 250, 260, cuda),
    ]
    s = profiling.summarize_events(events, top=2)
    assert s["device"] == "cuda" and s["num_steps"] == 2 and s["step_time_us"] == 200
    assert [k["name"] for k in s["kernels"]] == ["gemm", "norm"]
    assert s["kernels"][0]["total_us"] == 60 and s["kernels"][0]["share_of_step"] == 0.3
    assert s["kernels"][0]["per_step_us"] == 30
    busy = (50 - 10) + 30 + 10  # union inside the step windows
    assert s["gpu_idle_fraction"] == pytest.approx(1 - busy / 200)
    assert s["launches_per_step"] == 1 and s["graph_launches_per_step"] == 0.5
    assert s["nccl_us_per_step"] == 5 and s["nccl_calls_per_step"] == 0.5


def test_gpu_idle_per_step_hand_computed():
    cuda = "DeviceType.CUDA"
    events = [ev("cudaGraphLaunch", 0, 5), ev("gemv", 10, 40, cuda), ev("norm", 35, 50, cuda),
              ev("argmax", 60, 70, cuda), ev("copy", 65, 68, cuda), ev("gemv", 100, 130, cuda)]
    s = profiling.gpu_idle_per_step(events, steps=2)
    assert s["gpu_busy_us_per_step"] == (40 + 10 + 30) / 2  # overlaps counted once
    assert s["gpu_idle_us_per_step"] == (10 + 30) / 2  # the gaps 50-60 and 70-100
    assert s["gpu_largest_gap_us"] == 30
    assert profiling.gpu_idle_per_step([ev("cudaGraphLaunch", 0, 5)], steps=2) == {}


def test_summary_of_cpu_events_counts_top_level_ops():
    mm = ev("aten::mm", 10, 50, self_cpu=30)
    inner = ev("aten::empty", 11, 12, self_cpu=1, parent=mm)
    events = [ev(profiling.STEP_RANGE, 0, 100), mm, inner, ev("aten::add", 60, 70, self_cpu=10)]
    s = profiling.summarize_events(events, top=5)
    assert s["device"] == "cpu" and s["gpu_idle_fraction"] is None
    assert [k["name"] for k in s["kernels"]] == ["aten::mm", "aten::add", "aten::empty"]
    assert s["launches_per_step"] == 2  # aten::empty runs inside aten::mm


def test_parse_ncu_csv():
    text = ('==PROF== Connected\n'
            '"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"\n'
            '"0","gemm_kernel","sm__warps_active.avg.pct_of_peak_sustained_active","%","40"\n'
            '"1","gemm_kernel","sm__warps_active.avg.pct_of_peak_sustained_active","%","60"\n'
            '"1","gemm_kernel","dram__throughput.avg.pct_of_peak_sustained_elapsed","%","1,5"\n')
    out = profiling.parse_ncu_csv(text)
    assert out["gemm_kernel"]["achieved_occupancy_pct"] == 50.0
    assert out["gemm_kernel"]["dram_throughput_pct"] == 15.0


def test_ncu_missing_is_reported(monkeypatch):
    monkeypatch.setattr(profiling.shutil, "which", lambda name: None)
    assert profiling.run_ncu(SimpleNamespace(), ["k"]) == {"error": "ncu is not installed"}
