"""The device-call scripts: they parse, and pack_out leaves one archive without checkpoints."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_scripts_parse():
    for script in ("gpu_check.sh", "gpu_distributed_check.sh", "lib_steps.sh"):
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
