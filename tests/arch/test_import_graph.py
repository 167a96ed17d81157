"""The package layering of ``src/fuselm`` (docs/design.md), read from the import statements:
no cycle between units, and no unit importing one above it."""

from __future__ import annotations

from pathlib import Path

from tests.arch.import_graph import (
    cycles,
    forbidden_edges,
    package_graph,
    private_imports_across_units,
)

SRC = Path(__file__).resolve().parents[2] / "src"

# Bottom to top; a unit may import its own rank and below. Tools sit beside the stack and may
# import everything below them; the CLI dispatches to all of it.
RANKS: list[set[str]] = [
    {"config", "errors", "forward_batch", "sampling_params", "outputs", "envs", "cli_args",
     "tables"},
    {"kernels"},
    {"parallel"},
    {"layers"},
    {"models"},
    {"loading", "tokenizer", "structured"},
    {"engine"},
    {"distributed"},
    {"runtime"},
    {"server", "llm"},
    {"planner", "planner_hardware"},
    {"bench", "profiling"},
    {"cli", "__main__"},
]


def _upward_edges(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    rank = {unit: i for i, units in enumerate(RANKS) for unit in units}
    return sorted((a, b) for a, targets in graph.items() for b in targets
                  if rank[b] > rank[a])


def test_every_unit_has_a_rank():
    graph = package_graph(SRC, "fuselm")
    ranked = set().union(*RANKS)
    assert set(graph) - ranked == set(), "add the new unit to RANKS and docs/design.md"


def test_no_cycle_between_packages():
    assert cycles(package_graph(SRC, "fuselm")) == []


def test_no_unit_imports_one_above_it():
    assert _upward_edges(package_graph(SRC, "fuselm")) == []


def test_model_code_never_reaches_the_engine_or_the_rank_runtime():
    graph = package_graph(SRC, "fuselm")
    lower = {"layers", "models", "kernels", "parallel"}
    assert forbidden_edges(graph, lower, {"engine", "distributed", "runtime"}) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_negative_control_finds_a_cycle_and_an_upward_import(tmp_path):
    """A tree with a layer importing the engine inside a function (relative import) and the
    engine importing the layer: the checks above must fail on it."""
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/layers/__init__.py": "",
        "pkg/layers/linear.py": "def f():\n    from ..engine import runner\n",
        "pkg/engine/__init__.py": "",
        "pkg/engine/runner.py": "from pkg.layers.linear import f\n",
        "pkg/config.py": "import os\n",
    })
    graph = package_graph(tmp_path, "pkg")
    assert graph == {"layers": {"engine"}, "engine": {"layers"}, "config": set()}
    assert cycles(graph) == [["engine", "layers"]]
    assert forbidden_edges(graph, {"layers"}, {"engine"}) == [("layers", "engine")]
    assert _upward_edges(graph) == [("layers", "engine")]


def test_no_private_name_crosses_a_unit():
    """A package uses another's public names only (``_x`` stays inside its own unit)."""
    assert private_imports_across_units(SRC, "fuselm") == []


def test_negative_control_finds_a_private_import(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/kernels/__init__.py": "",
        "pkg/kernels/_registry.py": "def select():\n    pass\n",
        "pkg/kernels/ops.py": "from pkg.kernels._registry import select\n",  # same unit: fine
        "pkg/layers/__init__.py": "",
        "pkg/layers/norm.py": "def f():\n    from pkg.kernels._registry import select\n",
    })
    assert private_imports_across_units(tmp_path, "pkg") == [
        ("pkg.layers.norm", "pkg.kernels._registry.select")]
