"""Every CUDA source compiles: each .cu with nvcc for sm_90a (with the flags torch's build adds),
and bindings.cpp against torch's headers (syntax only). Skips when there is no nvcc."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from fuselm.kernels import extension

CU_FILES = sorted(extension.CSRC_DIR.glob("*.cu"))


def _find_nvcc() -> str | None:
    """The machine's nvcc, else the one of the ``nvidia-cuda-nvcc`` PyPI package."""
    found = shutil.which("nvcc")
    if found:
        return found
    if cpp_extension.CUDA_HOME and Path(cpp_extension.CUDA_HOME, "bin", "nvcc").exists():
        return str(Path(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    try:
        import nvidia.cuda_nvcc as pkg  # type: ignore[import-not-found]

        candidate = Path(list(pkg.__path__)[0], "bin", "nvcc")
        return str(candidate) if candidate.exists() else None
    except ImportError:
        return None


NVCC = _find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="no nvcc (install nvidia-cuda-nvcc)")


def test_every_cu_file_is_tested():
    assert {p.name for p in CU_FILES} >= {"rms_norm.cu", "silu_and_mul.cu", "rotary_store_kv.cu",
                                          "quant_gemv.cu"}


@pytest.fixture(scope="module")
def nvcc_runs(tmp_path_factory) -> Iterator[dict[str, subprocess.Popen]]:
    """One nvcc process per .cu file, all started at once (the CI machine's cores compile
    side by side); each test waits for its own."""
    out = tmp_path_factory.mktemp("cu")
    runs = {}
    for source in CU_FILES:
        cmd = [
            NVCC, "-c", str(source), "-o", str(out / f"{source.stem}.o"),
            f"-I{extension.CSRC_DIR}", "-std=c++17", "-Werror=all-warnings",
            *cpp_extension.COMMON_NVCC_FLAGS, *extension.NVCC_FLAGS, extension.arch_gencode(9, 0),
        ]  # fmt: skip
        runs[source.name] = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True)
    yield runs
    for run in runs.values():
        if run.poll() is None:
            run.kill()


@needs_nvcc
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_for_sm90a(source, nvcc_runs):
    run = nvcc_runs[source.name]
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, f"{' '.join(run.args)}\n{stdout}\n{stderr}"


@needs_nvcc
def test_bindings_cpp_compiles(tmp_path):
    """Syntax check against torch's headers; a CPU-only torch lacks one generated CUDA header,
    which a stub replaces."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    homes = [os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda",
             str(Path(NVCC).resolve().parent.parent)]  # fmt: skip
    found = [Path(h, "include") for h in homes if h and Path(h, "include/cuda_runtime.h").exists()]
    if not found:
        pytest.skip(f"no CUDA headers under {homes}")
    cuda_include = found[0]
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(cuda_include)]
    if not any(Path(p, "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in includes):
        stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        stub.parent.mkdir(parents=True)
        stub.write_text("#pragma once\n")
        includes.append(str(tmp_path))
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C",
           f"-I{extension.CSRC_DIR}", *(f"-I{p}" for p in includes),
           str(extension.CSRC_DIR / "bindings.cpp")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr[-4000:]}"


# Compiles every Triton kernel for sm_90 without a GPU (Triton ships ptxas) and checks for
# 16-byte accesses. Runs in a child process: the kernels must be real JIT functions, not the
# interpreter's, and fuselm defines them only where CUDA looks available.
_TRITON_AOT = r"""
import re, sys, torch
torch.cuda.is_available = lambda: True
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fuselm.kernels import rms_norm as rn, rotary_store_kv as rk, silu_and_mul as sm

def build(fn, sig, consts, num_warps, plain=()):
    names = list(sig)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in plain}
    src = ASTSource(fn, {**sig, **{k: "constexpr" for k in consts}}, consts, attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    return k.asm["ptx"]

def check(name, ptx):
    vec = bool(re.search(r"ld\.global\.v4\.b32", ptx) and re.search(r"st\.global\.v4\.b32", ptx))
    print(name, "v4" if vec else "NO-V4")
    if not vec:
        sys.exit(f"{name}: no 16-byte loads and stores")

for dt in ("bf16", "fp32"):
    p = "*" + dt
    sig = dict(x_ptr=p, residual_ptr=p, w_ptr=p, out_ptr=p, num_rows="i32", hidden="i32",
               x_stride="i32", residual_stride="i32", out_stride="i32", eps="fp32")
    for add in (False, True):
        for cfg in (rn._norm_config(4096, 2, 16384, "rms_norm", torch.device("cpu")),
                    rn._NormConfig(4096, 1, 8, False)):
            consts = dict(BLOCK=cfg.block, ROWS=cfg.rows, ADD_RESIDUAL=add,
                          ONE_PASS=cfg.one_pass, NUM_CHUNKS=1 if cfg.one_pass else 3)
            check(f"rms {dt} add={add} {cfg}", build(rn._rms_norm_kernel, sig, consts,
                  cfg.num_warps, ("num_rows", "eps")))
    sig = dict(x_ptr=p, out_ptr=p, d="i32", x_stride="i32", out_stride="i32")
    check(f"silu {dt}", build(sm._silu_and_mul_kernel, sig, dict(BLOCK=2048), 4))
    names = ("q_ptr k_ptr v_ptr pos_ptr cos_sin_ptr kc_ptr vc_ptr slot_ptr num_heads num_kv_heads "
             "head_size half block_size cos_sin_stride q_tok_stride q_head_stride k_tok_stride "
             "k_head_stride v_tok_stride v_head_stride kc_block_stride kc_slot_stride "
             "kc_head_stride vc_block_stride vc_slot_stride vc_head_stride").split()
    types = [p, p, p, "*i64", "*fp32", p, p, "*i64"] + ["i32"] * 18
    for geometry in ((32, 8, 128, 128), (9, 3, 64, 32)):
        cfg = rk._rotary_config(*geometry, torch.device("cpu"))
        warps = cfg.pop("num_warps")
        ptx = build(rk._rotary_store_kv_kernel, dict(zip(names, types)), cfg, warps,
                    ("num_heads", "num_kv_heads", "block_size"))
        check(f"rotary {dt} {geometry}", ptx)

# Programmatic dependent launch: the decode-path kernels wait for their predecessor and release
# their successor (griddepcontrol) when built with USE_PDL; gemv streams weights before waiting.
from fuselm.kernels import gemv as gv

def check_pdl(name, ptx, prefetch=False):
    wait = ptx.find("griddepcontrol.wait")
    ok = wait >= 0 and "griddepcontrol.launch_dependents" in ptx
    if prefetch:  # a 16-byte weight load is issued before the wait
        first_load = re.search(r"ld\.global\.L1::evict_first[^\n]*\.v4\.b32", ptx)
        ok = ok and first_load is not None and first_load.start() < wait
    print(name, "pdl" if ok else "NO-PDL")
    if not ok:
        sys.exit(f"{name}: griddepcontrol missing or misplaced")

bf = "*bf16"
sig = dict(x_ptr=bf, w_ptr=bf, b_ptr=bf, out_ptr=bf, N="i32", K="i32", x_stride="i32",
           w_stride="i32", out_stride="i32")
consts = dict(HAS_BIAS=False, BLOCK_N=1, BLOCK_K=4096, EVEN_N=True, EVEN_K=True, NUM_STAGES=1,
              PREFETCH=True, USE_PDL=True)
check_pdl("gemv", build(gv._gemv_kernel, sig, consts, 8), prefetch=True)
check_pdl("gemv no prefetch", build(gv._gemv_kernel, sig, {**consts, "PREFETCH": False}, 8))
check_pdl("gemv gated", build(gv._gemv_kernel, sig, {**consts, "GATED": True}, 8), prefetch=True)
sig = dict(x_ptr=bf, residual_ptr=bf, w_ptr=bf, out_ptr=bf, num_rows="i32", hidden="i32",
           x_stride="i32", residual_stride="i32", out_stride="i32", eps="fp32")
consts = dict(BLOCK=4096, ROWS=1, ADD_RESIDUAL=True, ONE_PASS=True, NUM_CHUNKS=1, USE_PDL=True)
check_pdl("rms", build(rn._rms_norm_kernel, sig, consts, 8, ("num_rows", "eps")))
sig = dict(x_ptr=bf, out_ptr=bf, d="i32", x_stride="i32", out_stride="i32")
check_pdl("silu", build(sm._silu_and_mul_kernel, sig, dict(BLOCK=2048, USE_PDL=True), 4))
cfg = rk._rotary_config(32, 8, 128, 128, torch.device("cpu"))
warps = cfg.pop("num_warps")
types = [bf, bf, bf, "*i64", "*fp32", bf, bf, "*i64"] + ["i32"] * 18
check_pdl("rotary", build(rk._rotary_store_kv_kernel, dict(zip(names, types)),
                          {**cfg, "USE_PDL": True}, warps,
                          ("num_heads", "num_kv_heads", "block_size")))

from fuselm.kernels import vocab_embedding as ve

ptx = build(ve._vocab_embedding_kernel, dict(ids_ptr="*i64", w_ptr=bf, out_ptr=bf, start="i32",
                                             rows="i32", dim="i32", w_stride="i32"),
            dict(BLOCK=4096, USE_PDL=True), 8, ("start", "rows"))
check_pdl("vocab_embedding", ptx)
check("vocab_embedding", ptx)

# The one-shot all-reduce: 16-byte stores to the peers (none of 2 bytes), 16-byte volatile polls
# of its own buffer (a cached load could spin on a stale line forever), one atomic a program
# (none with a single program), PDL.
from fuselm.kernels import all_reduce as ar

sig = dict(x_ptr=bf, residual_ptr=bf, w_ptr=bf, out_ptr=bf, peers_ptr="*i64", local_ptr="*i16",
           state_ptr="*i32", rank="i32", hidden="i32", rank_numel="i32", eps="fp32")
for norm in (True, False):
    for single in (False, True):  # one program (batch 1) advances the count without an atomic
        ptx = build(ar._all_reduce_kernel, sig, dict(EMPTY=-32768, WORD_BYTES=2, WORLD=2,
                                                     BLOCK=4096, NORM=norm, SINGLE=single,
                                                     USE_PDL=True), 8, ("rank", "eps"))
        check_pdl(f"all_reduce norm={norm} single={single}", ptx)
        ok = (re.search(r"ld\.volatile\.global\.v4\.b32", ptx)
              and re.search(r"st\.global\.v4\.b32", ptx)
              and len(re.findall(r"atom\.global", ptx)) == (0 if single else 1)
              and not re.search(r"st\.global\.b16", ptx))  # no 2-byte stores to the peers
        print(f"all_reduce norm={norm} single={single}", "ok" if ok else "BAD")
        if not ok:
            sys.exit("all_reduce: volatile 16-byte polls, 16-byte stores or the atomic count")

# Greedy argmax: every load of the row 16 bytes wide, pipelined or not; the spans' merge.
from fuselm.kernels import argmax as am

for dt in ("bf16", "fp32"):
    for stages in (1, 3):
        sig = dict(x_ptr="*" + dt, out_ptr="*i32", val_ptr="*fp32", n="i32", x_stride="i32")
        consts = dict(BLOCK=4096, NUM_STAGES=stages, USE_PDL=True, SPAN=4096 * stages)
        ptx = build(am._argmax_kernel, sig, consts, 8)
        check_pdl(f"argmax {dt} stages={stages}", ptx)
        loads = re.findall(r"(?:ld\.global|cp\.async\.c[ag]\.shared\.global)[^\n]*", ptx)
        ok = bool(loads) and all(".v4." in ld or ", 0x10," in ld for ld in loads)
        print(f"argmax {dt} stages={stages}", "v4" if ok else "NOT-16B", len(loads))
        if not ok:
            sys.exit(f"argmax {dt} stages={stages}: loads narrower than 16 bytes: {loads[:3]}")
check_pdl("argmax merge", build(am._argmax_merge_kernel, dict(
    val_ptr="*fp32", idx_ptr="*i32", out_ptr="*i64", num_spans="i32"),
    dict(P_PAD=32, USE_PDL=True), 1, ("num_spans",)))
"""


def test_triton_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(extension.CSRC_DIR.parents[2])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", _TRITON_AOT], capture_output=True, text=True,
                            env=env, timeout=600)  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-4000:]}"
