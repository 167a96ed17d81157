"""`fuselm --help` and `fuselm plan --help` load no kernel code: neither Triton nor
`fuselm.kernels` (whose CUDA extension could start an nvcc build on a GPU machine)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_PROBE = """
import json, runpy, sys
argv, preload = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name in preload:
    __import__(name)
sys.argv = ["fuselm", *argv]
try:
    runpy.run_module("fuselm", run_name="__main__")
except SystemExit:
    pass
heavy = sorted(m for m in sys.modules
               if m == "triton" or m.startswith("triton.") or m.startswith("fuselm.kernels"))
print("HEAVY " + json.dumps(heavy))
"""


def _heavy_modules(argv: list[str], preload: list[str] = ()) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argv), json.dumps(preload)],
                          capture_output=True, text=True, timeout=120)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("HEAVY "))
    return json.loads(line.removeprefix("HEAVY "))


@pytest.mark.parametrize("argv", [["--help"], ["plan", "--help"]])
def test_help_imports_no_kernel_code(argv):
    assert _heavy_modules(argv) == []


def test_negative_control_sees_a_kernel_import():
    """The probe reports kernel modules when something did import them."""
    assert "fuselm.kernels.gemv" in _heavy_modules(["--help"], ["fuselm.kernels.gemv"])


def test_selected_subcommand_still_gets_its_flags():
    proc = subprocess.run([sys.executable, "-m", "fuselm", "plan", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--gpu" in proc.stdout


def test_missing_optional_package_is_a_clear_error():
    """`fuselm serve` without FastAPI: listed in --help, and a clear error when selected."""
    code = ("import sys; sys.modules['fastapi'] = None; sys.argv = ['fuselm', *sys.argv[1:]]\n"
            "from fuselm.cli import main; raise SystemExit(main())")
    listed = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0 and "serve" in listed.stdout
    proc = subprocess.run([sys.executable, "-c", code, "serve", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "fuselm serve" in proc.stderr and "fastapi" in proc.stderr, proc.stderr
