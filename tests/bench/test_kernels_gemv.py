"""The gemv benchmark's CPU-side logic: the sweep, the tuning-table decision and its merge."""

from __future__ import annotations

import json

from fuselm.bench import kernels_gemv as kg
from fuselm.bench.kernels import write_tuning_tables
from fuselm.kernels import gemv as gv


def _row(n, k, cublas_us, triton_us):
    cfg = gv.GemvConfig(1, 4096, 8, 1)
    return {"n": n, "k": k, "cublas_us": cublas_us, "triton_us": triton_us,
            "triton_config": cfg.to_dict()}


def test_sweep_configs_tiles_and_default():
    for k in (2048, 4096, 14336):
        configs = kg.sweep_configs(k)
        assert gv.default_config(1, k) in configs
        assert len(configs) == len(set(configs)) <= 48
        for c in configs:
            assert c.block_k & (c.block_k - 1) == 0
            assert c.num_stages == 1 or c.block_k < k  # pipelining only where there is a loop


def test_tuning_table_takes_triton_only_when_faster_by_the_margin(tmp_path):
    rows = [_row(6144, 4096, 21.5, 18.3), _row(4096, 4096, 10.0, 9.95)]
    table = kg.tuning_table(rows, margin=0.01)
    assert table["n6144_k4096"]["backend"] == "triton"
    assert table["n4096_k4096"]["backend"] == "reference"  # 0.5 % faster: within the margin
    assert gv.GemvConfig.from_dict(table["n6144_k4096"]["triton"]) == gv.GemvConfig(1, 4096, 8)
    path = tmp_path / "gemv.json"
    path.write_text(json.dumps({"Other_GPU": {"n1_k1": {"backend": "triton"}}}))
    write_tuning_tables({"gemv": table}, "NVIDIA H100 80GB HBM3", tmp_path)
    merged = json.loads(path.read_text())
    assert set(merged) == {"Other_GPU", "NVIDIA_H100_80GB_HBM3"}
    assert merged["NVIDIA_H100_80GB_HBM3"]["n6144_k4096"]["us"] == {"triton": 18.3,
                                                                   "cublas": 21.5}


def test_summary_row_arithmetic():
    row = kg._summarize({"cublas_us": 20.0}, (10.0, gv.GemvConfig(2, 2048, 4)),
                        weight_bytes=30_000_000, copy_gbs=3000.0)
    assert row["cublas_GB/s"] == 1500.0 and row["triton_GB/s"] == 3000.0
    assert row["triton_%copy"] == 100.0 and row["x_cublas"] == 2.0


def test_gated_rows_are_judged_against_the_faster_separate_path():
    fast = {**_row(14336, 4096, 90.0, 80.0), "gated": True, "separate_us": 84.0}
    slow = {**_row(7168, 4096, 45.0, 42.5), "gated": True, "separate_us": 42.0}
    table = kg.tuning_table([fast, slow], margin=0.01)
    assert table[gv.gated_bucket(14336, 4096)]["backend"] == "triton"
    assert table[gv.gated_bucket(14336, 4096)]["us"] == {"triton": 80.0, "cublas": 90.0,
                                                         "separate": 84.0}
    assert table[gv.gated_bucket(7168, 4096)]["backend"] == "reference"
    assert gv.shape_bucket(14336, 4096) not in table
