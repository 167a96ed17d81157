"""Every kernel one model runs, chosen once when it is built, for eager steps and decode graphs.

A layer asks the model's ``KernelSet`` for its ops when it is constructed and keeps the
``KernelChoice`` objects it gets; it calls ``choice.fn``. Each choice holds an eager and a graph
implementation; the runner switches every choice of the set to the graph one while it captures
the decode CUDA graphs (``with kernels.variant("graph"):``) and back after. Choices are shared:
all RMSNorms of a model hold the same ``rms_norm`` choice, and all attention layers one
split-KV workspace. ``describe()`` lists what runs where without running anything.

Rules beyond ``resolver.resolve``:

- Batch-1 matrix-vector kernels (``gemv``, ``gemv_silu_mul``) run only on a CUDA device, where
  the gemv tuning table measured Triton faster for the weight shape (``auto``), or wherever the
  backend is ``triton``; else the layer keeps its unfused path (``fn`` None: cuBLAS).
- Decode attention with Triton is a ``PagedAttentionWorkspace`` (preallocated, CUDA-graph safe),
  sized by ``max_num_seqs`` and ``max_model_len``.
- Greedy argmax on a CUDA device is ``argmax.greedy_argmax`` (the Triton kernel where it
  applies), on a CPU ``torch.argmax``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from fuselm.kernels import resolver
from fuselm.kernels.resolver import Variant


class KernelChoice:
    """One op's implementation for eager steps and for the decode CUDA graphs; ``fn`` is the
    one in use (None: the layer's unfused path)."""

    __slots__ = ("op", "bucket", "eager", "graph", "eager_name", "graph_name", "fn")

    def __init__(self, op: str, bucket: str, eager: Callable | None, graph: Callable | None,
                 eager_name: str, graph_name: str) -> None:
        self.op, self.bucket = op, bucket
        self.eager, self.graph = eager, graph
        self.eager_name, self.graph_name = eager_name, graph_name
        self.fn = eager

    def use(self, variant: Variant) -> None:
        """Makes ``fn`` the eager or the graph implementation."""
        self.fn = self.graph if variant == "graph" else self.eager


class KernelSet:
    """The kernel choices of one model on ``device`` for ``backend`` (see the module docstring).

    ``max_num_seqs`` and ``max_model_len`` size the decode attention workspace; they are needed
    only where decode attention runs Triton.
    """

    def __init__(self, backend: str = "reference", device: torch.device | str = "cpu", *,
                 max_num_seqs: int | None = None, max_model_len: int | None = None) -> None:
        if backend not in resolver.BACKENDS:
            raise ValueError(f"unknown kernel backend {backend!r}; expected one of "
                             f"{resolver.BACKENDS}")
        self.backend = backend
        self.device = torch.device(device)
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self._choices: dict[tuple[str, str], KernelChoice] = {}
        argmax = "greedy_argmax" if self.device.type == "cuda" else "argmax_ref"
        self.argmax: Callable[[torch.Tensor], torch.Tensor] = resolver.load(
            resolver.Impl("argmax", attr=argmax))

    def _resolved(self, op: str, variant: Variant) -> tuple[Callable, str]:
        chosen = resolver.resolve_backend(op, self.backend, self.device, variant=variant,
                                          fallback=True)
        impl = resolver.TABLE[op][chosen]
        return resolver.load(impl), impl.name

    def _remember(self, key: tuple[str, str], make: Callable[[], KernelChoice]) -> KernelChoice:
        if key not in self._choices:
            self._choices[key] = make()
        return self._choices[key]

    def op(self, name: str) -> KernelChoice:
        """The choice for an op whose eager and graph implementations may differ."""
        def make() -> KernelChoice:
            eager, eager_name = self._resolved(name, "eager")
            graph, graph_name = self._resolved(name, "graph")
            return KernelChoice(name, "default", eager, graph, eager_name, graph_name)
        return self._remember((name, "default"), make)

    def eager_only(self, name: str) -> KernelChoice:
        """The choice for an op no decode graph runs (prefill attention): the eager one."""
        def make() -> KernelChoice:
            fn, fn_name = self._resolved(name, "eager")
            return KernelChoice(name, "default", fn, fn, fn_name, fn_name)
        return self._remember((name, "eager"), make)

    def gemv(self, out_features: int, in_features: int) -> KernelChoice:
        """The batch-1 kernel of a linear layer with a row-major weight ``[out, in]``."""
        return self._batch1("gemv", out_features, in_features, fits=True)

    def gemv_silu_mul(self, out_features: int, in_features: int) -> KernelChoice:
        """The batch-1 fused gate/up projection + SiLU-and-mul for a merged ``[2n, in]``
        weight (gate rows, then up rows)."""
        return self._batch1("gemv_silu_mul", out_features, in_features,
                            fits=out_features % 2 == 0)

    def _batch1(self, op: str, n: int, k: int, fits: bool) -> KernelChoice:
        bucket = "none"
        use_triton = False
        if fits and self.device.type == "cuda" and "triton" in resolver.available_backends(op):
            from fuselm.kernels.gemv import gated_bucket, shape_bucket

            bucket = gated_bucket(n // 2, k) if op == "gemv_silu_mul" else shape_bucket(n, k)
            backend = self.backend
            if backend == "auto":
                backend = resolver.tuned_backend("gemv", self.device, bucket) or "reference"
            use_triton = backend == "triton"

        def make() -> KernelChoice:
            if not use_triton:
                return KernelChoice(op, bucket, None, None, "unfused", "unfused")
            impl = resolver.TABLE[op]["triton"]
            fn = resolver.load(impl)
            return KernelChoice(op, bucket, fn, fn, impl.name, impl.name)
        return self._remember((op, bucket), make)

    def decode_attention(self, num_heads: int, head_size: int) -> KernelChoice:
        """Paged decode attention for layers with this many query heads and head size."""
        def make() -> KernelChoice:
            chosen = resolver.resolve_backend("paged_attention", self.backend, self.device,
                                              fallback=True)
            impl = resolver.TABLE["paged_attention"][chosen]
            if chosen != "triton":
                fn = resolver.load(impl)
                return KernelChoice("paged_attention", "default", fn, fn, impl.name, impl.name)
            if self.max_num_seqs is None or self.max_model_len is None:
                raise ValueError("a KernelSet running Triton decode attention needs "
                                 "max_num_seqs and max_model_len (they size its workspace)")
            resolver.load(impl)  # defines the ops the workspace launches
            from fuselm.kernels.decode_workspace import PagedAttentionWorkspace

            ws = PagedAttentionWorkspace(self.max_num_seqs, num_heads, head_size,
                                         self.max_model_len, self.device)
            name = "PagedAttentionWorkspace(fuselm::paged_attention_out)"
            return KernelChoice("paged_attention", "default", ws, ws, name, name)
        return self._remember(("paged_attention", f"h{num_heads}_d{head_size}"), make)

    @contextlib.contextmanager
    def variant(self, variant: Variant) -> Iterator[None]:
        """Every choice uses its ``variant`` implementation inside, the eager one after."""
        for choice in self._choices.values():
            choice.use(variant)
        try:
            yield
        finally:
            for choice in self._choices.values():
                choice.use("eager")

    def describe(self) -> list[dict[str, str]]:
        """One row per choice: op, shape bucket, eager and graph implementation."""
        rows = [{"op": c.op, "bucket": c.bucket, "eager": c.eager_name, "graph": c.graph_name}
                for c in self._choices.values()]
        argmax = "greedy_argmax (Triton)" if self.device.type == "cuda" else "torch.argmax"
        rows.append({"op": "argmax", "bucket": "default", "eager": argmax, "graph": argmax})
        return rows
