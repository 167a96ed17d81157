"""The custom one-shot all-reduce on 2 real GPUs (two processes, NCCL beside it): the plain sum
and the fused sum + residual add + RMSNorm against a float64 reference of every rank's inputs,
the same bits on both ranks, eager calls of changing sizes between CUDA-graph replays."""

from __future__ import annotations

import os
import time

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

EPS = 1e-5
HIDDEN = 4096


def _reference(inputs, residual, weight):
    """The sum and the new residual as NCCL + an unfused add give them (float32 adds rounded to
    the dtype: bit-exact), the normed output in float64."""
    dtype = inputs[0].dtype
    total = (inputs[0].float() + inputs[1].float()).to(dtype)
    new_residual = (total.float() + residual.float()).to(dtype)
    h = new_residual.double()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * weight.double()
    return total, new_residual, normed.to(dtype)


def _worker(rank: int, port: int) -> None:
    import torch.distributed as dist

    from fuselm.parallel.custom_all_reduce import CustomAllReduce
    from tests.tolerances import assert_close

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, device_id=device)
    custom = CustomAllReduce(dist.group.WORLD, device, torch.bfloat16)
    gen = torch.Generator(device).manual_seed(1234)  # same stream on both ranks
    weight = torch.randn(HIDDEN, generator=gen, device=device).bfloat16()

    def inputs(rows: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        xs = [torch.randn(rows, HIDDEN, generator=gen, device=device).bfloat16()
              for _ in range(2)]
        xs[1][0, :8] = -0.0
        return xs, torch.randn(rows, HIDDEN, generator=gen, device=device).bfloat16()

    def check(xs, residual, out, new_residual=None) -> None:
        total, want_residual, normed = _reference(xs, residual, weight)
        if new_residual is None:
            assert torch.equal(out, total), "plain sum differs from the reference"
        else:
            assert torch.equal(new_residual, want_residual), "residual differs"
            assert_close(out, normed, name="normed")
        gathered = [torch.empty_like(out) for _ in range(2)]
        dist.all_gather(gathered, out)
        assert torch.equal(gathered[0], gathered[1]), "ranks disagree"

    def eager(rows: int, fused: bool) -> None:
        xs, residual = inputs(rows)
        x = xs[rank].clone()
        if fused:
            res = residual.clone()
            custom.all_reduce_add_rms_norm(x, res, weight, EPS)
            check(xs, residual, x, res)
        else:
            check(xs, residual, custom.all_reduce(x))

    for rows in (1, 3, 128, 1, 2, 64):  # both slots, sizes growing and shrinking
        eager(rows, fused=True)
        eager(rows, fused=False)

    # a decode graph: fused, plain, fused at another size; eager calls between replays
    static_x = [torch.zeros(1, HIDDEN, dtype=torch.bfloat16, device=device),
                torch.zeros(1, HIDDEN, dtype=torch.bfloat16, device=device),
                torch.zeros(4, HIDDEN, dtype=torch.bfloat16, device=device)]
    static_res = [torch.zeros_like(static_x[0]), torch.zeros_like(static_x[2])]
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up outside the graph, as capture requires
        custom.all_reduce_add_rms_norm(static_x[0], static_res[0], weight, EPS)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        custom.all_reduce_add_rms_norm(static_x[0], static_res[0], weight, EPS)
        plain_out = custom.all_reduce(static_x[1])
        custom.all_reduce_add_rms_norm(static_x[2], static_res[1], weight, EPS)
    for replay in range(4):
        cases = [inputs(1), inputs(1), inputs(4)]
        for buf, (xs, _) in zip(static_x, cases, strict=True):
            buf.copy_(xs[rank])
        static_res[0].copy_(cases[0][1])
        static_res[1].copy_(cases[2][1])
        graph.replay()
        check(*cases[0], static_x[0], static_res[0])
        check(cases[1][0], cases[1][1], plain_out)
        check(*cases[2], static_x[2], static_res[1])
        eager(1 + replay, fused=replay % 2 == 0)
    torch.cuda.synchronize(device)
    del graph
    dist.barrier()
    dist.destroy_process_group()


def test_custom_all_reduce_two_gpus():
    import torch.multiprocessing as mp

    from tests.distributed.dist_helpers import free_port

    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    ctx = mp.start_processes(_worker, args=(free_port(),), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 240
    try:
        while not ctx.join(timeout=5):  # raises with the worker's traceback if one failed
            if time.monotonic() > deadline:
                pytest.fail("the two-GPU all-reduce did not finish within 240 s (a hang)")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
