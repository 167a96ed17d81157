"""Weights streamed from CPU memory (ZeRO-Inference style): ``--cpu-offload-gb N``.

Which weights: whole decoder layers of this rank (its TP shard of its PP stage), counted as vLLM
counts them: layers are offloaded until N GiB (2**30 bytes, vLLM's unit, per GPU) are, so the
last one may overshoot. They are spread evenly over the stage and the last offloaded layer is the
stage's last: each copy overlaps the resident layers before its layer, and a link-bound step
ends one layer after its last copy (not after every resident layer).

Where: each offloaded layer's parameters live in one host buffer (pinned on CUDA, registered with
``cudaHostRegister``: the exact size, where the caching host allocator would round 1.7 GB up to
2 GiB) at the same byte offsets as in one of two device staging buffers ("slots"). The layer's
parameters are views of its slot (offloaded layer j uses slot j % 2), so their addresses never
change and the decode CUDA graphs capture the copies (H2D memcpy nodes from pinned memory) and
the cross-stream event waits as graph dependencies.

When (per forward, installed as forward hooks on the decoder layers; the model file knows nothing
of it), on a copy stream:

- before the stage's first layer: ``start`` is recorded on the compute stream (the previous
  step's users of both slots are done); the copy stream waits for it and copies offloaded layers
  0 and 1 into slots 0 and 1;
- before offloaded layer j: the compute stream waits for ``ready[j % 2]`` (its copy);
- after offloaded layer j: ``free[j % 2]`` is recorded on the compute stream; the copy stream
  waits for it and copies offloaded layer j + 2 into that slot.

Every copy is waited on by the compute stream, so a graph capture joins the copy stream back.
On a CPU the same code runs with host and device both CPU memory: the copies still happen
(synchronously), so CI checks that outputs do not change.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fuselm.errors import ConfigError

logger = logging.getLogger(__name__)

GIB = 2**30
ALIGN = 256  # bytes: every parameter starts 256-byte aligned in its slot (vector loads, TMA)
ASSUMED_H2D_GBS = 55.5  # pinned host-to-device, measured on the lent H200 box (issue 19)


@contextlib.contextmanager
def deferred_parameters(enabled: bool = True) -> Iterator[None]:
    """Inside, every parameter a module registers becomes a meta tensor (its memory is freed at
    once), so a model larger than the device can be built; ``materialize`` gives each parameter
    its home with the value it had when registered (what a module writes into a parameter
    after registering it, as ``nn.Linear.reset_parameters`` does, is lost: fuselm's layers
    fill before registering, and the weights load later). Buffers stay real. torch's
    registration hooks are process-wide: build one model at a time inside."""
    if not enabled:
        yield
        return

    def to_meta(module: nn.Module, name: str, param: nn.Parameter) -> nn.Parameter | None:
        if param.is_meta:  # a tied parameter registered again: keep the same object
            return None
        meta = nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)
        meta.__dict__.update(param.__dict__)  # weight_loader, shard metadata, ...
        meta._deferred_init = _initial_value(param.data)
        return meta

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


SMALL_INIT = 1 << 20  # elements: a non-constant initial value up to this size is kept


def _initial_value(data: torch.Tensor) -> float | torch.Tensor | None:
    """What a deferred parameter starts as: its fill (``torch.full``, ``torch.ones``), a CPU
    copy when small and not constant, or None (zeros: ``torch.empty`` memory, which the
    checkpoint or the dummy initializer overwrites)."""
    if data.numel() == 0:
        return None
    first = data.reshape(-1)[0]
    if bool((data == first).all()):
        return first.item()
    return data.cpu() if data.numel() <= SMALL_INIT else None


def _fill_initial(data: torch.Tensor, init: float | torch.Tensor | None) -> torch.Tensor:
    """Writes a deferred parameter's initial value (``_initial_value``) into ``data``."""
    if init is None:
        return data.zero_()
    if isinstance(init, torch.Tensor):
        return data.copy_(init)
    return data.fill_(init)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The stage's decoder layers in forward order: ``model.layers`` (ModuleDict or ModuleList),
    the one contract a model keeps with this module."""
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.ModuleDict):
        return list(layers.values())
    if isinstance(layers, nn.ModuleList):
        return list(layers)
    raise ValueError(f"--cpu-offload-gb: {type(model).__name__} has no decoder layers "
                     "(model.layers)")


def _param_bytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


def layer_bytes(layer: nn.Module) -> int:
    """Bytes of a layer's parameters (meta or real)."""
    return sum(_param_bytes(p) for p in layer.parameters())


def choose_offloaded(sizes: list[int], budget_bytes: int) -> list[int]:
    """Indices of the layers to offload: as many whole layers as vLLM takes for the budget
    (until at least ``budget_bytes`` are offloaded, or all), spread evenly with the last one
    the last layer. ``sizes``: bytes of each layer, in forward order."""
    count, total = 0, 0
    for size in sizes:  # equal layers in practice; count them as vLLM does, in order
        if total >= budget_bytes:
            break
        total += size
        count += 1
    n = len(sizes)
    return [((i + 1) * n) // count - 1 for i in range(count)] if count else []


def _span(t: torch.Tensor) -> int:
    """Elements of storage a tensor covers; equal to numel for a dense (permuted) layout."""
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))


@dataclass
class _Entry:
    """One offloaded parameter: where it sits in its layer's host buffer and slot."""

    param: nn.Parameter
    offset: int  # bytes


def _view(flat: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A tensor of ``like``'s dtype, shape and strides at byte ``offset`` of uint8 ``flat``."""
    nbytes = _span(like) * like.element_size()
    typed = flat[offset: offset + nbytes].view(like.dtype)
    return typed.as_strided(like.shape, like.stride())


def _register_pinned(flat: torch.Tensor) -> None:
    """Page-locks a CPU tensor's memory for async H2D copies; unregistered when it is freed
    (a freed but registered range would make the next registration of its address fail)."""
    cudart = torch.cuda.cudart()
    err = int(cudart.cudaHostRegister(flat.data_ptr(), flat.numel(), 0))
    if err != 0:
        raise ConfigError(f"--cpu-offload-gb: pinning {flat.numel() / 1e9:.2f} GB of host memory "
                          f"failed (cudaHostRegister error {err}); lower --cpu-offload-gb")
    weakref.finalize(flat, cudart.cudaHostUnregister, flat.data_ptr())  # flat: the owner


class _OffloadedLayer:
    """An offloaded layer's host buffer and the layout its slot shares. Built from the layer's
    meta parameters, which it replaces with parameters of the same attributes viewing the host
    buffer (zeros)."""

    def __init__(self, index: int, layer: nn.Module, pin: bool) -> None:
        self.index, offset = index, 0
        layout: dict[int, tuple[nn.Parameter, int]] = {}
        for p in layer.parameters():  # a parameter shared inside the layer: listed once
            layout[id(p)] = (p, offset)
            offset += -(-_span(p) * p.element_size() // ALIGN) * ALIGN
        self.nbytes = offset
        self.host = torch.zeros(offset, dtype=torch.uint8)
        if pin:
            _register_pinned(self.host)
        made: dict[int, nn.Parameter] = {}
        for module in layer.modules():
            for name, p in list(module._parameters.items()):
                if p is None or id(p) not in layout:
                    continue
                if id(p) not in made:
                    made[id(p)] = _new_param(p, _view(self.host, layout[id(p)][1], p))
                module._parameters[name] = made[id(p)]
        self.entries = [_Entry(made[key], off) for key, (_, off) in layout.items()]

    def refresh(self, layer: nn.Module, pin: bool) -> None:
        """Lays the host buffer out anew when the layer's parameters are no longer the ones it
        was built from (a quantization method replaced or added some after loading)."""
        params = list(layer.parameters())
        if [id(p) for p in params] == [id(e.param) for e in self.entries]:
            return
        offsets, offset = [], 0
        for p in params:
            offsets.append(offset)
            offset += -(-_span(p) * p.element_size() // ALIGN) * ALIGN
        host = torch.zeros(offset, dtype=torch.uint8)
        if pin:
            _register_pinned(host)
        for p, off in zip(params, offsets, strict=True):
            _view(host, off, p.data).copy_(p.data)
            p.data = _view(host, off, p.data)
        self.host, self.nbytes = host, offset
        self.entries = [_Entry(p, off) for p, off in zip(params, offsets, strict=True)]

    def point_at(self, slot: torch.Tensor) -> None:
        """Makes the layer's parameters views of ``slot``, after the host buffer holds their
        current values in their current layout (a parameter re-laid out since it was built,
        e.g. the CPU's transposed GEMV layout, is copied back in)."""
        for e in self.entries:
            data = e.param.data
            if _span(data) != data.numel():
                raise ValueError(f"--cpu-offload-gb: a parameter of layer {self.index} has a "
                                 f"non-dense layout {tuple(data.stride())}")
            home = _view(self.host, e.offset, data)
            if home.data_ptr() != data.data_ptr() or home.stride() != data.stride():
                home.copy_(data)
            e.param.data = _view(slot, e.offset, data)


def _new_param(p: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    """The real parameter of deferred ``p``: ``data`` holding its initial value, and p's
    attributes (weight_loader and whatever else the layer set)."""
    attrs = dict(p.__dict__)
    new = nn.Parameter(_fill_initial(data, attrs.pop("_deferred_init", None)),
                       requires_grad=False)
    new.__dict__.update(attrs)
    return new


def _materialize_resident(model: nn.Module, device: torch.device, skip: set[int]) -> None:
    """Allocates every meta parameter outside the offloaded layers on ``device`` with its
    initial value (an embedding's padding rows stay zero), keeping ties (one object per shared
    parameter)."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta or id(p) in skip:
                continue
            if id(p) not in made:
                made[id(p)] = _new_param(p, torch.empty(p.shape, dtype=p.dtype, device=device))
            module._parameters[name] = made[id(p)]


def materialize(model: nn.Module, cpu_offload_gb: float, device: torch.device,
                ) -> WeightOffloader:
    """Gives every parameter of a model built under ``deferred_parameters`` its home: the
    offloaded layers' (``choose_offloaded``) in host buffers, the others on ``device`` (zeros;
    weights load into both afterwards). Returns the offloader; ``install`` it once the weights
    are loaded and laid out."""
    layers = decoder_layers(model)
    chosen = choose_offloaded([layer_bytes(layer) for layer in layers], int(cpu_offload_gb * GIB))
    offloaded_ids = {id(p) for i in chosen for p in layers[i].parameters()}
    resident = sum(_param_bytes(p) for p in set(model.parameters()) if id(p) not in offloaded_ids)
    staging = 2 * max((layer_bytes(layers[i]) for i in chosen), default=0)
    _check_fits(resident + staging, device, cpu_offload_gb)
    _materialize_resident(model, device, offloaded_ids)
    pin = device.type == "cuda"
    offloader = WeightOffloader(layers, [_OffloadedLayer(i, layers[i], pin) for i in chosen],
                                device)
    offloader.resident_bytes = resident
    return offloader


def _check_fits(device_bytes: int, device: torch.device, cpu_offload_gb: float) -> None:
    """ConfigError when what stays on the GPU (resident weights + two staging slots) exceeds
    its free memory: the message names the flag to raise."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if device_bytes > free:
        raise ConfigError(
            f"with --cpu-offload-gb {cpu_offload_gb}, {device_bytes / GIB:.1f} GiB of weights and "
            f"staging stay on {device}, which has {free / GIB:.1f} GiB free; raise "
            f"--cpu-offload-gb by at least {(device_bytes - free) / GIB:.0f}")


def init_dummy(model: nn.Module, offloader: WeightOffloader, seed: int,
               init: Callable[[nn.Module, int], None]) -> None:
    """Runs the dummy initializer ``init(model, seed)`` (``loader.init_dummy_weights``) so that
    every offloaded parameter is drawn on the device (fast, and the same values as without
    offload) and then copied to its host home."""
    init(_DeviceStaged(model, offloader), seed)  # type: ignore[arg-type]


class _DeviceStaged:
    """Stands in for the model in an initializer that walks ``named_parameters()``: an
    offloaded parameter is handed out as a device scratch tensor, copied to its host home when
    the initializer asks for the next parameter (so it has finished writing it)."""

    def __init__(self, model: nn.Module, offloader: WeightOffloader) -> None:
        self.model, self.device = model, offloader.device
        self.offloaded = {id(e.param) for layer in offloader.offloaded for e in layer.entries}

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.model.named_parameters():
            if id(p) not in self.offloaded:
                yield name, p
                continue
            # the same strides: a random fill may draw differently for another layout
            scratch = nn.Parameter(torch.empty_strided(p.shape, p.stride(), dtype=p.dtype,
                                                       device=self.device), requires_grad=False)
            yield name, scratch
            p.data.copy_(scratch.data)


class _Hook:
    """A forward (pre-)hook that knows its offloader (``offloader_of`` finds it)."""

    def __init__(self, offloader: WeightOffloader, fn: Callable[..., None]) -> None:
        self.offloader, self.fn = offloader, fn

    def __call__(self, *args: object) -> None:
        self.fn(*args)


def offloader_of(model: nn.Module) -> WeightOffloader | None:
    """The offloader installed on ``model``'s decoder layers, or None."""
    for layer in decoder_layers(model)[:1]:
        for hook in layer._forward_pre_hooks.values():
            if isinstance(hook, _Hook):
                return hook.offloader
    return None


class WeightOffloader:
    """The offloaded layers of one model, their two staging slots on the device and the hooks
    that stream them in (see the module docstring)."""

    def __init__(self, layers: list[nn.Module], offloaded: list[_OffloadedLayer],
                 device: torch.device) -> None:
        self.layers, self.offloaded, self.device = layers, offloaded, device
        self.is_cuda = device.type == "cuda"
        self.slots: list[torch.Tensor] = []
        self.h2d_gbs: float | None = None  # measured at install on CUDA
        self.h2d_measured = False
        self.resident_bytes = 0  # the model's parameters on the device (set by materialize)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        if self.is_cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.start = torch.cuda.Event()
            self.ready = [torch.cuda.Event(), torch.cuda.Event()]
            self.free = [torch.cuda.Event(), torch.cuda.Event()]

    @property
    def offloaded_bytes(self) -> int:
        """Bytes of parameters streamed each forward (the slots' padding excluded)."""
        return sum(_param_bytes(e.param) for layer in self.offloaded for e in layer.entries)

    @property
    def offloaded_indices(self) -> list[int]:
        """Positions (in the stage's layers) of the offloaded layers."""
        return [layer.index for layer in self.offloaded]

    def install(self) -> None:
        """Allocates the slots, points the offloaded parameters at them and registers the
        hooks; call once the weights are loaded and in their final layout."""
        if not self.offloaded:
            return
        for layer in self.offloaded:
            layer.refresh(self.layers[layer.index], self.is_cuda)
        size = max(layer.nbytes for layer in self.offloaded)
        num_slots = min(2, len(self.offloaded))
        self.slots = [torch.empty(size, dtype=torch.uint8, device=self.device)
                      for _ in range(num_slots)]
        for j, layer in enumerate(self.offloaded):
            layer.point_at(self.slots[j % num_slots])
        by_index = {layer.index: j for j, layer in enumerate(self.offloaded)}
        for i, module in enumerate(self.layers):
            j = by_index.get(i)
            if i == 0 or j is not None:  # a hook costs a Python call per layer in eager steps
                self._hooks.append(module.register_forward_pre_hook(self._pre_hook(i == 0, j)))
            if j is not None:
                self._hooks.append(module.register_forward_hook(self._post_hook(j)))
        if self.is_cuda:
            self.h2d_gbs, self.h2d_measured = self.measure_h2d_gbs(), True

    def _pre_hook(self, first: bool, j: int | None) -> _Hook:
        def hook(module: nn.Module, args: tuple) -> None:
            if first:
                self._begin_forward()
            if j is not None and self.is_cuda:
                torch.cuda.current_stream(self.device).wait_event(self.ready[j % 2])
        return _Hook(self, hook)

    def _post_hook(self, j: int) -> _Hook:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if j + 2 >= len(self.offloaded):
                return
            if self.is_cuda:
                self.free[j % 2].record(torch.cuda.current_stream(self.device))
                self.copy_stream.wait_event(self.free[j % 2])
            self._copy(j + 2)
        return _Hook(self, hook)

    def _begin_forward(self) -> None:
        if self.is_cuda:  # the previous users of both slots (the last step) come before this
            self.start.record(torch.cuda.current_stream(self.device))
            self.copy_stream.wait_event(self.start)
        for j in range(min(2, len(self.offloaded))):
            self._copy(j)

    def _copy(self, j: int) -> None:
        """Queues offloaded layer j's host -> slot copy (and its ``ready`` event)."""
        layer, slot = self.offloaded[j], self.slots[j % len(self.slots)]
        if not self.is_cuda:
            slot[: layer.nbytes].copy_(layer.host)
            return
        with torch.cuda.stream(self.copy_stream):
            slot[: layer.nbytes].copy_(layer.host, non_blocking=True)
        self.ready[j % 2].record(self.copy_stream)

    def measure_h2d_gbs(self, reps: int = 3) -> float:
        """Host -> device GB/s of the largest offloaded layer's copy (its own slot, so nothing
        in use is overwritten; the slot is refilled before the first forward anyway)."""
        layer = max(self.offloaded, key=lambda entry: entry.nbytes)
        slot = self.slots[0][: layer.nbytes]
        slot.copy_(layer.host, non_blocking=True)  # warm-up
        torch.cuda.synchronize(self.device)
        begin = time.perf_counter()
        for _ in range(reps):
            slot.copy_(layer.host, non_blocking=True)
        torch.cuda.synchronize(self.device)
        return reps * layer.nbytes / (time.perf_counter() - begin) / 1e9

    def link_step_seconds(self) -> float:
        """The least time a forward takes for its copies: offloaded bytes / H2D bandwidth
        (measured, else the H200's 55.5 GB/s pinned)."""
        return self.offloaded_bytes / ((self.h2d_gbs or ASSUMED_H2D_GBS) * 1e9)

    def remove(self) -> None:
        """Removes the hooks (the parameters stay views of the slots)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


def summary(offloader: WeightOffloader) -> str:
    """The startup report's line: what is offloaded, the link's bandwidth and the step time it
    allows."""
    n, total = len(offloader.offloaded), len(offloader.layers)
    where = "pinned CPU memory" if offloader.is_cuda else "CPU memory (a CPU device: host copies)"
    gbs = offloader.h2d_gbs or ASSUMED_H2D_GBS
    how = "measured" if offloader.h2d_measured else "assumed (H200 pinned)"
    return (f"weight offload: {offloader.offloaded_bytes / 1e9:.2f} GB "
            f"({offloader.offloaded_bytes / GIB:.2f} GiB) of {n}/{total} layers "
            f"{offloader.offloaded_indices} in {where}; H2D {gbs:.1f} GB/s {how} -> a step takes "
            f"at least {offloader.link_step_seconds() * 1e3:.1f} ms for its copies")


def warn_if_fits(offloader: WeightOffloader, kv_bytes_needed: int,
                 gpu_memory_utilization: float) -> bool:
    """Logs a warning (and returns True) when the offloaded weights would fit on the GPU beside
    the resident ones and a KV cache of ``kv_bytes_needed`` (one sequence of max_model_len):
    streaming them only slows every step down."""
    if not offloader.is_cuda or not offloader.offloaded:
        return False
    _, total = torch.cuda.mem_get_info(offloader.device)
    staging = sum(slot.numel() for slot in offloader.slots)
    need = offloader.resident_bytes + offloader.offloaded_bytes  # the whole model, resident
    others = torch.cuda.memory_allocated(offloader.device) - offloader.resident_bytes - staging
    if others + need + kv_bytes_needed > gpu_memory_utilization * total:
        return False
    logger.warning("--cpu-offload-gb: all %.1f GiB of weights would fit on %s (%.1f GiB at "
                   "--gpu-memory-utilization %.2f, with a KV cache of one max_model_len "
                   "sequence); offloading only slows every step down (>= %.1f ms of copies)",
                   need / GIB, offloader.device, gpu_memory_utilization * total / GIB,
                   gpu_memory_utilization, offloader.link_step_seconds() * 1e3)
    return True
