"""Triton backward: recompute P from the saved LSE, no (L, S) buffer, no atomics.

Three kernels (FlashAttention-2's backward, with dQ in its own pass):

1. ``bwd_preprocess_kernel``: per query row, delta = rowsum(dO * O) - dLSE
   (dLSE: the gradient of the returned lse, if any) and lse2 = lse * log2 e,
   +inf for rows that saw no key, so exp2(s - lse2) is exactly 0 there.
   Both are (B, H, L) float32: the only scratch, O(L).
2. ``bwd_dkdv_kernel``: one program per BLOCK_N keys of one (batch, kv head);
   K and V stay in registers while it walks the query blocks (of every query
   head of its GQA group) that can see them: P^T = exp2(K Q^T - lse2),
   dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q.
   Each key's gradient is written once, so no accumulation buffer.
3. ``bwd_dq_kernel``: one program per BLOCK_M queries, walking the key blocks
   like the forward: dQ += dS K. With split keys (few query blocks, long S)
   each split writes a float32 partial dQ that the host sums.

This costs two more matmuls than an atomic dQ (recomputing S and dP in pass
3) but needs no float32 dQ accumulator of size B*H*L*E, which is what lets
an 8 GB GPU train at 0.9x the length its tensors alone allow.
"""
import triton
import triton.language as tl

from .tiles import (block_ranges, head_ptr, masked_probabilities, mma, query_block, query_block_key_ranges, row_block,
                    score_grad, sequence_lengths, stage_range, tile_offsets)


@triton.jit(do_not_specialize=["H", "L"])
def bwd_preprocess_kernel(
    # ---- pointers: out and its gradient (B, H, L, Ev); lse, its gradient, delta, lse2 (B, H, L)
    # float32, contiguous ----
    O, DO, LSE, DLSE, DELTA, LSE2,
    # ---- strides in elements, (batch, head, row) of out and of its gradient ----
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
    # ---- sizes ----
    H, L,
    # ---- meta-parameters ----
    HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    b, h, bh, offs_m, offs_dv = row_block(H, BLOCK_M, HEAD_DIM_V_PAD)
    ok = (offs_m[:, None] < L) & (offs_dv[None, :] < HEAD_DIM_V)
    o = tl.load(head_ptr(O, b, h, stride_ob, stride_oh) + offs_m[:, None].to(tl.int64) * stride_om
                + offs_dv[None, :], mask=ok, other=0.0)
    do = tl.load(head_ptr(DO, b, h, stride_dob, stride_doh)
                 + offs_m[:, None].to(tl.int64) * stride_dom + offs_dv[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    rows = bh.to(tl.int64) * L + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + rows, mask=offs_m < L, other=0.0)
    lse = tl.load(LSE + rows, mask=offs_m < L, other=0.0)
    # A row that saw no key (padding past query_lengths included) has P = 0 everywhere:
    # delta 0 keeps whatever its dO holds (a NaN) out of dS = P (dP - delta).
    delta = tl.where(lse == float("-inf"), 0.0, delta)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(DELTA + rows, delta, mask=offs_m < L)
    tl.store(LSE2 + rows, lse2, mask=offs_m < L)


@triton.jit
def _dkdv_block(dk, dv, k, v, q_base, do_base, lse2_base, delta_base, mask_base, start_m, offs_n,
                offs_m0, offs_d, offs_dv, stride_qm, stride_dom, stride_mm, stride_mn, L, S,
                key_len, query_len, qk_scale, window_left, window_right,
                HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, STRUCTURE_MASK: tl.constexpr,
                MASK_KIND: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One query block against this program's keys; returns updated (dK, dV).
    Rows past query_lengths read as zeros: padding is never read."""
    offs_m = start_m + offs_m0
    row_ok = offs_m < query_len
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    do = tl.load(do_base + offs_m[:, None].to(tl.int64) * stride_dom + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    lse2 = tl.load(lse2_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    # S^T (BLOCK_N, BLOCK_M): keys along rows, queries along columns
    st = mma(k, tl.trans(q), tl.zeros((k.shape[0], q.shape[0]), tl.float32), UPCAST, PRECISION) * qk_scale
    pt = masked_probabilities(st, lse2, offs_m, offs_n, mask_base, stride_mm, stride_mn, L, S, query_len, key_len,
                              window_left, window_right, STRUCTURE_MASK, MASK_KIND, True)
    dv = mma(pt.to(do.dtype), do, dv, UPCAST, PRECISION)
    dpt = mma(v, tl.trans(do), tl.zeros((k.shape[0], q.shape[0]), tl.float32), UPCAST, PRECISION)
    dst = score_grad(pt, dpt, delta[None, :])
    dk = mma(dst.to(q.dtype), q, dk, UPCAST, PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["H", "HKV", "GROUP", "L", "S", "L_BUCKET", "S_BUCKET", "window_left", "window_right"])
def bwd_dkdv_kernel(
    # ---- pointers: q, k, v, the output's gradient; lse2 and delta (B, H, L) float32, contiguous;
    # dk, dv (like k, v); the mask, a broadcast view of (B, H, L, S); the (B,) int64 lengths ----
    Q, K, V, DO, LSE2, DELTA, DK, DV, MASK, KEY_LENGTHS, QUERY_LENGTHS,
    # ---- strides in elements, (batch, head, row) of q, k, v, do, dk, dv, then the mask's 4 ----
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    # ---- sizes (the buckets: powers of two, only for the autotune key) and semantics ----
    H, HKV, GROUP, L, S, L_BUCKET, S_BUCKET, scale, qk_scale, window_left, window_right,
    # ---- meta-parameters: head dims (and padded), tile, lengths given, MASK_KIND 0 none / 1 bool / 2 float ----
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr, HAS_QUERY_LENGTHS: tl.constexpr,
    MASK_KIND: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV

    query_len, key_len = sequence_lengths(KEY_LENGTHS, QUERY_LENGTHS, b, L, S,
                                          HAS_KEY_LENGTHS, HAS_QUERY_LENGTHS)

    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_dv = tl.arange(0, HEAD_DIM_V_PAD)
    key_ok = offs_n < S  # dK, dV rows stored (zeros past key_lengths)
    key_valid = offs_n < key_len  # keys past key_lengths read as zeros: padding is never read

    k = tl.load(head_ptr(K, b, hk, stride_kb, stride_kh) + offs_n[:, None].to(tl.int64) * stride_kn
                + offs_d[None, :], mask=key_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    v = tl.load(head_ptr(V, b, hk, stride_vb, stride_vh) + offs_n[:, None].to(tl.int64) * stride_vn
                + offs_dv[None, :], mask=key_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    dk = tl.zeros((BLOCK_N, HEAD_DIM_PAD), tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM_V_PAD), tl.float32)

    # ---- the query blocks that can see these keys: i >= j - right, i <= j + left ----
    row_last = tl.minimum(n0 + BLOCK_N, key_len) - 1
    lo = (tl.maximum(n0 - window_right, 0) // BLOCK_M) * BLOCK_M
    hi = tl.minimum(query_len, row_last + window_left + 1)
    if row_last < n0:  # every key of the block is past key_lengths
        hi = lo
    a, c = block_ranges(n0, row_last, lo, hi, window_right, window_left, query_len, BLOCK_M)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        # (inline, not head_ptr: in this loop the helper cost 8 more bytes of spill with a bool mask, sm_90)
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        lse2_base = LSE2 + bh.to(tl.int64) * L
        delta_base = DELTA + bh.to(tl.int64) * L
        mask_base = MASK
        if MASK_KIND != 0:
            mask_base = MASK + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
        # ---- near edge (masked), interior (every pair visible by structure), far edge (masked) ----
        for stage in tl.static_range(3):
            start, end = stage_range(stage, lo, a, c, hi)
            for start_m in range(start, end, BLOCK_M):
                dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse2_base, delta_base, mask_base, start_m,
                                     offs_n, offs_m0, offs_d, offs_dv, stride_qm, stride_dom, stride_mm,
                                     stride_mn, L, S, key_len, query_len, qk_scale, window_left, window_right,
                                     HEAD_DIM, HEAD_DIM_V, stage != 1, MASK_KIND, UPCAST, PRECISION)

    # keys past key_lengths get exactly zero (interior blocks may have touched them)
    live = key_valid[:, None]
    dk = tl.where(live, dk * scale, 0.0)
    dv = tl.where(live, dv, 0.0)
    tl.store(head_ptr(DK, b, hk, stride_dkb, stride_dkh) + offs_n[:, None].to(tl.int64) * stride_dkn
             + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=key_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(head_ptr(DV, b, hk, stride_dvb, stride_dvh) + offs_n[:, None].to(tl.int64) * stride_dvn
             + offs_dv[None, :], dv.to(DV.dtype.element_ty), mask=key_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _dq_block(dq, q, do, lse2, delta, k_base, v_base, mask_base, start_n, offs_m, offs_n0, offs_d,
              offs_dv, stride_kn, stride_vn, stride_mm, stride_mn, L, S, key_len, query_len, qk_scale,
              window_left, window_right,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, STRUCTURE_MASK: tl.constexpr,
              MASK_KIND: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One key block for this program's queries; returns the updated dQ."""
    offs_n = start_n + offs_n0
    key_ok = offs_n < key_len  # padding is never read
    kt = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
                 mask=key_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
    vt = tl.load(v_base + offs_n[None, :].to(tl.int64) * stride_vn + offs_dv[:, None],
                 mask=key_ok[None, :] & (offs_dv[:, None] < HEAD_DIM_V), other=0.0)
    s = mma(q, kt, tl.zeros((q.shape[0], kt.shape[1]), tl.float32), UPCAST, PRECISION) * qk_scale
    p = masked_probabilities(s, lse2, offs_m, offs_n, mask_base, stride_mm, stride_mn, L, S, query_len, key_len,
                             window_left, window_right, STRUCTURE_MASK, MASK_KIND, False)
    dp = mma(do, vt, tl.zeros((q.shape[0], kt.shape[1]), tl.float32), UPCAST, PRECISION)
    ds = score_grad(p, dp, delta[:, None])
    return mma(ds.to(q.dtype), tl.trans(kt), dq, UPCAST, PRECISION)


@triton.jit(do_not_specialize=["H", "GROUP", "L", "S", "KEYS_PER_SPLIT", "L_BUCKET", "S_BUCKET", "window_left",
                               "window_right"])
def bwd_dq_kernel(
    # ---- pointers: q, k, v, the output's gradient; lse2 and delta (B, H, L) float32, contiguous;
    # dq (like q) or its per-split float32 partials (splits, B, H, L, E); the mask, a broadcast view
    # of (B, H, L, S); the (B,) int64 lengths ----
    Q, K, V, DO, LSE2, DELTA, DQ, MASK, KEY_LENGTHS, QUERY_LENGTHS,
    # ---- strides in elements, (batch, head, row) of q, k, v, do, dq (+ split), then the mask's 4 ----
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm, stride_dqsplit,
    stride_mb, stride_mh, stride_mm, stride_mn,
    # ---- sizes (the buckets: powers of two, only for the autotune key) and semantics ----
    H, GROUP, L, S, KEYS_PER_SPLIT, L_BUCKET, S_BUCKET, scale, qk_scale, window_left, window_right,
    # ---- meta-parameters: head dims (and padded), tile, lengths given, MASK_KIND 0 none / 1 bool / 2 float ----
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr, HAS_QUERY_LENGTHS: tl.constexpr,
    MASK_KIND: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    b, h, hk, bh, split, pid_m = query_block(H, GROUP)
    query_len, key_len = sequence_lengths(KEY_LENGTHS, QUERY_LENGTHS, b, L, S, HAS_KEY_LENGTHS, HAS_QUERY_LENGTHS)
    m0 = pid_m * BLOCK_M
    offs_m, offs_n0, offs_d, offs_dv = tile_offsets(m0, BLOCK_M, BLOCK_N, HEAD_DIM_PAD, HEAD_DIM_V_PAD)
    row_ok = offs_m < L

    k_base = head_ptr(K, b, hk, stride_kb, stride_kh)
    v_base = head_ptr(V, b, hk, stride_vb, stride_vh)
    mask_base = MASK
    if MASK_KIND != 0:
        mask_base = head_ptr(MASK, b, h, stride_mb, stride_mh)

    lo, a, c, hi = query_block_key_ranges(m0, split, KEYS_PER_SPLIT, query_len, key_len, window_left,
                                          window_right, BLOCK_M, BLOCK_N)

    dq = tl.zeros((BLOCK_M, HEAD_DIM_PAD), tl.float32)
    if hi > lo:
        row_valid = offs_m < query_len  # rows past query_lengths read as zeros (dQ rows still stored)
        q = tl.load(head_ptr(Q, b, h, stride_qb, stride_qh) + offs_m[:, None].to(tl.int64) * stride_qm
                    + offs_d[None, :], mask=row_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        do = tl.load(head_ptr(DO, b, h, stride_dob, stride_doh) + offs_m[:, None].to(tl.int64) * stride_dom
                     + offs_dv[None, :], mask=row_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        lse2 = tl.load(LSE2 + bh.to(tl.int64) * L + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0)
        # ---- near edge (masked), interior (every pair visible by structure), far edge (masked) ----
        for stage in tl.static_range(3):
            start, end = stage_range(stage, lo, a, c, hi)
            for start_n in range(start, end, BLOCK_N):
                dq = _dq_block(dq, q, do, lse2, delta, k_base, v_base, mask_base, start_n, offs_m, offs_n0,
                               offs_d, offs_dv, stride_kn, stride_vn, stride_mm, stride_mn, L, S, key_len,
                               query_len, qk_scale, window_left, window_right, HEAD_DIM, HEAD_DIM_V, stage != 1,
                               MASK_KIND, UPCAST, PRECISION)

    dq = tl.where((offs_m < query_len)[:, None], dq * scale, 0.0)
    tl.store(head_ptr(DQ + split.to(tl.int64) * stride_dqsplit, b, h, stride_dqb, stride_dqh)
             + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
