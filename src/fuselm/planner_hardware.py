"""Constants of the planner: GPU spec sheets, interconnects and known model shapes.

Every number here comes from a vendor spec sheet or a model's published config.json; the
source is named next to it and listed in docs/perf/log/planner.md. Nothing here is fitted to our
own runs. Efficiencies (how much of a peak a kernel reaches) are not spec-sheet numbers: they
are planner options (``PlanOptions``) whose defaults are documented, and that a user replaces with
micro-benchmark results (``--mem-bandwidth`` from ``fuselm bench latency``'s copy measurement,
``--allreduce-latency-us`` from nccl-tests).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuselm.config import ModelConfig

GIB = 1024**3
GB = 1e9

A100_DATASHEET = (
    "NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf), "
    "SXM column"
)
H100_DATASHEET = "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM and H100 PCIe columns)"
H200_DATASHEET = "NVIDIA H200 Tensor Core GPU datasheet / product page (H200 SXM column)"
DGX_A100_GUIDE = "NVIDIA DGX A100 datasheet: 8x ConnectX-6 HDR 200 Gb/s InfiniBand, 1 per GPU"
DGX_H100_GUIDE = "NVIDIA DGX H100 datasheet: 8x ConnectX-7 NDR 400 Gb/s InfiniBand, 1 per GPU"


DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "fp8": 1.0, "int8": 1.0,
               "int4": 0.5}


def dtype_bytes(dtype: Any) -> float:
    """Bytes per element of a dtype name (``bf16`` and ``fp16`` accepted), a ``torch.dtype`` or
    a number of bytes."""
    if isinstance(dtype, (int, float)):
        return float(dtype)
    if not isinstance(dtype, str):  # torch.dtype, without importing torch here
        return float(dtype.itemsize)
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
            "float": "float32"}.get(dtype, dtype)
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


@dataclass(frozen=True)
class GPUSpec:
    """One GPU model's spec-sheet ceilings."""

    name: str
    """Canonical name, e.g. ``H100-SXM``."""
    memory_gib: float
    """HBM capacity (the datasheet's "80GB" is 80 GiB of HBM; the driver reserves a little,
    which ``gpu_memory_utilization`` covers)."""
    mem_bandwidth_gbs: float
    """Peak HBM bandwidth, 1e9 bytes/s."""
    bf16_tflops: float
    """Dense (no sparsity) BF16/FP16 tensor-core peak, 1e12 FLOP/s."""
    nvlink_gbs: float
    """GPU-to-GPU bandwidth per direction inside a node, 1e9 bytes/s (the datasheet's NVLink
    figure is the sum of both directions; we halve it)."""
    inter_node_gbs: float
    """Network bandwidth per GPU per direction between nodes in the reference system (one NIC per
    GPU), 1e9 bytes/s."""
    source: str
    """Where these numbers come from."""


GPUS: dict[str, GPUSpec] = {
    "A100-40GB": GPUSpec("A100-40GB", 40, 1555, 312, 600 / 2, 200 / 8,
                         f"{A100_DATASHEET}; {DGX_A100_GUIDE}"),
    "A100-80GB": GPUSpec("A100-80GB", 80, 2039, 312, 600 / 2, 200 / 8,
                         f"{A100_DATASHEET}; {DGX_A100_GUIDE}"),
    "H100-SXM": GPUSpec("H100-SXM", 80, 3350, 989, 900 / 2, 400 / 8,
                        f"{H100_DATASHEET}; {DGX_H100_GUIDE}"),
    # H100 PCIe: 2 TB/s, 756 TFLOPS dense BF16; NVLink bridge 600 GB/s (pairs only).
    "H100-PCIe": GPUSpec("H100-PCIe", 80, 2000, 756, 600 / 2, 400 / 8, H100_DATASHEET),
    "H200-SXM": GPUSpec("H200-SXM", 141, 4800, 989, 900 / 2, 400 / 8,
                        f"{H200_DATASHEET}; {DGX_H100_GUIDE} (DGX H200 has the same NICs)"),
}

# Device-to-device copy bandwidth (bytes read + written, GB/s) measured by
# ``bench.common.copy_bandwidth_gbs`` on these cards: the ceiling a decode step's bandwidth is
# compared with when the run does not measure it (docs/perf/README.md).
MEASURED_COPY_GBS: dict[str, float] = {"H100-SXM": 3000.0, "H200-SXM": 4270.0}


# Host-to-device copies from pinned memory (GB/s, one direction) measured on these cards' hosts:
# the link offloaded weights (--cpu-offload-gb) stream over. H200: the lent box (issue 19:
# 55.5 GB/s pinned H2D, PCIe Gen5 x16). Elsewhere ``H2D_EFFICIENCY`` x the PCIe spec.
MEASURED_H2D_GBS: dict[str, float] = {"H200-SXM": 55.5}
PCIE_GBS: dict[str, float] = {  # PCIe spec per direction: Gen4 x16 32 GB/s, Gen5 x16 64 GB/s
    "A100-40GB": 32.0, "A100-80GB": 32.0, "H100-SXM": 64.0, "H100-PCIe": 64.0, "H200-SXM": 64.0}
H2D_EFFICIENCY = 55.5 / 64.0  # the H200 box's measured fraction of Gen5 x16


def h2d_gbs(gpu: GPUSpec) -> float:
    """Pinned host-to-device GB/s of a GPU's link: measured where known, else
    ``H2D_EFFICIENCY`` x its PCIe spec."""
    return MEASURED_H2D_GBS.get(gpu.name) or H2D_EFFICIENCY * PCIE_GBS.get(gpu.name, 32.0)


_GPU_ALIASES = {
    "a100": "A100-80GB", "a100-40": "A100-40GB", "a100-40gb": "A100-40GB",
    "a100-80": "A100-80GB", "a100-80gb": "A100-80GB", "h100": "H100-SXM", "h100-sxm": "H100-SXM",
    "h100-80gb": "H100-SXM", "h100-pcie": "H100-PCIe", "h200": "H200-SXM", "h200-sxm": "H200-SXM",
}


def get_gpu(name: str) -> GPUSpec:
    """The spec of a GPU by name or alias (case-insensitive); ValueError if unknown."""
    key = name.strip()
    if key in GPUS:
        return GPUS[key]
    alias = _GPU_ALIASES.get(key.lower().replace("_", "-").replace(" ", "-"))
    if alias is None:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[alias]


def gpu_from_device_name(device_name: str) -> GPUSpec | None:
    """Maps a CUDA device name (``NVIDIA H100 80GB HBM3``) to a spec, or None if unknown."""
    n = device_name.upper()
    if "H200" in n:
        return GPUS["H200-SXM"]
    if "H100" in n:
        return GPUS["H100-PCIe"] if "PCIE" in n else GPUS["H100-SXM"]
    if "A100" in n:
        return GPUS["A100-40GB"] if "40GB" in n else GPUS["A100-80GB"]
    return None


def _llama(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int,
           max_pos: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "max_position_embeddings": max_pos, "tie_word_embeddings": False,
    }


KNOWN_MODELS: dict[str, dict[str, Any]] = {
    # config.json of meta-llama/Meta-Llama-3-8B, -70B and Llama-3.1-405B on the Hugging Face Hub.
    "Llama-3-8B": _llama(4096, 14336, 32, 32, 8, 128256, 8192),
    "Llama-3-70B": _llama(8192, 28672, 80, 64, 8, 128256, 8192),
    "Llama-3-405B": _llama(16384, 53248, 126, 128, 8, 128256, 131072),
    # The 30B example: 48 layers, hidden 7168, intermediate 19200, full multi-head
    # attention (56 heads of 128), 32000-token vocabulary: 30.1e9 parameters, 60.3 GB in fp16.
    "30B": _llama(7168, 19200, 48, 56, 56, 32000, 4096),
}

_MODEL_ALIASES = {
    "llama-3-8b": "Llama-3-8B", "meta-llama-3-8b": "Llama-3-8B", "llama-3.1-8b": "Llama-3-8B",
    "llama-3-70b": "Llama-3-70B", "meta-llama-3-70b": "Llama-3-70B",
    "llama-3.1-70b": "Llama-3-70B", "llama-3-405b": "Llama-3-405B",
    "llama-3.1-405b": "Llama-3-405B", "meta-llama-3.1-405b": "Llama-3-405B",
    "30b": "30B", "30b-example": "30B",
}


def known_model_dict(name: str) -> dict[str, Any] | None:
    """The config dict of a known model name (case-insensitive, org prefix ignored), or None."""
    if name in KNOWN_MODELS:
        return dict(KNOWN_MODELS[name])
    key = name.strip().split("/")[-1].lower()
    alias = _MODEL_ALIASES.get(key)
    return dict(KNOWN_MODELS[alias]) if alias else None


@dataclass(frozen=True)
class ClusterSpec:
    """GPUs of one kind in ``num_nodes`` nodes of ``gpus_per_node``; ranks fill nodes in order."""

    gpu: GPUSpec
    num_nodes: int = 1
    gpus_per_node: int = 8
    intra_node_gbs: float | None = None
    """Per-direction GPU-to-GPU bandwidth in a node (GB/s); None: the GPU's NVLink figure."""
    inter_node_gbs: float | None = None
    """Per-GPU network bandwidth between nodes (GB/s); None: the reference system's NIC."""

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    def link_gbs(self, crosses_nodes: bool) -> float:
        """Spec bandwidth of the slowest link a transfer uses."""
        if crosses_nodes:
            return self.inter_node_gbs or self.gpu.inter_node_gbs
        return self.intra_node_gbs or self.gpu.nvlink_gbs

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def tp_crosses_nodes(self, tp: int) -> bool:
        """Whether any group of tp consecutive ranks spans two nodes."""
        return any(self.node_of(k * tp) != self.node_of((k + 1) * tp - 1)
                   for k in range(self.num_gpus // tp))

    def hop_crosses_nodes(self, tp: int, stage: int) -> bool:
        """Whether the stage -> stage+1 sends (rank r -> r + tp) of replica 0 leave a node."""
        return any(self.node_of(r) != self.node_of(r + tp)
                   for r in range(stage * tp, (stage + 1) * tp))


def collective_seconds(nbytes: float, n: int, link_gbs: float, latency_us: float,
                       efficiency: float, all_gather: bool = False) -> float:
    """Ring all-reduce (or all-gather) time: latency + 2(n-1)/n x bytes / (efficiency x link)."""
    if n == 1:
        return 0.0
    factor = (n - 1) / n if all_gather else 2 * (n - 1) / n
    return latency_us * 1e-6 + factor * nbytes / (efficiency * link_gbs * GB)


def load_model_shape(model: str | None) -> tuple[str, ModelConfig]:
    """(name, ModelConfig) of a known name, a config.json, a HF directory or a .gguf file."""
    if model in (None, "", "default"):
        from fuselm.loading.loader import load_config_dict, resolve_model

        return "default", ModelConfig.from_hf_dict(load_config_dict(resolve_model(None)))
    known = known_model_dict(model)
    if known is not None:
        return model, ModelConfig.from_hf_dict(known)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".json":
        return path.parent.name or model, ModelConfig.from_hf_dict(json.loads(path.read_text()))
    from fuselm.loading.loader import load_config_dict, resolve_model

    return path.name, ModelConfig.from_hf_dict(load_config_dict(resolve_model(model)))
