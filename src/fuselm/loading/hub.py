"""Hugging Face Hub ids (``ORG/NAME``) resolved to a local snapshot through ``huggingface_hub``.

``snapshot_download`` keeps its cache (``--download-dir``, else ``$HF_HUB_CACHE`` /
``$HF_HOME/hub``) laid out as ``models--org--name/{blobs,refs,snapshots/<commit>}``; a cached
snapshot is used without the network when ``HF_HUB_OFFLINE=1`` or when the Hub cannot be reached.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from fuselm.errors import ModelNotFoundError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What a model needs from its repository: config, safetensors weights and index, tokenizer,
# chat template. Other files (other formats, images, READMEs) are not downloaded.
MODEL_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt")
TOKENIZER_PATTERNS = ("tokenizer*", "*.jinja", "special_tokens_map.json",
                      "generation_config.json", "config.json")
_TRUE = ("1", "true", "yes", "on")


def is_hub_id(name: str) -> bool:
    """True for an ``ORG/NAME`` id that is not an existing local path."""
    return _HUB_ID.fullmatch(name) is not None and not Path(name).expanduser().exists()


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks huggingface_hub never to reach the Hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def snapshot_path(repo_id: str, revision: str | None = None, download_dir: str | None = None,
                  patterns: tuple[str, ...] = MODEL_PATTERNS) -> Path:
    """The local snapshot folder of Hub repo `repo_id` at `revision` (a branch, tag or commit;
    None is ``main``), downloaded into `download_dir` (None: the huggingface_hub cache) unless
    cached. Raises ModelNotFoundError with a one-line explanation when it is neither cached nor
    reachable."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ModelNotFoundError(
            f"model {repo_id!r} looks like a Hugging Face Hub id, which needs the package "
            "huggingface_hub (pip install huggingface_hub)") from exc
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=download_dir,
                                   allow_patterns=list(patterns), local_files_only=hub_offline())
    except Exception as exc:  # noqa: BLE001  (huggingface_hub raises many kinds; all say "not found")
        raise ModelNotFoundError(_not_found_message(repo_id, revision, download_dir, exc)) from exc
    return Path(folder)


def _not_found_message(repo_id: str, revision: str | None, download_dir: str | None,
                       exc: Exception) -> str:
    from huggingface_hub import constants

    cache = download_dir or constants.HF_HUB_CACHE
    where = (f"not in the cache {cache} (offline mode: HF_HUB_OFFLINE=1)" if hub_offline()
             else f"not in the cache {cache} and the Hub could not serve it "
                  f"({type(exc).__name__}: {_first_line(exc)})")
    at = f" at revision {revision!r}" if revision else ""
    return (f"model {repo_id!r}{at} is no local path, and as a Hub id it is {where}. "
            "--model ORG/NAME is a Hugging Face Hub id, "
            "downloaded with huggingface_hub into --download-dir (default: $HF_HOME/hub) and "
            "read from there offline afterwards; --revision picks a branch, tag or commit. "
            "Download it where the Hub is reachable, or pass a local directory or .gguf file")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else "no details"
