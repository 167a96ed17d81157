"""--cpu-offload-gb: weights streamed from host memory give the same tokens as resident ones.

On a CPU the offload runs with host and device both CPU memory: the offloaded layers' weights
live in host buffers and are copied into two staging slots before each of them runs. The tests
check the tokens (greedy and seeded) against the same engine without offload, that the
parameters really are views of the slots, and (negative control) that a changed host buffer
changes the output, so the host copy is what runs.
"""

from __future__ import annotations

import logging

import pytest
import torch

from fuselm import LLM, SamplingParams
from fuselm.bench.dummy_model import write_dummy_checkpoint
from fuselm.engine import weight_offload
from fuselm.engine.weight_offload import GIB, choose_offloaded, offloader_of
from tests.tiny_models import make_tiny_checkpoint

PROMPTS = [[5, 17, 99, 3], [200, 1, 42], list(range(30, 70))]


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """2 layers, tied embeddings, loaded from safetensors (the checkpoint path)."""
    return make_tiny_checkpoint("llama-linear-tied", tmp_path_factory.mktemp("offload") / "m")


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    """4 layers of dummy weights (the --load-format dummy path)."""
    return write_dummy_checkpoint("llama-tiny", tmp_path_factory.mktemp("offload4") / "d")


def _tokens(llm: LLM, seeded: bool = True) -> list[list[int]]:
    """Greedy tokens of PROMPTS, then (``seeded``) seeded samples of them."""
    params: list = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)]
    if seeded:
        params.append([SamplingParams(temperature=0.9, top_p=0.9, max_tokens=6,
                                      ignore_eos=True, seed=100 + i)
                       for i in range(len(PROMPTS))])
    outs = [o for p in params for o in llm.generate(PROMPTS, p)]
    return [list(o.outputs[0].token_ids) for o in outs]


def _layer_gib(llm: LLM) -> float:
    layer = weight_offload.decoder_layers(llm.engine.runner.model)[0]
    return weight_offload.layer_bytes(layer) / GIB


@pytest.mark.parametrize("which", ["tied", "tiny4"])
def test_offloaded_tokens_equal_resident_ones(which, request) -> None:
    path = request.getfixturevalue(which)
    kwargs = dict(device="cpu", max_model_len=128, max_num_seqs=4)
    if which == "tiny4":
        kwargs["load_format"] = "dummy"
    base = LLM(str(path), **kwargs)
    expected = _tokens(base)
    # all layers of the 2-layer model (both slots); 3 of the 4 (a slot reused, odd count)
    num = 2 if which == "tied" else 3
    gb = _layer_gib(base) * (num - 0.5)
    del base
    llm = LLM(str(path), cpu_offload_gb=gb, **kwargs)
    off = offloader_of(llm.engine.runner.model)
    assert off is not None and len(off.offloaded) == num
    for j, layer in enumerate(off.offloaded):  # the parameters are views of their slot
        slot = off.slots[j % 2]
        for e in layer.entries:
            ptr = e.param.data_ptr()
            assert slot.data_ptr() <= ptr < slot.data_ptr() + slot.numel()
    assert _tokens(llm) == expected


def test_a_changed_host_buffer_changes_the_output(tiny4) -> None:
    """Negative control: the weights that run are the host buffer's, copied in each forward."""
    llm = LLM(str(tiny4), device="cpu", load_format="dummy", max_model_len=128,
              max_num_seqs=4, cpu_offload_gb=1e-9)  # one layer: the last
    off = offloader_of(llm.engine.runner.model)
    assert off.offloaded_indices == [3]
    before = _tokens(llm, seeded=False)
    host = off.offloaded[0].host.view(torch.float32)
    host.mul_(-3.0)  # every weight of layer 3 changed in host memory only
    assert _tokens(llm, seeded=False) != before


def test_startup_report_names_the_offloaded_bytes(tiny4, caplog) -> None:
    caplog.set_level(logging.INFO, logger="fuselm.startup")
    llm = LLM(str(tiny4), device="cpu", load_format="dummy", max_model_len=64,
              cpu_offload_gb=_layer_gib_of(tiny4) * 1.5)
    off = offloader_of(llm.engine.runner.model)
    lines = [r.getMessage() for r in caplog.records if r.name == "fuselm.startup"]
    line = next(x for x in lines if x.startswith("weight offload:"))
    # 2 of 4 layers, spread evenly, the last one last; the bytes as the parameters count them
    assert off.offloaded_indices == [1, 3]
    nbytes = sum(p.numel() * 4 for i in (1, 3)
                 for p in llm.engine.runner.model.layers[str(i)].parameters())
    assert off.offloaded_bytes == nbytes
    assert f"{nbytes / 1e9:.2f} GB" in line and "2/4 layers [1, 3]" in line
    assert f"{nbytes / 55.5e9 * 1e3:.1f} ms" in line  # no measurement on a CPU: the H200's


def _layer_gib_of(path) -> float:
    """Bytes of one llama-tiny layer in float32, from its config (independent of the model)."""
    h, inter, heads, kv_heads = 256, 512, 8, 2
    hd = h // heads
    params = h * (heads + 2 * kv_heads) * hd + heads * hd * h + 3 * h * inter + 2 * h
    return params * 4 / GIB


@pytest.mark.parametrize(("sizes", "budget", "expected"), [
    ([10] * 8, 0, []),
    ([10] * 8, 1, [7]),            # any budget takes a whole layer: the last
    ([10] * 8, 10, [7]),           # exactly one layer
    ([10] * 8, 11, [3, 7]),        # vLLM's count: until the budget is reached
    ([10] * 8, 35, [1, 3, 5, 7]),
    ([10] * 8, 80, list(range(8))),
    ([10] * 8, 1000, list(range(8))),
    ([10] * 5, 25, [0, 2, 4]),     # 3 of 5: floor((i + 1) * 5 / 3) - 1
])
def test_choose_offloaded(sizes, budget, expected) -> None:
    assert choose_offloaded(sizes, budget) == expected


def test_deferred_parameters_keep_ties_attributes_and_initial_values() -> None:
    from torch import nn

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Module(), nn.Module()
            self.a.weight = nn.Parameter(torch.randn(4, 4))  # a random value: kept (small)
            self.a.weight.tag = "kept"
            self.b.weight = self.a.weight
            self.points = nn.Parameter(torch.full((3,), 8.0), requires_grad=False)  # a fill
            self.big = nn.Parameter(torch.empty(weight_offload.SMALL_INIT + 1))  # uninitialized
            self.register_buffer("table", torch.arange(3.0))

    torch.manual_seed(3)
    ref = Tied()
    torch.manual_seed(3)
    with weight_offload.deferred_parameters():
        model = Tied()
    assert model.a.weight.is_meta and model.big.is_meta and model.b.weight is model.a.weight
    assert model.a.weight.tag == "kept" and torch.equal(model.table, torch.arange(3.0))
    weight_offload._materialize_resident(model, torch.device("cpu"), set())
    assert model.b.weight is model.a.weight and model.a.weight.tag == "kept"
    assert torch.equal(model.a.weight, ref.a.weight)
    assert torch.equal(model.points, torch.full((3,), 8.0))
    assert torch.count_nonzero(model.big) == 0
    assert not hasattr(model.a.weight, "_deferred_init")
    plain = nn.Linear(2, 2)  # outside the context nothing is deferred
    assert not plain.weight.is_meta


@pytest.mark.gpu
def test_offload_in_cuda_graphs_equals_resident(tiny4) -> None:
    """H200: the decode graphs capture the copies and event waits: graph replays with offload
    give the tokens of eager offload and of no offload (bf16, same dummy weights)."""
    kwargs = dict(load_format="dummy", max_model_len=256, max_num_seqs=8)
    base = LLM(str(tiny4), **kwargs)
    expected = _tokens(base)
    gb = _layer_gib(base) * 2.5  # 3 of 4 layers
    del base
    torch.cuda.empty_cache()
    eager = LLM(str(tiny4), cpu_offload_gb=gb, enforce_eager=True, **kwargs)
    assert _tokens(eager) == expected
    del eager
    graphs = LLM(str(tiny4), cpu_offload_gb=gb, **kwargs)
    off = offloader_of(graphs.engine.runner.model)
    assert len(off.offloaded) == 3 and off.h2d_gbs > 1.0
    assert _tokens(graphs) == expected
    assert graphs.engine.stats()["num_graph_replays"] > 0


LLAMA3_8B_LAYER_BYTES = 2 * (4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096)


def test_planner_offload_prediction() -> None:
    """fuselm plan with --cpu-offload-gb: the copies' time from the link bandwidth, the step
    no shorter than the copies plus a layer, no longer than copies + the resident step, and
    the memory of the offloaded layers (less two staging slots) off the GPU."""
    from fuselm import planner
    from fuselm.planner_hardware import GPUS, ClusterSpec, load_model_shape

    _, m = load_model_shape("Llama-3-8B")
    base_opts = planner.PlanOptions(context_len=256)
    opts = planner.PlanOptions(context_len=256, cpu_offload_gb=8)
    # 8 GiB / 436.2 MB a layer = 19.7: vLLM's count takes 20 layers
    assert planner.offloaded_layers(m, 1, 32, opts) == 20
    for batch in (1, 64, 256):
        base = planner.decode_step_ms(m, "H200", base_opts, batch)
        off = planner.decode_step_ms(m, "H200", opts, batch)
        link_ms = 20 * LLAMA3_8B_LAYER_BYTES / 55.5e9 * 1e3  # the H200 box's pinned H2D
        assert off["offload"] == pytest.approx(link_ms, rel=1e-9)
        assert link_ms + base["total"] / 32 <= off["total"] <= link_ms + base["total"]
    fast = planner.PlanOptions(context_len=256, cpu_offload_gb=0.1, h2d_bandwidth_gbs=1e6)
    assert planner.decode_step_ms(m, "H200", fast, 256)["total"] == pytest.approx(
        planner.decode_step_ms(m, "H200", base_opts, 256)["total"])  # copies hidden
    cluster = ClusterSpec(GPUS["H200-SXM"], 1, 1)
    full = planner.plan_layout(m, cluster, base_opts, 1, 1)
    part = planner.plan_layout(m, cluster, opts, 1, 1)
    assert (full.weight_gib - part.weight_gib) * GIB == pytest.approx(18 * LLAMA3_8B_LAYER_BYTES)
    _, m70 = load_model_shape("Llama-3-70B")
    assert not planner.plan_layout(m70, cluster, base_opts, 1, 1).feasible
    assert planner.plan_layout(m70, cluster, planner.PlanOptions(
        context_len=256, cpu_offload_gb=60), 1, 1).feasible


class _FakeStream:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def wait_event(self, event) -> None:
        self.log.append(("wait", self.name, event.name))


class _FakeEvent:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def record(self, stream) -> None:
        self.log.append(("record", stream.name, self.name))


def test_stream_order_of_copies_and_layers(tiny4, monkeypatch) -> None:
    """The CUDA ordering on fake streams and events: every offloaded layer waits for its own
    copy; a copy into a slot waits for the end of that slot's previous layer (or the step's
    start); the copy stream is never left with work the compute stream does not wait for."""
    import contextlib

    llm = LLM(str(tiny4), device="cpu", load_format="dummy", max_model_len=64,
              cpu_offload_gb=_layer_gib_of(tiny4) * 2.5)  # layers 0, 1, 3 (odd: slot 0 twice)
    off = offloader_of(llm.engine.runner.model)
    assert off.offloaded_indices == [0, 1, 3]
    log: list = []
    compute, copy = _FakeStream("compute", log), _FakeStream("copy", log)
    off.is_cuda, off.copy_stream = True, copy
    off.start = _FakeEvent("start", log)
    off.ready = [_FakeEvent("ready0", log), _FakeEvent("ready1", log)]
    off.free = [_FakeEvent("free0", log), _FakeEvent("free1", log)]
    current = [compute]
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0])

    @contextlib.contextmanager
    def on(stream):
        current[0] = stream
        yield
        current[0] = compute

    monkeypatch.setattr(torch.cuda, "stream", on)
    real_copy = off._copy
    monkeypatch.setattr(off, "_copy", lambda j: (log.append(("copy", current[0].name, j)),
                                                 real_copy(j)))
    for i, layer in enumerate(off.layers):  # "layer": its kernels start; "end": they are done
        layer.register_forward_pre_hook(lambda m, a, i=i: log.append(("layer", "compute", i)))
        layer.register_forward_hook(lambda m, a, o, i=i: log.append(("end", "compute", i)),
                                    prepend=True)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, ignore_eos=True))  # 3 forwards
    assert _check_order(log, off.offloaded_indices) == 3


def _check_order(log: list, offloaded: list[int]) -> int:
    """Replays the log in stream order (a wait makes a stream depend on everything the event's
    stream had done when it was recorded) and asserts the invariants; returns the forwards."""
    marks: dict[str, set] = {}
    done: dict[str, set] = {"compute": set(), "copy": set()}
    waited: dict[str, set] = {"compute": set(), "copy": set()}
    n = -1  # the forward, counted at its start event
    last_user = {s: max(j for j in range(len(offloaded)) if j % 2 == s) for s in (0, 1)
                 if s < len(offloaded)}
    for kind, stream, what in log:
        if kind == "record":
            n += what == "start"
            marks[what] = set(done[stream])
        elif kind == "wait":
            waited[stream] |= marks[what]
        elif kind == "copy":
            j = what
            if j >= 2:  # the slot's previous layer of this forward has run
                assert ("end", n, offloaded[j - 2]) in waited["copy"], (n, j)
            elif n > 0:  # the previous forward's last layer in this slot has run
                assert ("end", n - 1, offloaded[last_user[j]]) in waited["copy"], (n, j)
            done["copy"].add(("copied", n, j))
        elif kind == "layer" and what in offloaded:
            assert ("copied", n, offloaded.index(what)) in waited["compute"], (n, what)
        elif kind == "end":
            done["compute"].add(("end", n, what))
    copies = {x for x in done["copy"]}
    assert copies <= waited["compute"]  # every copy joined back into the compute stream
    assert len(copies) == (n + 1) * len(offloaded)
    return n + 1


def test_parameters_replaced_after_loading_are_streamed() -> None:
    """A layer whose parameters a quantization method replaces (another dtype) or adds after
    loading: install lays the host buffer out anew and streams those."""
    from torch import nn

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 4), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x @ self.weight.float().t()
            return y * self.scale if hasattr(self, "scale") else y

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Layer() for _ in range(3))

    with weight_offload.deferred_parameters():
        model = Model()
    off = weight_offload.materialize(model, 1e-9, torch.device("cpu"))  # the last layer
    assert off.offloaded_indices == [2]
    gen = torch.Generator().manual_seed(0)
    for layer in model.layers:
        layer.weight.data.copy_(torch.randn(4, 4, generator=gen))
    w0, w1 = model.layers[0].weight.clone(), model.layers[1].weight.clone()
    last = model.layers[2]
    packed = torch.randint(-8, 8, (4, 4), dtype=torch.int8, generator=gen)
    last.weight = nn.Parameter(packed.clone(), requires_grad=False)  # replaced: int8
    last.scale = nn.Parameter(torch.full((4,), 0.5), requires_grad=False)  # added
    off.install()
    slot = off.slots[0]
    for p in (last.weight, last.scale):  # views of the slot now
        assert slot.data_ptr() <= p.data_ptr() < slot.data_ptr() + slot.numel()
    slot.zero_()  # refilled from the host buffer before the layer runs
    x = torch.randn(2, 4, generator=gen)
    out = x
    for layer in model.layers:
        out = layer(out)
    want = (x @ w0.t() @ w1.t()) @ packed.float().t() * 0.5
    torch.testing.assert_close(out, want)
    assert torch.equal(last.weight, packed)
