"""fuselm.bench.report: statistics match numpy; the record is strict JSON."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from fuselm.bench import report


@pytest.mark.parametrize("q", [0, 50, 90, 99, 100])
def test_percentile_matches_numpy(q):
    xs = list(np.random.default_rng(0).normal(size=37))
    assert report.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_summarize_scales_and_handles_empty():
    s = report.summarize([0.001, 0.002, 0.003], scale=1e3)
    assert s["mean"] == pytest.approx(2.0) and s["median"] == pytest.approx(2.0)
    assert s["min"] == pytest.approx(1.0) and s["max"] == pytest.approx(3.0)
    assert all(math.isnan(v) for v in report.summarize([]).values())


def test_finish_writes_strict_json_with_nan_as_null(tmp_path, capsys):
    args = argparse.Namespace(output_json=str(tmp_path / "r.json"), plot=None)
    report.finish(args, {"x": float("nan"), "env": report.environment()}, "table")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["x"] is None and "torch" in data["env"]
    assert capsys.readouterr().out.startswith("table")
