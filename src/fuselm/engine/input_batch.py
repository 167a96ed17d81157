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
        self._copied: torch.cuda.Event | None = None  # recorded after each step's host->device
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

    def wait_for_copies(self) -> None:
        """Waits until the last step's host->device copies are done, so that the host buffers
        may be rewritten (steps are not synchronised with the host when they overlap)."""
        if self._copied is not None:
            self._copied.synchronize()

    def fill(self, out: SchedulerOutput, pad_to: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, ForwardBatch, int]:
        """Writes the step's inputs; returns ids, positions, batch and the number of logits
        rows. ``pad_to`` pads a decode batch to a CUDA-graph size (pad rows: seq_len 0)."""
        self.wait_for_copies()
        bs = self.block_size
        bt_np = self.h_block_tables.numpy()
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        qsl: list[int] = []
        logits: list[int] = []
        max_q = max_blocks = 0
        for i, seq in enumerate(out.sequences):
            req, n = seq.request, seq.num_new_tokens
            start, blocks = req.num_computed_tokens + seq.ahead, req.block_ids
            qsl.append(len(ids))
            if n == 1:  # decode: the common case, kept free of numpy calls
                ids.append(0 if seq.ahead else token_slice(req, start, start + 1)[0])
                pos.append(start)
                slots.append(blocks[start // bs] * bs + start % bs)
            else:
                ids.extend(token_slice(req, start, start + n))
                p = np.arange(start, start + n)
                pos.extend(p.tolist())
                slots.extend((np.asarray(blocks)[p // bs] * bs + p % bs).tolist())
            seq_lens.append(start + n)
            bt_np[i, : len(blocks)] = blocks
            max_blocks = max(max_blocks, len(blocks))
            max_q = max(max_q, n)
            if seq.sample:
                logits.append(len(ids) - 1)
        num_logits, num_real = len(logits), len(ids)
        num_seqs = len(out.sequences)
        if pad_to is not None and pad_to > num_seqs:
            pad = pad_to - num_seqs
            ids += [0] * pad
            pos += [0] * pad
            slots += [-1] * pad
            seq_lens += [0] * pad
            qsl += list(range(num_real, num_real + pad))
            logits += list(range(num_logits, num_logits + pad))
            bt_np[num_seqs:pad_to] = 0
            num_seqs = pad_to
        qsl.append(len(ids))
        t = len(ids)
        self.h_input_ids.numpy()[:t] = ids
        self.h_positions.numpy()[:t] = pos
        self.h_slots.numpy()[:t] = slots
        self.h_seq_lens.numpy()[:num_seqs] = seq_lens
        self.h_qsl.numpy()[: num_seqs + 1] = qsl
        self.h_logits_idx.numpy()[: len(logits)] = logits
        max_seq = max(seq_lens, default=0)
        return self.to_device(t, num_seqs, num_logits, max(max_q, 1), max_seq, max_blocks,
                              pad_to)

    def to_device(self, t: int, num_seqs: int, num_logits: int, max_q: int, max_seq: int,
                  max_blocks: int, padded: int | None
                  ) -> tuple[torch.Tensor, torch.Tensor, ForwardBatch, int]:
        """Copies the first ``t`` tokens / ``num_seqs`` sequences of the host arrays (already
        written, by ``fill`` or by a received plan) to the device buffers; ``padded``: a decode
        graph's size (block tables at full width). Returns ids, positions, batch, num_logits."""
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
            self._copied = torch.cuda.Event()
            self._copied.record()
        batch = ForwardBatch(
            query_start_loc=self.qsl[: num_seqs + 1], seq_lens=self.seq_lens[:num_seqs],
            slot_mapping=self.slots[:t], block_tables=self.block_tables[:num_seqs, :width],
            logits_indices=self.logits_idx[:num_logit_rows], max_query_len=max(max_q, 1),
            max_seq_len=max_seq)
        return self.input_ids[:t], self.positions[:t], batch, num_logits
