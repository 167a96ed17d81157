"""A worker that dies or freezes mid-generation ends every process, naming the rank."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.distributed.dist_helpers import DRIVER, driver_env


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _run_fault(model: Path, tp: int, pp: int, fault: str, rank: int, timeout: float):
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(DRIVER), "--model", str(model), "--tp", str(tp), "--pp", str(pp),
         "--fault", fault, "--fault-rank", str(rank), "--timeout", str(timeout)],
        capture_output=True, text=True, timeout=90, env=driver_env())
    elapsed = time.monotonic() - start
    lines = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in proc.stdout.splitlines()
             if ln.startswith(("PIDS ", "EXITCODES "))}
    pids = {int(r): p for r, p in json.loads(lines["PIDS"]).items()}
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids.values()), "a worker outlived rank 0"
    exitcodes = {int(r): c for r, c in json.loads(lines.get("EXITCODES", "{}")).items()}
    return proc, elapsed, exitcodes


def test_killed_worker_fails_requests_and_every_rank_exits(checkpoint):
    """TP=2 x PP=2; rank 2 (the sampling rank) gets SIGKILL mid-generation."""
    proc, elapsed, exitcodes = _run_fault(checkpoint("llama3-gqa-scaled"), 2, 2, "kill", 2,
                                          timeout=10)
    assert proc.returncode != 0
    error = next(ln for ln in proc.stderr.splitlines() if "ENGINE_ERROR" in ln)
    assert "EngineDeadError" in error and "rank 2" in error and "SIGKILL" in error, error
    assert "NO_ERROR" not in proc.stdout
    assert exitcodes[2] == -9
    # the survivors exited non-zero by themselves (not killed by rank 0's cleanup)
    assert all(code not in (None, 0, -9) for r, code in exitcodes.items() if r != 2), exitcodes
    assert elapsed < 60


def test_frozen_worker_is_named_within_the_timeout(checkpoint):
    """PP=2; rank 1 gets SIGSTOP: the stalled step ends after --distributed-timeout."""
    proc, elapsed, _ = _run_fault(checkpoint("llama3-gqa-scaled"), 1, 2, "stop", 1, timeout=4)
    assert proc.returncode != 0
    error = next(ln for ln in proc.stderr.splitlines() if "ENGINE_ERROR" in ln)
    assert "rank 1 stopped responding" in error, error
    seconds = float(error.split("after ")[1].split("s:")[0])
    assert seconds < 4 + 6, f"the stall was reported after {seconds} s"
    assert elapsed < 60
