"""Triton forward: fused tiled attention with an online softmax.

Algorithm (FlashAttention-2's forward): one program owns BLOCK_M query rows
of one (batch, head) and, optionally, one split of the keys. Its Q tile stays
in registers; it walks the key/value blocks its rows can see, computing
S = Q K^T (fp32 accumulators), the running row max m and sum l of
exp2(S * scale * log2 e - m), and acc = sum P V rescaled as m grows. It
writes out = acc / l and the log-sum-exp once: no (L, S) buffer exists.

Key blocks are visited in three runs (tiles.block_ranges), one loop over a
constexpr stage (tiles.stage_range): edge blocks that need the structure
mask (window, lengths), then interior blocks that need none, then the far
edge. The dense mask, when there is one, is read tile by tile through its
strides in every block (any stride may be 0).

Split keys (flash-decoding): with few query blocks (e.g. attention pooling or
decoding, Lq <= 16) the grid alone cannot fill the GPU, so the keys are cut
into NUM_SPLITS contiguous chunks, each program writes a normalised partial
output and LSE in float32, and ``merge_splits`` combines them by their LSEs.

Rows that see no key (all masked, past query_lengths) get out = 0, lse = -inf.

Attention statistics (STATS, effattn.diagnostics.attention_stats): one more
row accumulator, u = sum p (s - m) in base 2, rescaled as m grows, gives the
entropy of each row's weights, ln 2 (log2 l - u / l), and its largest weight,
1 / l, at no extra pass; 0 and 0 for rows that see no key. Calls with STATS
are never split.

Tensor-memory-accelerator loads (USE_TMA, Hopper and newer, opt-in through
EFFATTN_TRITON_TMA until measured: see ops.py): the interior blocks read K and
V through device-side tensor descriptors over (B, Hkv, S, E), so the copy
engine moves whole tiles with no per-element address arithmetic or masks. The
edge blocks keep plain masked loads.

Sizes and window bounds are not specialised on (do_not_specialize): they feed
only masks and loop bounds, and a compile per length pattern would cost more
than it gains. Strides are, so row loads stay 16-byte vectors.
"""
import triton
import triton.language as tl

from .tiles import (head_ptr, masked_scores, mma, query_block, query_block_key_ranges, row_block, sequence_lengths,
                    stage_range, tile_offsets)


@triton.jit
def _fwd_block(acc, m_i, l_i, u_i, q, k_base, v_base, k_desc, v_desc, tile_b, tile_h, mask_base, start_n, offs_m,
               offs_n0, offs_d, offs_dv, stride_kn, stride_vn, stride_mm, stride_mn, L, S, key_len, query_len,
               qk_scale, window_left, window_right,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, STRUCTURE_MASK: tl.constexpr,
               MASK_KIND: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr, STATS: tl.constexpr):
    """One key block of the online softmax; returns the updated (acc, m, l, u) (u: STATS only).
    With USE_TMA (interior blocks only: every key is < S) K and V come through
    the descriptors k_desc, v_desc at (tile_b, tile_h, start_n, 0)."""
    offs_n = start_n + offs_n0
    if USE_TMA:
        kt = tl.trans(k_desc.load([tile_b, tile_h, start_n, 0]).reshape(offs_n0.shape[0], offs_d.shape[0]))
    else:
        # K^T tile (HEAD_DIM_PAD, BLOCK_N): keys past key_lengths read as zeros (and are
        # masked): padding is never read, whatever it holds (0 * NaN would leak into P @ V)
        kt_mask = offs_d[:, None] < HEAD_DIM
        if STRUCTURE_MASK:
            kt_mask = kt_mask & (offs_n[None, :] < key_len)
        kt = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None], mask=kt_mask,
                     other=0.0)
    s = mma(q, kt, tl.zeros((q.shape[0], kt.shape[1]), tl.float32), UPCAST, PRECISION) * qk_scale
    s = masked_scores(s, offs_m, offs_n, mask_base, stride_mm, stride_mn, L, S, query_len, key_len, window_left,
                      window_right, STRUCTURE_MASK, MASK_KIND)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if STRUCTURE_MASK or MASK_KIND != 0:
        # a row with nothing visible yet keeps m = -inf: shift by 0 so exp2 gives 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:  # an unmasked block has a finite maximum in every row (or a NaN, which propagates)
        m_shift = m_new
    x = s - m_shift[:, None]
    p = tl.math.exp2(x)
    alpha = tl.math.exp2(m_i - m_shift)
    if STATS:  # u = sum p (s - m), rescaled as m grows; differences clamped where p = 0 (no 0 * -inf)
        u_i = alpha * (u_i + l_i * tl.maximum(m_i - m_shift, -2000.0)) + tl.sum(p * tl.maximum(x, -2000.0), 1)
    l_i = l_i * alpha + tl.sum(p, 1)
    if USE_TMA:
        v = v_desc.load([tile_b, tile_h, start_n, 0]).reshape(offs_n0.shape[0], offs_dv.shape[0])
    else:
        v_mask = offs_dv[None, :] < HEAD_DIM_V
        if STRUCTURE_MASK:
            v_mask = v_mask & (offs_n[:, None] < key_len)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :], mask=v_mask,
                    other=0.0)
    acc = mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, PRECISION)
    return acc, m_new, l_i, u_i


@triton.jit(do_not_specialize=["H", "GROUP", "L", "S", "KEYS_PER_SPLIT", "L_BUCKET", "S_BUCKET", "window_left",
                               "window_right"])
def attn_fwd_kernel(
    # ---- pointers: q, k, v (B, H or HKV, L or S, dim); out (B, H, L, Ev) or its per-split
    # partials (splits, B, H, L, Ev); lse (B, H, L) or (splits, B, H, L), contiguous; with STATS the
    # (2, B, H, L) stats (else any pointer, unused); the mask, a broadcast view of (B, H, L, S); the
    # (B,) int64 lengths ----
    Q, K, V, O, LSE, STATS_OUT, MASK, KEY_LENGTHS, QUERY_LENGTHS,
    # ---- strides in elements, (batch, head, row) of q, k, v, out (+ split), then the mask's 4 ----
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_osplit, stride_lsplit, stride_mb, stride_mh, stride_mm, stride_mn,
    # ---- sizes (the buckets: powers of two, only for the autotune key) and semantics (qk_scale:
    # the softmax scale * log2 e) ----
    H, GROUP, L, S, KEYS_PER_SPLIT, L_BUCKET, S_BUCKET, qk_scale, window_left, window_right,
    # ---- meta-parameters: head dims (and padded), tile, lengths given, MASK_KIND 0 none / 1 bool / 2 float ----
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr, HAS_QUERY_LENGTHS: tl.constexpr,
    MASK_KIND: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr = False,
    STATS: tl.constexpr = False,
):
    b, h, hk, bh, split, pid_m = query_block(H, GROUP)
    query_len, key_len = sequence_lengths(KEY_LENGTHS, QUERY_LENGTHS, b, L, S, HAS_KEY_LENGTHS, HAS_QUERY_LENGTHS)
    m0 = pid_m * BLOCK_M
    offs_m, offs_n0, offs_d, offs_dv = tile_offsets(m0, BLOCK_M, BLOCK_N, HEAD_DIM_PAD, HEAD_DIM_V_PAD)

    k_base = head_ptr(K, b, hk, stride_kb, stride_kh)
    v_base = head_ptr(V, b, hk, stride_vb, stride_vh)
    k_desc = None
    v_desc = None
    if USE_TMA:  # (B, Hkv, S, E) views of K and V; the host checked TMA's alignment rules
        n_b = tl.num_programs(1) // H
        k_desc = tl.make_tensor_descriptor(K, shape=[n_b, H // GROUP, S, HEAD_DIM],
                                           strides=[stride_kb, stride_kh, stride_kn, 1],
                                           block_shape=[1, 1, BLOCK_N, HEAD_DIM_PAD])
        v_desc = tl.make_tensor_descriptor(V, shape=[n_b, H // GROUP, S, HEAD_DIM_V],
                                           strides=[stride_vb, stride_vh, stride_vn, 1],
                                           block_shape=[1, 1, BLOCK_N, HEAD_DIM_V_PAD])
    mask_base = MASK
    if MASK_KIND != 0:
        mask_base = head_ptr(MASK, b, h, stride_mb, stride_mh)

    # ---- the key blocks these rows can see, within this split ----
    lo, a, c, hi = query_block_key_ranges(m0, split, KEYS_PER_SPLIT, query_len, key_len, window_left,
                                          window_right, BLOCK_M, BLOCK_N)

    acc = tl.zeros((BLOCK_M, HEAD_DIM_V_PAD), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    u_i = tl.zeros((BLOCK_M,), tl.float32)
    if hi > lo:
        q = tl.load(head_ptr(Q, b, h, stride_qb, stride_qh) + offs_m[:, None].to(tl.int64) * stride_qm
                    + offs_d[None, :], mask=(offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        # ---- near edge (masked), interior (every pair visible by structure), far edge (masked) ----
        for stage in tl.static_range(3):
            start, end = stage_range(stage, lo, a, c, hi)
            for start_n in range(start, end, BLOCK_N):
                acc, m_i, l_i, u_i = _fwd_block(acc, m_i, l_i, u_i, q, k_base, v_base, k_desc, v_desc, b, hk, mask_base,
                                           start_n, offs_m, offs_n0, offs_d, offs_dv, stride_kn, stride_vn,
                                           stride_mm, stride_mn, L, S, key_len, query_len, qk_scale,
                                           window_left, window_right, HEAD_DIM, HEAD_DIM_V, stage != 1,
                                           MASK_KIND, UPCAST, PRECISION, USE_TMA and stage == 1, STATS)

    # ---- epilogue: normalise; rows that saw nothing (or are padding) give 0 and -inf ----
    empty = (l_i == 0.0) | (offs_m >= query_len)
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    out = tl.where(empty[:, None], 0.0, out)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_i)) * 0.6931471805599453)
    o_ptrs = (head_ptr(O + split.to(tl.int64) * stride_osplit, b, h, stride_ob, stride_oh)
              + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :])
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < L) & (offs_dv[None, :] < HEAD_DIM_V))
    lse_ptrs = LSE + split.to(tl.int64) * stride_lsplit + bh.to(tl.int64) * L + offs_m
    tl.store(lse_ptrs, lse, mask=offs_m < L)
    if STATS:  # (never split) entropy (nats) = ln 2 (log2 l - u / l); the largest weight = 1 / l
        l_safe = tl.where(empty, 1.0, l_i)
        entropy = tl.where(empty, 0.0, (tl.math.log2(l_safe) - u_i / l_safe) * 0.6931471805599453)
        stats_ptrs = STATS_OUT + bh.to(tl.int64) * L + offs_m
        tl.store(stats_ptrs, entropy, mask=offs_m < L)
        tl.store(stats_ptrs + tl.num_programs(1).to(tl.int64) * L, tl.where(empty, 0.0, 1.0 / l_safe),
                 mask=offs_m < L)


@triton.jit(do_not_specialize=["H", "L", "NUM_SPLITS"])
def merge_splits_kernel(
    # ---- pointers ----
    O_PART, LSE_PART, O, LSE,
    # ---- strides ----
    stride_ob, stride_oh, stride_om,
    # ---- sizes ----
    H, L, NUM_SPLITS,
    # ---- meta-parameters ----
    HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """out = sum_s exp(lse_s - lse) out_s, lse = logsumexp_s lse_s.

    O_PART is (splits, B, H, L, HEAD_DIM_V) float32 contiguous, LSE_PART
    (splits, B, H, L); splits that saw no key have lse_s = -inf, weight 0."""
    b, h, bh, offs_m, offs_dv = row_block(H, BLOCK_M, HEAD_DIM_V_PAD)
    row_ok = offs_m < L
    part = bh.to(tl.int64) * L + offs_m  # row index into one split's (B*H*L)
    n_rows = tl.num_programs(1).to(tl.int64) * L
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for s in range(0, NUM_SPLITS):
        m = tl.maximum(m, tl.load(LSE_PART + s * n_rows + part, mask=row_ok, other=float("-inf")))
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM_V_PAD), tl.float32)
    for s in range(0, NUM_SPLITS):
        w = tl.exp(tl.load(LSE_PART + s * n_rows + part, mask=row_ok, other=float("-inf")) - m_shift)
        o = tl.load(O_PART + (s * n_rows + part)[:, None] * HEAD_DIM_V + offs_dv[None, :],
                    mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        acc += w[:, None] * o
        total += w
    empty = total == 0.0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, total)[:, None])
    lse = tl.where(empty, float("-inf"), m_shift + tl.log(total))
    tl.store(head_ptr(O, b, h, stride_ob, stride_oh) + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(LSE + part, lse, mask=row_ok)
