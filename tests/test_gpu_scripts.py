"""The device-call scripts: they parse, and pack_out leaves one archive without checkpoints."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_scripts_parse():
    for script in ("gpu_check.sh", "gpu_distributed_check.sh", "lib_steps.sh", "ab_decode.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], check=True, timeout=30)


def test_pack_out_leaves_one_archive_without_checkpoints(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "tests.log").write_text("6 passed\n")
    (tmp_path / "sub" / "decode.json").write_text("{}")
    (tmp_path / "llama-3-8b").mkdir()
    (tmp_path / "llama-3-8b" / "config.json").write_text("{}")
    (tmp_path / "m.safetensors").write_bytes(b"\0" * 64)
    subprocess.run(["bash", "-c", f"OUT={tmp_path}; source scripts/lib_steps.sh; pack_out"],
                   cwd=ROOT, check=True, timeout=60, capture_output=True)
    assert [p.name for p in tmp_path.iterdir()] == ["results.tgz"]
    with tarfile.open(tmp_path / "results.tgz") as tar:
        names = {Path(n).as_posix().removeprefix("./") for n in tar.getnames()}
    assert {"tests.log", "sub/decode.json"} <= names
    assert not any("llama-3-8b" in n or n.endswith(".safetensors") for n in names)


def test_ab_decode_summary_medians_and_ratios(tmp_path):
    times = {("new", 1): [4.0, 4.2, 4.1], ("new", 2): [2.5, 2.4, 2.6],
             ("old", 1): [4.3, 4.3, 4.4], ("old", 2): [2.7, 2.8, 2.7]}
    for (name, tp), runs in times.items():
        for r, ms in enumerate(runs, 1):
            (tmp_path / f"ab-{name}-tp{tp}-r{r}.json").write_text(
                f'{{"decode_ms_per_token": {ms}}}')
    result = subprocess.run(
        ["bash", "scripts/ab_decode.sh", "run", "new=work", "old=abc123:X=1"], cwd=ROOT,
        env={**os.environ, "OUT": str(tmp_path), "AB_DRY": "1", "ROUNDS": "3"},
        capture_output=True, text=True, timeout=120, check=True)
    table = (tmp_path / "ab.txt").read_text()
    assert table in result.stdout
    assert "new                1     4.1000" in table and "old                2     2.7000" in table
    assert "new              TP=2 / TP=1 = 0.6098" in table  # 2.5 / 4.1
    assert "old              TP=2 / TP=1 = 0.6279" in table  # 2.7 / 4.3
