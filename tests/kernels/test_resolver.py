"""The kernel resolver's table and rules, the kernel set, and the extension loader."""

from __future__ import annotations

import json

import pytest
import torch

from fuselm.kernels import (
    TABLE,
    KernelSet,
    available_backends,
    extension,
    resolve,
    resolver,
    triton_utils,
)
from fuselm.kernels.rms_norm import rms_norm_ref
from fuselm.kernels.silu_and_mul import silu_and_mul_ref

OPS = ["rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_store_kv"]
CPU = torch.device("cpu")


@pytest.mark.parametrize("op", OPS)
def test_reference_everywhere_and_auto_on_cpu(op):
    assert "reference" in available_backends(op)
    assert resolve(op, "auto", CPU) is resolve(op, "reference", CPU)


def test_unknown_backend_and_op():
    with pytest.raises(ValueError):
        resolve("rms_norm", "cudnn", CPU)
    with pytest.raises(KeyError):
        resolve("no_such_op", "reference", CPU)


def test_every_table_entry_loads_and_the_reference_is_the_spec():
    assert resolve("rms_norm", "reference", CPU) is rms_norm_ref
    for op, impls in TABLE.items():
        assert "reference" in impls, op
        assert callable(resolver.load(impls["reference"])), op


@pytest.mark.parametrize("op", OPS)
def test_triton_backend_is_the_torch_op(op):
    if not triton_utils.triton_available():
        assert "triton" not in available_backends(op)
        pytest.skip("triton unavailable here")
    assert resolve(op, "triton", CPU) is getattr(torch.ops.fuselm, op).default


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_no_cuda_extension_without_cuda():
    assert extension.load_extension() is None
    assert extension.extension_status() in ("torch has no CUDA", "no CUDA device")
    for op in OPS:
        assert "cuda" not in available_backends(op)
        with pytest.raises(ValueError):
            resolve(op, "cuda", CPU)


def test_extension_sources_and_arch_flags():
    names = {p.name for p in extension.sources()}
    assert {"rms_norm.cu", "silu_and_mul.cu", "rotary_store_kv.cu", "bindings.cpp"} <= names
    assert extension.arch_gencode(9, 0) == "-gencode=arch=compute_90a,code=sm_90a"
    assert extension.arch_gencode(8, 9) == "-gencode=arch=compute_89,code=sm_89"


def test_every_extension_source_ships_in_the_package():
    """The JIT build compiles from the installed package: each csrc file matches a
    package-data pattern of pyproject.toml."""
    import fnmatch
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.package-data]", 1)[1]
    patterns = re.findall(r'"([^"]+)"', re.search(r"fuselm = \[(.*?)\]", section).group(1))
    for path in extension.CSRC_DIR.iterdir():
        rel = f"kernels/csrc/{path.name}"
        assert any(fnmatch.fnmatch(rel, pat) for pat in patterns), rel


def test_tuned_tables_are_read(tmp_path, monkeypatch):
    buckets = {
        "default": {"backend": "cuda"},
        "h4096": {"backend": "triton", "triton": {"num_warps": 4}},
    }
    table = {"NVIDIA_H100_80GB_HBM3": buckets}
    (tmp_path / "rms_norm.json").write_text(json.dumps(table))
    monkeypatch.setattr(triton_utils, "_CONFIG_DIR", tmp_path)
    triton_utils.clear_config_caches()
    try:
        monkeypatch.setattr(triton_utils, "_gpu_key", lambda index: "NVIDIA_H100_80GB_HBM3")
        cfg = triton_utils.tuned_triton_config("rms_norm", "h4096", "cuda", 0)
        assert cfg == {"num_warps": 4}
        assert triton_utils.tuned_triton_config("rms_norm", "h576", "cuda", 0) == {}
        assert triton_utils.tuned_triton_config("rms_norm", "h4096", "cpu", 0) == {}
    finally:
        triton_utils.clear_config_caches()


def test_ops_compile_without_graph_breaks():
    """The fakes let torch.compile trace every Triton op, the in-place ones included."""
    if not triton_utils.triton_available():
        pytest.skip("triton unavailable here")
    rms = resolve("rms_norm", "triton", CPU)
    fused = resolve("fused_add_rms_norm", "triton", CPU)
    silu = resolve("silu_and_mul", "triton", CPU)

    def block(x, residual, w, up):
        fused(x, residual, w, 1e-6)
        return silu(up) + rms(x, w, 1e-6).sum()

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton ops run on CUDA or, in
    # the interpreter, on the CPU
    x, residual = torch.randn(3, 32, device=dev), torch.randn(3, 32, device=dev)
    w, up = torch.randn(32, device=dev), torch.randn(3, 64, device=dev)
    x2, r2 = x.clone(), residual.clone()
    torch._dynamo.reset()
    out = torch.compile(block, backend="aot_eager", fullgraph=True)(x, residual, w, up)
    expected = block(x2, r2, w, up)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(residual, r2)
    torch.testing.assert_close(silu(up), silu_and_mul_ref(up))


def test_auto_prefers_triton_only_for_cuda_graphs_where_pdl_chains(monkeypatch):
    """Eager steps keep the cheaper-to-launch CUDA kernels; the decode graphs take the Triton
    ones when programmatic dependent launch is available, and not otherwise."""
    from fuselm.kernels import _pdl

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(_pdl, "pdl_available", lambda device: True)
    assert resolver.auto_order(cuda, "graph")[0] == "triton"
    assert resolver.auto_order(cuda, "eager")[0] == "cuda"
    monkeypatch.setattr(_pdl, "pdl_available", lambda device: False)
    assert resolver.auto_order(cuda, "graph")[0] == "cuda"


def test_tuning_entry_falls_back_to_a_gpu_of_the_same_capability(tmp_path, monkeypatch):
    table = {"GPU_A": {"b": {"backend": "triton", "triton": {"num_warps": 4}}},
             "GPU_B": {"b": {"backend": "cuda"}},
             triton_utils.CAPABILITY_KEY: {"GPU_A": "9.0", "GPU_B": "8.0"}}
    (tmp_path / "op.json").write_text(json.dumps(table))
    monkeypatch.setattr(triton_utils, "_CONFIG_DIR", tmp_path)
    names = {0: "GPU A", 1: "GPU C", 2: "GPU D"}  # C: same capability as A; D: no such GPU
    caps = {0: (9, 0), 1: (9, 0), 2: (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: names[i])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: caps[i])
    triton_utils.clear_config_caches()
    triton_utils._gpu_key.cache_clear()
    try:
        assert triton_utils.gpu_table_entry("op", 0) == table["GPU_A"]
        assert triton_utils.gpu_table_entry("op", 1) == table["GPU_A"]
        assert triton_utils.gpu_table_entry("op", 2) == {}
        assert triton_utils.tuned_triton_config("op", "b", "cuda", 1) == {"num_warps": 4}
        assert resolver.tuned_backend("op", torch.device("cuda", 1), "b") == "triton"
        assert resolver.tuned_backend("op", torch.device("cuda", 2), "b") is None
    finally:
        triton_utils.clear_config_caches()
        triton_utils._gpu_key.cache_clear()


def test_tuning_tables_from_another_folder(tmp_path, monkeypatch):
    (tmp_path / "op.json").write_text(json.dumps({"GPU_A": {"b": {"triton": {"num_warps": 2}}}}))
    monkeypatch.setenv("FUSELM_KERNEL_CONFIGS", str(tmp_path))
    monkeypatch.setattr(triton_utils, "_gpu_key", lambda index: "GPU_A")
    triton_utils.clear_config_caches()
    try:
        assert triton_utils.tuned_triton_config("op", "b", "cuda", 0) == {"num_warps": 2}
    finally:
        monkeypatch.delenv("FUSELM_KERNEL_CONFIGS")
        triton_utils.clear_config_caches()


def test_kernel_set_on_a_cpu_is_the_reference_and_unfused():
    from fuselm.kernels.paged_attention import paged_attention_ref
    from fuselm.kernels.prefill_attention import prefill_attention_ref

    kernels = KernelSet("auto", CPU)
    assert kernels.op("rms_norm").fn is rms_norm_ref
    assert kernels.op("silu_and_mul") is kernels.op("silu_and_mul")  # shared by every layer
    assert kernels.eager_only("prefill_attention").fn is prefill_attention_ref
    assert kernels.decode_attention(4, 64).fn is paged_attention_ref
    assert kernels.gemv(64, 32).fn is None and kernels.gemv_silu_mul(64, 32).fn is None
    logits = torch.randn(3, 17)
    assert torch.equal(kernels.argmax(logits), logits.argmax(dim=-1))
    ops = {row["op"] for row in kernels.describe()}
    assert {"rms_norm", "silu_and_mul", "prefill_attention", "paged_attention", "gemv",
            "argmax"} <= ops
    with pytest.raises(ValueError, match="unknown kernel backend"):
        KernelSet("fast", CPU)


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA device whose every backend is ready, with a tuning table per test (no GPU)."""
    from fuselm.kernels import _pdl

    table: dict[tuple[str, str], str] = {}
    monkeypatch.setattr(resolver, "_backend_ready", lambda backend: True)
    monkeypatch.setattr(resolver, "tuned_backend",
                        lambda op, device, bucket="default": table.get((op, bucket)))
    monkeypatch.setattr(_pdl, "pdl_available", lambda device: True)
    return table


def test_kernel_set_knows_eager_and_graph_choices_without_running(fake_cuda):
    """Without a table entry, ``auto`` takes CUDA for eager steps and Triton inside the graphs
    (PDL); a table entry decides both; the graph variant is in use only inside ``variant``."""
    from fuselm.kernels import rms_norm

    fake_cuda[("rotary_store_kv", "default")] = "triton"
    kernels = KernelSet("auto", "cuda:0")
    norm, rotary = kernels.op("rms_norm"), kernels.op("rotary_store_kv")
    assert norm.eager is rms_norm.rms_norm_cuda
    assert norm.graph is torch.ops.fuselm.rms_norm.default
    assert rotary.eager is rotary.graph is torch.ops.fuselm.rotary_store_kv.default
    assert norm.fn is norm.eager
    with kernels.variant("graph"):
        assert norm.fn is norm.graph and rotary.fn is rotary.graph
    assert norm.fn is norm.eager
    rows = {row["op"]: row for row in kernels.describe()}
    assert rows["rms_norm"]["eager"] == "rms_norm.rms_norm_cuda"
    assert rows["rms_norm"]["graph"] == "fuselm::rms_norm"
    assert rows["rotary_store_kv"]["eager"] == "fuselm::rotary_store_kv"
    # an explicit backend an op lacks falls back to auto; one it has is taken as asked
    assert KernelSet("cuda", "cuda:0").op("vocab_embedding").eager is \
        torch.ops.fuselm.vocab_embedding.default
    assert KernelSet("reference", "cuda:0").op("rms_norm").graph is rms_norm_ref


def test_importing_the_model_stack_loads_no_kernel_module():
    """Kernels load on first use: building nothing imports no op module, no Triton and does not
    touch the CUDA extension (which would build it)."""
    import subprocess
    import sys

    code = ("import sys, fuselm.kernels, fuselm.models.llama, fuselm.engine.model_runner, "
            "fuselm.runtime; "
            "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith('triton.') "
            "or m.startswith('fuselm.kernels.') and m.split('.')[2] not in "
            "('kernel_set', 'resolver', 'kv_quant')))")  # kv_quant: the cache's number format
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    assert out.stdout.strip() == "[]", out.stdout
