"""Optional dependencies are extras of pyproject.toml: the plain install runs ``fuselm bench
latency`` and ``fuselm serve --help``; a command whose extra is missing stays listed in
``--help`` and says in one line which extra to install (status 1, no traceback).

"Not installed" is simulated in a subprocess whose import system finds none of the hidden
packages (``import`` raises ModuleNotFoundError and ``importlib.util.find_spec`` returns None,
as for a package that is not there).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fuselm.bench.dummy_model import write_dummy_checkpoint
from fuselm.cli import EXTRA_OF_PACKAGE

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (CI's)

PYPROJECT = Path(__file__).parents[2] / "pyproject.toml"

_RUN_HIDDEN = """
import importlib.machinery, json, runpy, sys

HIDDEN = set(json.loads(sys.argv[1]))

class Hide:
    '''PathFinder, blind to the hidden top-level packages.'''

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    def invalidate_caches(self):
        importlib.machinery.PathFinder.invalidate_caches()

sys.meta_path[:] = [Hide() if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
sys.argv = ["fuselm", *sys.argv[2:]]
runpy.run_module("fuselm", run_name="__main__", alter_sys=True)
"""


def _module(requirement: str) -> str:
    """The import name of a requirement string ("pytest-timeout>=2" -> "pytest_timeout")."""
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower().replace("-", "_")


def _project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def not_in_plain_install() -> list[str]:
    """Every package an extra adds over the plain install's dependencies."""
    project = _project()
    core = {_module(r) for r in project["dependencies"]}
    extra = {_module(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    return sorted(extra - core - {"fuselm"})


def run_hidden(hidden: list[str], argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _RUN_HIDDEN, json.dumps(hidden), *argv],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_dummy_checkpoint("llama-tiny", tmp_path_factory.mktemp("extras") / "m",
                                  vocab_size=258, num_hidden_layers=2, hidden_size=64,
                                  intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256)


def test_every_optional_package_belongs_to_an_extra_that_lists_it():
    project = _project()
    extras = {name: {_module(r) for r in reqs}
              for name, reqs in project["optional-dependencies"].items()}
    core = {_module(r) for r in project["dependencies"]}
    for package, extra in EXTRA_OF_PACKAGE.items():
        assert package in extras.get(extra, set()), (package, extra)
        assert package not in core, package
    assert {"transformers", "httpx", "matplotlib"} <= set(not_in_plain_install())
    assert {"fastapi", "uvicorn", "pydantic"} <= core  # fuselm serve is in the plain install


def test_plain_install_runs_bench_latency_and_serve_help(tiny_model):
    hidden = not_in_plain_install()
    assert "triton" in hidden and "transformers" in hidden
    listed = run_hidden(hidden, ["--help"])
    assert listed.returncode == 0, listed.stderr
    for command in ("generate", "chat", "serve", "bench", "profile", "plan"):
        assert command in listed.stdout
    serve = run_hidden(hidden, ["serve", "--help"])
    assert serve.returncode == 0 and "--port" in serve.stdout, serve.stderr[-2000:]
    bench = run_hidden(hidden, ["bench", "latency", "--model", str(tiny_model), "--load-format",
                                "dummy", "--device", "cpu", "--input-len", "8", "--output-len",
                                "4", "--num-iters", "1", "--num-iters-warmup", "0",
                                "--disable-tqdm"])
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert "TTFT" in bench.stdout


# (command line, hidden package, the extra the message must name)
MISSING = [
    (["bench", "latency", "--compare", "hf"], "transformers", "hf"),
    (["bench", "latency", "--plot", "{tmp}/latency.png"], "matplotlib", "bench"),
    (["bench", "throughput", "--plot", "{tmp}/throughput.png"], "matplotlib", "bench"),
    (["bench", "serve"], "httpx", "bench"),
]


@pytest.mark.parametrize(("argv", "package", "extra"), MISSING,
                         ids=[f"{' '.join(a[:2])}-{p}" for a, p, _ in MISSING])
def test_missing_extra_is_one_line_naming_it(tiny_model, tmp_path, argv, package, extra):
    argv = [a.format(tmp=tmp_path) for a in argv]
    engine = ["--model", str(tiny_model), "--load-format", "dummy", "--device", "cpu"]
    proc = run_hidden([package], argv + (engine if argv[1] != "serve" else []))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert len(lines) == 1, proc.stderr
    assert f"fuselm {' '.join(argv[:2])}" in lines[0] and package in lines[0]
    assert f"pip install 'fuselm[{extra}]'" in lines[0]


def test_commands_stay_listed_when_their_extras_are_missing():
    listed = run_hidden(sorted(EXTRA_OF_PACKAGE), ["bench", "--help"])
    assert listed.returncode == 0, listed.stderr
    for command in ("latency", "throughput", "serve", "kernels"):
        assert command in listed.stdout


def test_serve_without_fastapi_is_listed_and_names_the_package():
    """FastAPI is a dependency of the plain install: a broken install says to reinstall."""
    listed = run_hidden(["fastapi"], ["--help"])
    assert listed.returncode == 0 and "serve" in listed.stdout
    proc = run_hidden(["fastapi"], ["serve", "--help"])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(lines) == 1 and "fuselm serve" in lines[0] and "'fastapi'" in lines[0], lines


def test_control_the_hidden_package_is_found_when_not_hidden():
    proc = run_hidden([], ["bench", "serve", "--help"])
    assert proc.returncode == 0 and "--request-rate" in proc.stdout, proc.stderr[-2000:]
