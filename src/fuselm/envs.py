"""The only place that reads fuselm's environment variables (and the launcher's RANK)."""

from __future__ import annotations

import os


def api_key() -> str | None:
    """FUSELM_API_KEY: the key the server requires when --api-key is not given."""
    return os.environ.get("FUSELM_API_KEY") or None


def launcher_rank() -> int:
    """RANK set by torchrun (0 when not launched by it)."""
    return int(os.environ.get("RANK", "0"))
