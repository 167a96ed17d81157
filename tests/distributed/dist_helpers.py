"""Helpers of the distributed tests: the driver script, its environment, free ports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

DRIVER = Path(__file__).with_name("dist_driver.py")
# TP sums partial products in another order and pipeline micro-batches compute a row in another
# batch than one process does; logprobs moved by at most 2.2e-5 on the tiny models (float32).
LOGPROB_ATOL = 1e-4


def driver_env() -> dict[str, str]:
    """One thread per process (gloo ranks share the CI machine's 2 cores)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    """A TCP port that was free a moment ago (for torchrun's rendezvous endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_outputs(got: list[dict], want: list[dict], atol: float = LOGPROB_ATOL) -> None:
    """Identical tokens; logprobs of the same top ids within ``atol``."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g["tokens"] == w["tokens"], f"sequence {i}: tokens differ"
        assert len(g["logprobs"]) == len(w["logprobs"])
        for pos, (lg, lw) in enumerate(zip(g["logprobs"], w["logprobs"], strict=True)):
            assert lg.keys() == lw.keys(), f"sequence {i} position {pos}: top ids differ"
            worst = max(abs(lg[k] - lw[k]) for k in lw)
            assert worst <= atol, f"sequence {i} position {pos}: logprob off {worst}"


def run_driver(model: Path, tp: int, pp: int, device: str = "cpu",
               timeout: float = 120, async_scheduling: bool = False,
               custom_all_reduce: bool | None = None) -> dict[str, Any]:
    """The driver's RESULT as rank 0 of tp x pp ranks (it spawns the others)."""
    extra = ["--async-scheduling"] if async_scheduling else []
    if custom_all_reduce is not None:
        extra.append("--custom-all-reduce" if custom_all_reduce else "--no-custom-all-reduce")
    proc = subprocess.run([sys.executable, str(DRIVER), "--model", str(model), "--tp", str(tp),
                           "--pp", str(pp), "--device", device, *extra], capture_output=True,
                          text=True, timeout=timeout, env=driver_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])
