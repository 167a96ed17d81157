"""How `fuselm bench kernels` turns measured rows into the tuning tables `auto` reads."""

from __future__ import annotations

import json

from fuselm.bench.kernels import tuning_tables, write_tuning_tables

A, B = {"block": 1024}, {"block": 2048}


def _case(shape, eager, cuda, triton, a, b, bucket="d1"):
    base = {"op": "op1", "shape": shape, "bucket": bucket, "config": None}
    return [{**base, "backend": "eager", "us": eager}, {**base, "backend": "cuda", "us": cuda},
            {**base, "backend": "triton", "us": triton},
            {**base, "backend": "triton[a]", "us": a, "config": A},
            {**base, "backend": "triton[b]", "us": b, "config": B}]


def test_one_entry_for_cases_sharing_a_bucket():
    # A wins the first case by 1 %, B the second by 20 %: B serves both best
    rows = _case("s1", 100, 12, 12, 10.0, 10.1) + _case("s2", 100, 12, 12, 12.0, 10.0)
    entry = tuning_tables(rows)["op1"]["d1"]
    assert entry["triton"] == B
    assert entry["backend"] == "triton"  # credited with B's times (10.1, 10.0) < cuda's 12
    assert entry["us"]["triton"] == 20.1


def test_untuned_triton_loses_to_cuda_but_the_swept_config_can_win():
    assert tuning_tables(_case("s", 100, 10, 11, 12, 13))["op1"]["d1"]["backend"] == "cuda"
    assert tuning_tables(_case("s", 100, 10, 11, 9, 13))["op1"]["d1"]["backend"] == "triton"


def test_write_keeps_other_gpus_other_buckets_and_unswept_configs(tmp_path):
    path = tmp_path / "op1.json"
    path.write_text(json.dumps({
        "Other": {"d1": {"backend": "cuda"}},
        "GPU_X": {"d1": {"backend": "triton", "triton": A}, "d9": {"backend": "cuda"}}}))
    no_sweep = [r for r in _case("s", 100, 12, 10, 0, 0) if r["config"] is None]
    write_tuning_tables(tuning_tables(no_sweep), "GPU X", tmp_path)
    table = json.loads(path.read_text())
    assert table["Other"] == {"d1": {"backend": "cuda"}}
    assert table["GPU_X"]["d1"]["triton"] == A  # kept: this run swept nothing
    assert table["GPU_X"]["d1"]["backend"] == "triton"
    assert table["GPU_X"]["d9"] == {"backend": "cuda"}
