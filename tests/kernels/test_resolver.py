"""Backend registry, op registration and the extension loader."""

from __future__ import annotations

import json

import pytest
import torch

from fuselm.kernels import _extension, _registry, _triton_utils, available_backends, select
from fuselm.kernels.rms_norm import rms_norm_ref
from fuselm.kernels.silu_and_mul import silu_and_mul_ref

OPS = ["rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_store_kv"]
CPU = torch.device("cpu")


@pytest.mark.parametrize("op", OPS)
def test_reference_everywhere_and_auto_on_cpu(op):
    assert "reference" in available_backends(op)
    assert select(op, "auto", CPU) is select(op, "reference", CPU)


def test_unknown_backend_and_op():
    with pytest.raises(ValueError):
        select("rms_norm", "cudnn", CPU)
    with pytest.raises(KeyError):
        select("no_such_op", "reference", CPU)
    with pytest.raises(ValueError):
        _registry.register("rms_norm", "auto", rms_norm_ref)


@pytest.mark.parametrize("op", OPS)
def test_triton_backend_is_the_torch_op(op):
    if not _triton_utils.triton_available():
        assert "triton" not in available_backends(op)
        pytest.skip("triton unavailable here")
    assert select(op, "triton", CPU) is getattr(torch.ops.fuselm, op).default


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_no_cuda_extension_without_cuda():
    assert _extension.load_extension() is None
    assert _extension.extension_status() in ("torch has no CUDA", "no CUDA device")
    for op in OPS:
        assert "cuda" not in available_backends(op)
        with pytest.raises(ValueError):
            select(op, "cuda", CPU)


def test_extension_sources_and_arch_flags():
    names = {p.name for p in _extension.sources()}
    assert {"rms_norm.cu", "silu_and_mul.cu", "rotary_store_kv.cu", "bindings.cpp"} <= names
    assert _extension.arch_gencode(9, 0) == "-gencode=arch=compute_90a,code=sm_90a"
    assert _extension.arch_gencode(8, 9) == "-gencode=arch=compute_89,code=sm_89"


def test_tuned_tables_are_read(tmp_path, monkeypatch):
    buckets = {
        "default": {"backend": "cuda"},
        "h4096": {"backend": "triton", "triton": {"num_warps": 4}},
    }
    table = {"NVIDIA_H100_80GB_HBM3": buckets}
    (tmp_path / "rms_norm.json").write_text(json.dumps(table))
    monkeypatch.setattr(_triton_utils, "_CONFIG_DIR", tmp_path)
    _triton_utils.clear_config_caches()
    try:
        monkeypatch.setattr(_triton_utils, "_gpu_key", lambda index: "NVIDIA_H100_80GB_HBM3")
        cfg = _triton_utils.tuned_triton_config("rms_norm", "h4096", "cuda", 0)
        assert cfg == {"num_warps": 4}
        assert _triton_utils.tuned_triton_config("rms_norm", "h576", "cuda", 0) == {}
        assert _triton_utils.tuned_triton_config("rms_norm", "h4096", "cpu", 0) == {}
    finally:
        _triton_utils.clear_config_caches()


def test_ops_compile_without_graph_breaks():
    """The fakes let torch.compile trace every Triton op, the in-place ones included."""
    if not _triton_utils.triton_available():
        pytest.skip("triton unavailable here")
    rms = select("rms_norm", "triton", CPU)
    fused = select("fused_add_rms_norm", "triton", CPU)
    silu = select("silu_and_mul", "triton", CPU)

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
    from fuselm.kernels import _pdl, _registry

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(_pdl, "pdl_available", lambda device: True)
    assert _registry._preference(cuda, for_graphs=True)[0] == "triton"
    assert _registry._preference(cuda, for_graphs=False)[0] == "cuda"
    monkeypatch.setattr(_pdl, "pdl_available", lambda device: False)
    assert _registry._preference(cuda, for_graphs=True)[0] == "cuda"


def test_tuning_entry_falls_back_to_a_gpu_of_the_same_capability(tmp_path, monkeypatch):
    table = {"GPU_A": {"b": {"backend": "triton", "triton": {"num_warps": 4}}},
             "GPU_B": {"b": {"backend": "cuda"}},
             _triton_utils.CAPABILITY_KEY: {"GPU_A": "9.0", "GPU_B": "8.0"}}
    (tmp_path / "op.json").write_text(json.dumps(table))
    monkeypatch.setattr(_triton_utils, "_CONFIG_DIR", tmp_path)
    names = {0: "GPU A", 1: "GPU C", 2: "GPU D"}  # C: same capability as A; D: no such GPU
    caps = {0: (9, 0), 1: (9, 0), 2: (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: names[i])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: caps[i])
    _triton_utils.clear_config_caches()
    _triton_utils._gpu_key.cache_clear()
    try:
        assert _triton_utils.gpu_table_entry("op", 0) == table["GPU_A"]
        assert _triton_utils.gpu_table_entry("op", 1) == table["GPU_A"]
        assert _triton_utils.gpu_table_entry("op", 2) == {}
        assert _triton_utils.tuned_triton_config("op", "b", "cuda", 1) == {"num_warps": 4}
        assert _registry.tuned_backend("op", torch.device("cuda", 1), "b") == "triton"
        assert _registry.tuned_backend("op", torch.device("cuda", 2), "b") is None
    finally:
        _triton_utils.clear_config_caches()
        _triton_utils._gpu_key.cache_clear()


def test_tuning_tables_from_another_folder(tmp_path, monkeypatch):
    (tmp_path / "op.json").write_text(json.dumps({"GPU_A": {"b": {"triton": {"num_warps": 2}}}}))
    monkeypatch.setenv("FUSELM_KERNEL_CONFIGS", str(tmp_path))
    monkeypatch.setattr(_triton_utils, "_gpu_key", lambda index: "GPU_A")
    _triton_utils.clear_config_caches()
    try:
        assert _triton_utils.tuned_triton_config("op", "b", "cuda", 0) == {"num_warps": 2}
    finally:
        monkeypatch.delenv("FUSELM_KERNEL_CONFIGS")
        _triton_utils.clear_config_caches()
