"""The GPU entry script scripts/gpu/run.sh: it parses, every step its usage names exists, pack_out
leaves one archive without checkpoints, and the `ab` step runs the bench on a `git worktree` of
the baseline and on this tree and prints both and the ratio (a stand-in bench, no GPU)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "scripts" / "gpu" / "run.sh"


def _usage() -> str:
    return "".join(line for line in RUN.read_text().splitlines(True) if line.startswith("#"))


def test_gpu_scripts_parse():
    for script in ("run.sh", "lib_steps.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu" / script)], check=True,
                       timeout=30)
    assert os.access(RUN, os.X_OK)


def test_one_entry_script():
    assert sorted(p.name for p in (ROOT / "scripts").glob("*.sh")) == []
    assert sorted(p.name for p in (ROOT / "scripts" / "gpu").iterdir()) == [
        "lib_steps.sh", "run.sh"]


def test_every_step_in_the_usage_has_a_branch_and_the_reverse():
    usage, body = _usage(), RUN.read_text()
    steps = re.search(r"#   steps: (.*)", usage).group(1).split()
    default = re.search(r"#   default: (.*)", usage).group(1).split()
    assert {"tests", "kbench", "engine", "ab", "dist", "pack"} <= set(steps)
    assert set(default) <= set(steps)
    assert f'STEPS=${{*:-{" ".join(default)}}}' in body  # the usage's default is the script's
    main = body[body.index('for step in $STEPS; do'):]
    branches = re.findall(r"^    ([a-z0-9-]+)\) ", main, re.M)
    assert sorted(branches) == sorted(steps)
    for step in steps:
        assert re.search(rf"^#     {step} ", usage, re.M), f"{step} has no line in the usage"
    # the dist sub-steps of the usage are the dist function's branches
    dist = body[body.index("dist() {"):body.index("for step in $STEPS")]
    named = re.search(r"DIST_STEPS \(default: ([^;]*); also: ([^)]*)\)", usage.replace(
        "\n#              ", " "))
    subs = named.group(1).split() + named.group(2).split()
    assert sorted(re.findall(r"^      ([a-z0-9-]+)\)", dist, re.M)) == sorted(subs)
    assert f'DIST_STEPS:-{named.group(1)}' in dist.replace("\n", " ")


def test_every_step_has_a_timeout():
    body = RUN.read_text()
    runs = re.findall(r"run_step ([a-z0-9$\"{}-]+) (\d+) ", body)
    assert len(runs) >= 20 and all(int(limit) > 0 for _, limit in runs)
    assert "timeout --kill-after" in (ROOT / "scripts" / "gpu" / "lib_steps.sh").read_text()


def test_unknown_step_fails(tmp_path):
    proc = subprocess.run(["bash", str(RUN), "nosuchstep"], env={**os.environ,
                          "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "unknown step nosuchstep" in proc.stdout


def test_pack_out_leaves_one_archive_without_checkpoints(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "tests.log").write_text("6 passed\n")
    (tmp_path / "sub" / "decode.json").write_text("{}")
    (tmp_path / "llama-3-8b").mkdir()
    (tmp_path / "llama-3-8b" / "config.json").write_text("{}")
    (tmp_path / "m.safetensors").write_bytes(b"\0" * 64)
    subprocess.run(["bash", "-c", f"OUT={tmp_path}; source scripts/gpu/lib_steps.sh; pack_out"],
                   cwd=ROOT, check=True, timeout=60, capture_output=True)
    assert [p.name for p in tmp_path.iterdir()] == ["results.tgz"]
    with tarfile.open(tmp_path / "results.tgz") as tar:
        names = {Path(n).as_posix().removeprefix("./") for n in tar.getnames()}
    assert {"tests.log", "sub/decode.json"} <= names
    assert not any("llama-3-8b" in n or n.endswith(".safetensors") for n in names)


def test_ab_summary_medians_and_ratio(tmp_path):
    times = {"base": [(4.0, 9.0), (4.4, 9.4), (4.2, 9.2)], "work": [(3.0, 8.0), (3.2, 8.2),
                                                                   (3.1, 8.1)]}
    for tree, runs in times.items():
        for r, (b1, b8) in enumerate(runs, 1):
            (tmp_path / f"ab-{tree}-r{r}").mkdir()
            (tmp_path / f"ab-{tree}-r{r}" / "engine.json").write_text(
                f'{{"b1_ms": {b1}, "b8_ms": {b8}, "gpu": "x"}}')
    proc = subprocess.run(["bash", str(RUN), "ab"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OUT": str(tmp_path), "AB_DRY": "1"}, check=True)
    table = (tmp_path / "ab.txt").read_text()
    assert table in proc.stdout
    assert "b1_ms              4.2000     3.1000     0.7381" in table  # 3.1 / 4.2
    assert "b8_ms              9.2000     8.1000     0.8804" in table  # 8.1 / 9.2


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs the git checkout")
def test_ab_runs_both_trees_with_a_worktree_of_the_baseline(tmp_path):
    # a stand-in for the engine bench: run in each tree, it reports where it ran and which
    # fuselm it imports, as the JSON the engine bench writes
    fake = tmp_path / "fake_bench.py"
    fake.write_text(
        "import json, os, sys, pathlib, fuselm  # noqa\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--out') + 1])\n"
        f"work = pathlib.Path.cwd().resolve() == pathlib.Path({str(ROOT)!r})\n"
        "src = pathlib.Path(fuselm.__file__).resolve().parents[1]\n"
        "assert src == pathlib.Path.cwd().resolve() / 'src', (src, os.getcwd())\n"
        "(out / 'e.json').write_text(json.dumps({'b1_ms': 3.0 if work else 4.0}))\n")
    base = subprocess.run(["git", "rev-list", "-n1", "HEAD~1"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    before = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True,
                            text=True).stdout
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(RUN), "ab"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "OUT": str(out), "AB_BASE": base, "AB_ROUNDS": "1",
             "AB_BENCH": f"python {fake}", "AB_KEYS": "b1_ms"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "=== ab-base-r1 rc=0" in proc.stdout and "=== ab-work-r1 rc=0" in proc.stdout
    assert "b1_ms              4.0000     3.0000     0.7500" in proc.stdout
    after = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True,
                           text=True).stdout
    assert after == before  # the temporary worktree is gone
