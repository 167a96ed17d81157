"""Point-to-point traffic of a step: plans down the pipeline, hidden states between stages,
sampled tokens back to rank 0.

Ranks are ``pp_rank * tp_size + tp_rank``. Rank 0 (stage 0, TP rank 0) broadcasts each plan to
its stage's TP group; TP rank i of stage s sends the plan, then its ``(hidden, residual)``, to
TP rank i of stage s + 1. The last stage's TP rank 0 samples and sends the result to rank 0.
Plans and results are CPU tensors (gloo); hidden states live on the device (NCCL on GPU).

Sends are asynchronous (``isend``), so a stage hands its output on and starts the next
micro-batch at once; ``PendingSends`` keeps tensors alive until their sends complete.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

from fuselm.distributed.step_plan import HEADER_LEN, StepHeader
from fuselm.parallel import parallel_state as ps

INLINE_LEN = 2048  # int64 payload elements carried in the header's message
PLAN_MSG_LEN = HEADER_LEN + INLINE_LEN


class PendingSends:
    """Outstanding ``isend`` works and the tensors they read."""

    def __init__(self) -> None:
        self._works: deque[tuple[dist.Work, torch.Tensor]] = deque()

    def add(self, work: dist.Work, tensor: torch.Tensor) -> None:
        """Keeps ``tensor`` alive until ``work`` completes; drops completed entries."""
        self._works.append((work, tensor))
        while self._works and self._works[0][0].is_completed():
            self._works.popleft()

    def wait_all(self) -> None:
        """Blocks until every send completed."""
        while self._works:
            self._works.popleft()[0].wait()


class StageLinks:
    """This rank's neighbours and the collectives/sends of one pipeline stage."""

    def __init__(self) -> None:
        tp_size, tp_rank, pp_rank = ps.get_tp_size(), ps.get_tp_rank(), ps.get_pp_rank()
        self.rank = pp_rank * tp_size + tp_rank
        self.is_first, self.is_last = ps.is_first_pp_rank(), ps.is_last_pp_rank()
        self.prev_rank = self.rank - tp_size if not self.is_first else None
        self.next_rank = self.rank + tp_size if not self.is_last else None
        self.sampler_rank = (ps.get_pp_size() - 1) * tp_size  # last stage, TP rank 0
        self.tp_group, self.pp_group = ps.get_tp_group(), ps.get_pp_group()
        self.tp_size = tp_size
        self.pending = PendingSends()

    # plans -----------------------------------------------------------------------------
    # A plan travels as one message of PLAN_MSG_LEN int64: the header, then the payload when
    # it fits (every decode step of up to a few hundred sequences); a longer payload follows
    # as a second message. One message less saves a round trip (tens of us) per step.

    def send_plan(self, header: StepHeader, payload: torch.Tensor) -> None:
        """Rank 0: the plan to its TP peers (broadcast) and the next stage (isend)."""
        msg = torch.zeros(PLAN_MSG_LEN, dtype=torch.int64)
        msg[:HEADER_LEN] = header.to_tensor()
        inline = header.payload_len <= INLINE_LEN
        if inline:
            msg[HEADER_LEN : HEADER_LEN + header.payload_len] = payload
        if self.tp_size > 1:
            dist.broadcast(msg, src=0, group=self.tp_group)
            if not inline:
                dist.broadcast(payload, src=0, group=self.tp_group)
        self.forward_plan(header, msg, payload)

    def forward_plan(self, header: StepHeader, msg: torch.Tensor, payload: torch.Tensor) -> None:
        """Hands a plan on to the same TP rank of the next stage (no-op on the last)."""
        if self.next_rank is None:
            return
        self.pending.add(dist.isend(msg, self.next_rank, group=self.pp_group), msg)
        if header.payload_len > INLINE_LEN:
            self.pending.add(dist.isend(payload, self.next_rank, group=self.pp_group), payload)

    def recv_plan(self) -> tuple[StepHeader, torch.Tensor, torch.Tensor]:
        """Workers: the next plan (header, the message as received, payload)."""
        msg = torch.empty(PLAN_MSG_LEN, dtype=torch.int64)
        if self.is_first:
            dist.broadcast(msg, src=0, group=self.tp_group)
        else:
            dist.recv(msg, self.prev_rank, group=self.pp_group)
        header = StepHeader.from_tensor(msg[:HEADER_LEN])
        if header.payload_len <= INLINE_LEN:
            return header, msg, msg[HEADER_LEN : HEADER_LEN + header.payload_len]
        payload = torch.empty(header.payload_len, dtype=torch.int64)
        if self.is_first:
            dist.broadcast(payload, src=0, group=self.tp_group)
        else:
            dist.recv(payload, self.prev_rank, group=self.pp_group)
        return header, msg, payload

    # hidden states ---------------------------------------------------------------------
    def send_intermediate(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """``[2, T, hidden]`` (hidden, residual) to the next stage."""
        both = torch.stack([hidden, residual])
        self.pending.add(dist.isend(both, self.next_rank, group=self.pp_group), both)

    def recv_intermediate(self, num_tokens: int, hidden_size: int, dtype: torch.dtype,
                          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) ``[T, hidden]`` each, from the previous stage."""
        both = torch.empty(2, num_tokens, hidden_size, dtype=dtype, device=device)
        dist.recv(both, self.prev_rank, group=self.pp_group)
        return both[0], both[1]

    # sampled tokens ---------------------------------------------------------------------
    def send_result(self, result: torch.Tensor) -> None:
        """Last stage, TP rank 0: the encoded sampler output to rank 0."""
        if result.numel():
            self.pending.add(dist.isend(result, 0, group=self.pp_group), result)

    def recv_result(self, length: int) -> torch.Tensor:
        """Rank 0: the next encoded sampler output from the sampling rank."""
        out = torch.empty(length, dtype=torch.int64)
        if length:
            dist.recv(out, self.sampler_rank, group=self.pp_group)
        return out
