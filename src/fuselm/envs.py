"""The only place that reads fuselm's environment variables (and the launcher's RANK)."""

from __future__ import annotations

import os


def api_key() -> str | None:
    """FUSELM_API_KEY: the key the server requires when --api-key is not given."""
    return os.environ.get("FUSELM_API_KEY") or None


def launcher_rank() -> int:
    """RANK set by torchrun (0 when not launched by it)."""
    return int(os.environ.get("RANK", "0"))


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when launched by torchrun with several ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return None
    return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", "0")))


def triton_interpret() -> bool:
    """TRITON_INTERPRET: set (not 0), Triton runs its kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pdl_enabled() -> bool:
    """FUSELM_PDL: 0 turns off programmatic dependent launch of the decode-graph Triton kernels
    (on by default where the GPU supports it: Hopper and newer)."""
    return os.environ.get("FUSELM_PDL", "1") != "0"


def kernel_configs_dir() -> str | None:
    """FUSELM_KERNEL_CONFIGS: a folder of tuning tables (``<op>.json``, as ``fuselm bench
    kernels --configs-dir`` writes them) read instead of the ones shipped in the package."""
    return os.environ.get("FUSELM_KERNEL_CONFIGS") or None


def grammar_threads() -> int | None:
    """FUSELM_GRAMMAR_THREADS: threads of xgrammar's grammar compiles and batched mask fills
    (unset: all cores but one, at most 16)."""
    value = os.environ.get("FUSELM_GRAMMAR_THREADS")
    return int(value) if value else None
