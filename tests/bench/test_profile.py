"""fuselm profile on the default model: the trace loads as JSON and kernels (CPU ops) are listed."""

from __future__ import annotations

import json

from bench_helpers import parse_bench_args

from fuselm import profiling


def test_profile_writes_trace_and_lists_ops(default_llm, tmp_path, capsys):
    out_dir = tmp_path / "prof"
    args = parse_bench_args(profiling, [
        "--batch-size", "1", "--input-len", "4", "--output-len", "2", "--top", "5",
        "--output-dir", str(out_dir), "--output-json", str(tmp_path / "p.json")], llm=default_llm)
    result = profiling.run(args)
    trace = json.load(open(out_dir / "trace.json"))
    assert any(e.get("name") == profiling.STEP_RANGE for e in trace["traceEvents"])
    tb = list((out_dir / "tensorboard").glob("*.pt.trace.json"))
    assert len(tb) == 1 and json.load(open(tb[0]))["traceEvents"]
    assert result["num_steps"] == 2  # prefill (first token) + one decode step
    assert len(result["kernels"]) == 5 and all(k["calls"] > 0 for k in result["kernels"])
    assert result["kernels"][0]["name"].startswith("aten::")  # CPU: ops by self time
    assert 0 < sum(k["share_of_step"] for k in result["kernels"]) <= 1.0
    assert result["launches_per_step"] > 0 and result["gpu_idle_fraction"] is None
    summary = json.load(open(out_dir / "summary.json"))
    assert summary["kernels"][0]["name"] == result["kernels"][0]["name"]
    assert json.load(open(tmp_path / "p.json"))["trace"].endswith("trace.json")
    assert "aten ops/step" in capsys.readouterr().out
