"""tp_all_gather over two gloo ranks against torch.cat of every rank's tensor."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp
from dist_helpers import free_port


def _gather_ranks(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from fuselm.parallel import comm
    from fuselm.parallel import parallel_state as ps

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        ps.initialize_model_parallel(2, 1)
        for shape, dim in (((1, 7), -1), ((3, 5), -1), ((3, 5), 0), ((2, 3, 4), 1)):
            gen = torch.Generator().manual_seed(hash((shape, dim)) % 1000)
            every = [torch.randn(shape, generator=gen) for _ in range(2)]
            got = comm.tp_all_gather(every[rank].clone(), dim=dim)
            if not torch.equal(got, torch.cat(every, dim=dim)):
                results.put(f"rank {rank} shape {shape} dim {dim}: wrong gather")
                return
        results.put("ok")
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def test_tp_all_gather_matches_cat():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_gather_ranks, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
        if p.is_alive():
            p.terminate()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    assert sorted(results.get(timeout=5) for _ in procs) == ["ok", "ok"]
