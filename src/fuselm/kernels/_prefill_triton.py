"""Device code of ``prefill_attention``'s Triton backend: the FlashAttention-style kernel and
its jitted helpers (the launcher, configs and checks live in ``prefill_attention.py``)."""

from __future__ import annotations

from fuselm.kernels import triton_utils

if triton_utils.triton_available():
    import triton
    import triton.language as tl

    if triton_utils.is_interpreting():
        triton_utils.patch_interpreter_range()

    @triton.jit
    def _online_softmax_step(acc, m_i, l_i, qk, v, qk_scale, DOT_PRECISION: tl.constexpr,
                             FOLD_SCALE: tl.constexpr):
        """One key tile: qk [M, N] from _scores (-inf where masked), v [N, D]; qk_scale is
        scale * log2(e) > 0. FOLD_SCALE (as Triton's tutorial 06): the max of the raw scores
        times the scale is the max of the scaled ones (bit for bit), so the scores need no
        multiply of their own; ``qk * s - m`` is one FMA an element either way (sm_90, 128 x 64:
        32 of a thread's 412 instructions an iteration)."""
        if FOLD_SCALE:
            m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk * qk_scale - m_new[:, None])
        else:  # qk came scaled (_scores)
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        return acc, m_new, l_i

    @triton.jit
    def _scores(q, k, qk_scale, DOT_PRECISION: tl.constexpr, RAW: tl.constexpr):
        """q k^T [M, N] in fp32, times qk_scale unless RAW (then _online_softmax_step scales)."""
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if not RAW:
            qk = qk * qk_scale
        return qk

    @triton.jit
    def _token_offsets(tokens, NARROW: tl.constexpr):
        """Token indices, in int32 where all offsets fit (sm_90, 128 x 64: ~3 instead of ~7
        instructions for each of a thread's 8 cp.async addresses an iteration), else int64."""
        return tokens if NARROW else tokens.to(tl.int64)

    @triton.jit
    def _find_seq(qsl_ptr, num_seqs, pid, BLOCK_Q: tl.constexpr):
        """Largest s < num_seqs with qsl[s] // BLOCK_Q + s <= pid (binary search)."""
        lo = num_seqs * 0  # a tensor, also when the loop below does not run
        hi = num_seqs
        while lo + 1 < hi:
            mid = (lo + hi) // 2
            first = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
            if first <= pid:
                lo = mid
            else:
                hi = mid
        return lo

    # num_seqs == 1 must not become a constexpr: it seeds a loop-carried value of _find_seq.
    @triton.jit(do_not_specialize=["num_seqs", "num_q_blocks"])
    def _prefill_attention_kernel(
        out_ptr, q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr,  # see prefill_attention_ref
        qsl_ptr, seq_lens_ptr, bt_ptr,
        num_seqs, num_q_blocks, qk_scale,  # num_q_blocks: grid size on axis 0
        k_scale, v_scale,  # fp8 caches: the cached prefix's scales
        o_tok_stride, o_head_stride, q_tok_stride, q_head_stride,
        k_tok_stride, k_head_stride, v_tok_stride, v_head_stride,
        kc_block_stride, kc_slot_stride, kc_head_stride,
        vc_block_stride, vc_slot_stride, vc_head_stride,
        bt_stride, block_size,
        GROUP: tl.constexpr,  # query heads per KV head
        HEADS_PER_PROG: tl.constexpr,  # power of 2 dividing GROUP
        HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        FOLD_SCALE: tl.constexpr,  # see _online_softmax_step
        NARROW_OFFSETS: tl.constexpr, LEAN_EDGES: tl.constexpr,  # see PrefillConfig
        WINDOW: tl.constexpr = 0,  # sliding window (keys j > i - WINDOW); 0: none, no cost
        KV_FP8: tl.constexpr = False,  # fp8 caches: the prefix dequantized in registers
    ):  # fmt: skip
        BLOCK_Q: tl.constexpr = BLOCK_M // HEADS_PER_PROG
        # Last programs first: under causality they own the longest key ranges (less tail).
        pid = num_q_blocks - 1 - tl.program_id(0)
        head0 = tl.program_id(1) * HEADS_PER_PROG
        kv_head = head0 // GROUP
        seq = _find_seq(qsl_ptr, num_seqs, pid, BLOCK_Q)
        q_start = tl.load(qsl_ptr + seq)
        q_len = tl.load(qsl_ptr + seq + 1) - q_start
        q0 = (pid - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # first token of this block
        if q0 >= q_len:
            return
        ctx_len = tl.load(seq_lens_ptr + seq) - q_len

        rows = tl.arange(0, BLOCK_M)
        tok = q0 + rows // HEADS_PER_PROG  # [M] token index within the new chunk
        head = head0 + rows % HEADS_PER_PROG
        offs_d = tl.arange(0, D_PAD)
        d_mask = offs_d < HEAD_SIZE
        row_mask = tok < q_len
        q_off = (q_start + tok).to(tl.int64) * q_tok_stride + head * q_head_stride
        q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)

        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: no inf - inf on masked rows
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        offs_n = tl.arange(0, BLOCK_N)

        # 1) The cached prefix, gathered through the block table; only the last tile is partial.
        # (Not under `if ctx_len > 0`: a branch result in acc makes ptxas serialize wgmma, C7515.)
        kc_base = kc_ptr + kv_head * kc_head_stride
        vc_base = vc_ptr + kv_head * vc_head_stride
        bt_row = bt_ptr + seq.to(tl.int64) * bt_stride
        qpos = ctx_len + tok  # [M] absolute positions of the rows' tokens
        if WINDOW > 0:  # start at the tile holding the block's first visible key
            ctx_lo = (tl.maximum(ctx_len + q0 - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
            new_lo = (tl.maximum(q0 - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
        else:
            ctx_lo = 0
            new_lo = 0
        if KV_FP8:  # e4m3 -> q's dtype is exact; K's scale joins the score scale
            ctx_qk_scale = qk_scale * k_scale
        else:
            ctx_qk_scale = qk_scale
        for n0 in range(ctx_lo, ctx_len, BLOCK_N):
            pos = n0 + offs_n
            n_mask = pos < ctx_len
            blk = tl.load(bt_row + pos // block_size, mask=n_mask, other=0).to(tl.int64)
            slot = pos % block_size
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(kc_base + (blk * kc_block_stride + slot * kc_slot_stride)[:, None]
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            if KV_FP8:
                k = k.to(q.dtype)
            qk = _scores(q, k, ctx_qk_scale, DOT_PRECISION, FOLD_SCALE)
            if WINDOW > 0:
                qk = tl.where(n_mask[None, :] & (pos[None, :] > qpos[:, None] - WINDOW), qk,
                              float("-inf"))
            else:
                qk = tl.where(n_mask[None, :], qk, float("-inf"))
            v = tl.load(vc_base + (blk * vc_block_stride + slot * vc_slot_stride)[:, None]
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            if KV_FP8:  # [BLOCK_N, D] multiplies a tile, next to a [BLOCK_M, BLOCK_N, D] dot
                v = (v.to(tl.float32) * v_scale).to(q.dtype)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, qk, v, ctx_qk_scale,
                                                 DOT_PRECISION, FOLD_SCALE)

        # 2) New keys left of the diagonal: every row sees every key, no mask.
        k_base = k_ptr + kv_head * k_head_stride
        v_base = v_ptr + kv_head * v_head_stride
        full_end = (q0 // BLOCK_N) * BLOCK_N
        for n0 in range(new_lo, full_end, BLOCK_N):
            kv_off = _token_offsets(q_start + n0 + offs_n, NARROW_OFFSETS)
            k = tl.load(k_base + (kv_off * k_tok_stride)[:, None] + offs_d[None, :],
                        mask=d_mask[None, :], other=0.0)
            qk = _scores(q, k, qk_scale, DOT_PRECISION, FOLD_SCALE)
            if WINDOW > 0:  # (a sliding window masks these too)
                qk = tl.where((n0 + offs_n)[None, :] > tok[:, None] - WINDOW, qk, float("-inf"))
            v = tl.load(v_base + (kv_off * v_tok_stride)[:, None] + offs_d[None, :],
                        mask=d_mask[None, :], other=0.0)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, qk, v, qk_scale, DOT_PRECISION,
                                                 FOLD_SCALE)

        # 3) Diagonal tiles: causal mask.
        diag_end = tl.minimum(q0 + BLOCK_Q, q_len)
        for n0 in range(full_end, diag_end, BLOCK_N):
            pos = n0 + offs_n
            n_mask = pos < q_len
            kv_off = _token_offsets(q_start + pos, NARROW_OFFSETS)
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_base + (kv_off * k_tok_stride)[:, None] + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            qk = _scores(q, k, qk_scale, DOT_PRECISION, FOLD_SCALE)
            if LEAN_EDGES:  # a valid row's keys (pos <= tok < q_len) are in its sequence
                visible = pos[None, :] <= tok[:, None]
            else:
                visible = (pos[None, :] <= tok[:, None]) & n_mask[None, :]
            if WINDOW > 0:
                visible = visible & (pos[None, :] > tok[:, None] - WINDOW)
            qk = tl.where(visible, qk, float("-inf"))
            v = tl.load(v_base + (kv_off * v_tok_stride)[:, None] + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, qk, v, qk_scale, DOT_PRECISION,
                                                 FOLD_SCALE)

        if LEAN_EDGES:  # one division a row, not a (5-instruction) div.full.f32 an element
            out = acc * (1.0 / l_i)[:, None]
        else:
            out = acc / l_i[:, None]
        o_off = (q_start + tok).to(tl.int64) * o_tok_stride + head * o_head_stride
        tl.store(out_ptr + o_off[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & d_mask[None, :])
