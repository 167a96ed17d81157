"""Building one step's flat inputs (token ids, positions, ForwardBatch) from the schedule."""

from __future__ import annotations

import numpy as np
import torch

from fuselm.engine.request import Request
from fuselm.engine.scheduler import SchedulerOutput
from fuselm.forward_batch import ForwardBatch


def token_slice(req: Request, start: int, end: int) -> list[int]:
    """Token ids ``[start, end)`` of prompt + output, without concatenating the whole lists."""
    num_prompt = req.num_prompt_tokens
    if start >= num_prompt:
        return req.output_token_ids[start - num_prompt : end - num_prompt]
    if end <= num_prompt:
        return req.prompt_token_ids[start:end]
    return req.prompt_token_ids[start:] + req.output_token_ids[: end - num_prompt]


class InputBuffers:
    """Persistent host (pinned on CUDA) and device buffers of one step's inputs.

    CUDA graphs replay on the device buffers, so they are written in place every step.
    """

    def __init__(self, max_num_tokens: int, max_num_seqs: int, max_blocks_per_seq: int,
                 block_size: int, device: torch.device) -> None:
        self.device, self.block_size = device, block_size
        pin = device.type == "cuda"
        max_tokens = max(max_num_tokens, max_num_seqs)

        def host(n: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(n, dtype=dtype, pin_memory=pin)

        self.h_input_ids = host((max_tokens,), torch.int64)
        self.h_positions = host((max_tokens,), torch.int64)
        self.h_slots = host((max_tokens,), torch.int64)
        self.h_seq_lens = host((max_num_seqs,), torch.int32)
        self.h_qsl = host((max_num_seqs + 1,), torch.int32)
        self.h_block_tables = host((max_num_seqs, max_blocks_per_seq), torch.int32)
        self.h_logits_idx = host((max_num_seqs,), torch.int64)
        if device.type == "cpu":
            for name in list(vars(self)):
                if name.startswith("h_"):
                    setattr(self, name[2:], getattr(self, name))
        else:
            for name in list(vars(self)):
                if name.startswith("h_"):
                    setattr(self, name[2:], torch.zeros_like(getattr(self, name), device=device))

    def fill(self, out: SchedulerOutput, pad_to: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, ForwardBatch, int]:
        """Writes the step's inputs; returns ids, positions, batch and the number of logits
        rows. ``pad_to`` pads a decode batch to a CUDA-graph size (pad rows: seq_len 0)."""
        ids_np, pos_np = self.h_input_ids.numpy(), self.h_positions.numpy()
        slots_np, seq_np = self.h_slots.numpy(), self.h_seq_lens.numpy()
        qsl_np, bt_np = self.h_qsl.numpy(), self.h_block_tables.numpy()
        logit_np = self.h_logits_idx.numpy()
        bs = self.block_size
        t = num_logits = max_q = max_seq = max_blocks = 0
        for i, seq in enumerate(out.sequences):
            req, n = seq.request, seq.num_new_tokens
            start = req.num_computed_tokens
            ids_np[t : t + n] = token_slice(req, start, start + n)
            pos = np.arange(start, start + n)
            pos_np[t : t + n] = pos
            blocks = np.asarray(req.block_ids, dtype=np.int64)
            slots_np[t : t + n] = blocks[pos // bs] * bs + pos % bs
            seq_np[i] = start + n
            bt_np[i, : len(blocks)] = blocks
            max_blocks = max(max_blocks, len(blocks))
            qsl_np[i] = t
            t += n
            if seq.sample:
                logit_np[num_logits] = t - 1
                num_logits += 1
            max_q, max_seq = max(max_q, n), max(max_seq, start + n)
        num_seqs = len(out.sequences)
        if pad_to is not None and pad_to > num_seqs:
            ids_np[t:pad_to] = 0
            pos_np[t:pad_to] = 0
            slots_np[t:pad_to] = -1
            seq_np[num_seqs:pad_to] = 0
            bt_np[num_seqs:pad_to] = 0
            logit_np[num_logits:pad_to] = np.arange(num_logits, pad_to)
            num_seqs = t = pad_to
        qsl_np[num_seqs] = t
        return self._to_device(t, num_seqs, num_logits, max_q, max_seq, max_blocks, pad_to)

    def _to_device(self, t: int, num_seqs: int, num_logits: int, max_q: int, max_seq: int,
                   max_blocks: int, padded: int | None
                   ) -> tuple[torch.Tensor, torch.Tensor, ForwardBatch, int]:
        width = self.h_block_tables.shape[1] if padded is not None else max(max_blocks, 1)
        num_logit_rows = num_seqs if padded is not None else num_logits
        pairs = [(self.h_input_ids, self.input_ids, t), (self.h_positions, self.positions, t),
                 (self.h_slots, self.slots, t), (self.h_seq_lens, self.seq_lens, num_seqs),
                 (self.h_qsl, self.qsl, num_seqs + 1),
                 (self.h_logits_idx, self.logits_idx, num_logit_rows)]
        if self.device.type != "cpu":
            for h, d, n in pairs:
                d[:n].copy_(h[:n], non_blocking=True)
            self.block_tables[:num_seqs, :width].copy_(
                self.h_block_tables[:num_seqs, :width], non_blocking=True)
        batch = ForwardBatch(
            query_start_loc=self.qsl[: num_seqs + 1], seq_lens=self.seq_lens[:num_seqs],
            slot_mapping=self.slots[:t], block_tables=self.block_tables[:num_seqs, :width],
            logits_indices=self.logits_idx[:num_logit_rows], max_query_len=max(max_q, 1),
            max_seq_len=max_seq)
        return self.input_ids[:t], self.positions[:t], batch, num_logits
