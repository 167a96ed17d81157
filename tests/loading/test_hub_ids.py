"""Hub ids: ``--model org/name`` resolved through huggingface_hub from a cache laid out as the
Hub's (``models--org--name/{blobs,refs,snapshots/<commit>}``), offline, at a revision."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fuselm.errors import ModelNotFoundError
from fuselm.loading.loader import resolve_model
from tests.tiny_models import make_tiny_checkpoint

pytest.importorskip("huggingface_hub")

REPO = "tiny-org/tiny-llama"
COMMIT_OLD = "a" * 40
COMMIT_NEW = "b" * 40


def _add_snapshot(repo_dir: Path, commit: str, source: Path) -> Path:
    """Stores `source`'s files as the Hub does: content-addressed blobs, and a snapshot folder
    of symlinks to them named by the commit."""
    blobs, snapshot = repo_dir / "blobs", repo_dir / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        data = file.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A Hub cache with two commits of REPO: ``main`` -> COMMIT_NEW, tag ``v1`` -> COMMIT_OLD;
    the two hold different random weights (seeds 0 and 1) and configs (eps 1e-5 vs 1e-6)."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    repo_dir = cache / ("models--" + REPO.replace("/", "--"))
    for commit, seed in ((COMMIT_OLD, 0), (COMMIT_NEW, 1)):
        src = make_tiny_checkpoint("llama-linear-tied", root / f"src-{seed}", seed=seed)
        if seed == 1:  # the two commits differ in their config too
            cfg = (src / "config.json").read_text().replace('"rms_norm_eps": 1e-05',
                                                           '"rms_norm_eps": 1e-06')
            (src / "config.json").write_text(cfg)
        _add_snapshot(repo_dir, commit, src)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT_NEW)
    (repo_dir / "refs" / "v1").write_text(COMMIT_OLD)
    return cache


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _snapshot(cache: Path, commit: str) -> Path:
    return cache / ("models--" + REPO.replace("/", "--")) / "snapshots" / commit


@pytest.mark.parametrize("revision,commit", [(None, COMMIT_NEW), ("main", COMMIT_NEW),
                                             ("v1", COMMIT_OLD), (COMMIT_OLD, COMMIT_OLD)])
def test_hub_id_resolves_offline_at_revision(hub_cache, offline, revision, commit) -> None:
    source = resolve_model(REPO, revision=revision, download_dir=str(hub_cache))
    assert source.format == "hf"
    assert source.path.resolve() == _snapshot(hub_cache, commit).resolve()
    assert (source.path / "model.safetensors").is_file()


def test_tokenizer_hub_id_resolves(hub_cache, offline) -> None:
    source = resolve_model(REPO, download_dir=str(hub_cache), tokenizer=REPO)
    assert source.tokenizer_path is not None
    assert source.tokenizer_path.resolve() == _snapshot(hub_cache, COMMIT_NEW).resolve()


def test_missing_revision_and_repo_are_one_line_errors(hub_cache, offline) -> None:
    for repo, revision in (("tiny-org/absent", None), (REPO, "no-such-branch")):
        with pytest.raises(ModelNotFoundError) as info:
            resolve_model(repo, revision=revision, download_dir=str(hub_cache))
        message = str(info.value)
        assert "\n" not in message
        assert repo in message and "HF_HUB_OFFLINE=1" in message
        assert "Hub id" in message and "--download-dir" in message


def test_unreachable_hub_uses_the_cache_or_explains(hub_cache, monkeypatch) -> None:
    """Not offline, but the Hub cannot be reached (a closed local port): a cached repo still
    resolves; one not cached is a one-line error saying the Hub could not serve it."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    source = resolve_model(REPO, revision="v1", download_dir=str(hub_cache))
    assert source.path.resolve() == _snapshot(hub_cache, COMMIT_OLD).resolve()
    with pytest.raises(ModelNotFoundError, match="could not serve it") as info:
        resolve_model("tiny-org/absent", download_dir=str(hub_cache))
    assert "\n" not in str(info.value)


def _cli(args: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf-home")}
    return subprocess.run([sys.executable, "-m", "fuselm", "generate", "--model", REPO,
                           "--download-dir", str(cache), "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


@pytest.mark.parametrize("revision,commit", [("v1", COMMIT_OLD), (None, COMMIT_NEW)])
def test_revision_weights_equal_transformers(hub_cache, offline, tmp_path, revision,
                                             commit) -> None:
    """The engine built from ``org/name`` at a revision gives the greedy tokens transformers
    gives for that commit's files copied to a plain folder (the two commits differ)."""
    transformers = pytest.importorskip("transformers")
    import torch

    from fuselm import LLM, SamplingParams

    local = tmp_path / "copy"
    shutil.copytree(_snapshot(hub_cache, commit), local)  # read without any Hub machinery
    hf = transformers.AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32)
    prompt = torch.randint(0, 256, (7,)).tolist()
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                           min_new_tokens=8)[0, len(prompt):].tolist()
    llm = LLM(REPO, revision=revision, download_dir=str(hub_cache), device="cpu",
              num_gpu_blocks=32, block_size=8)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8,
                                                ignore_eos=True))
    assert out[0].outputs[0].token_ids == want


def test_cli_generates_from_hub_id(hub_cache, tmp_path) -> None:
    """Through the real CLI, offline: ``--model org/name --revision v1`` answers."""
    result = _cli(["--revision", "v1", "--raw-prompt", "--max-tokens", "4", "--ignore-eos",
                   "Hi"], hub_cache, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flag,kwargs", [("--revision", {"revision": "v1"}),
                                         ("--download-dir", {"download_dir": "/tmp/x"})])
def test_hub_flags_without_hub_id_are_refused(hub_cache, flag, kwargs) -> None:
    """--revision / --download-dir would do nothing for a local folder: refused by name."""
    from fuselm.errors import ConfigError

    local = _snapshot(hub_cache, COMMIT_OLD)
    for model in (str(local), None):
        with pytest.raises(ConfigError, match=flag):
            resolve_model(model, **kwargs)
