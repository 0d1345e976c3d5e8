"""Pieces shared by the Triton forward and backward kernels: one rule each.

Every kernel walks one block of rows (queries, or keys in the dK/dV kernel)
against a range of blocks of the other side. Which (query i, key j) pairs are
visible is the spec's rule (effattn/spec.py):

    i < query_len  and  j < key_len  and  i - window_left <= j <= i + window_right
    and the dense mask allows it,

with the spec's band as the window (causal folded in; a side may be negative)
and an unbounded side passed as UNBOUNDED (ops._window), so no flag is
needed. ``block_ranges`` splits the blocks that may hold a visible pair into
the ones where *every* pair is visible by the structure (lengths and window)
and the edges; each kernel walks the three runs with one loop over a
constexpr stage (``stage_range``), masking only in the edge stages.
``masked_scores`` is the one score rule (masks, bounds), ``masked_probabilities``
its backward twin (P recomputed from the LSE) and ``score_grad`` dS. Scores are kept in base 2 (scaled by
log2(e)), so exp is exp2.
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e)
# An unbounded window side, as a bound no index reaches (row + UNBOUNDED stays in int32).
UNBOUNDED = 1 << 29


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b on the tensor cores. UPCAST (the interpreter only, whose
    bf16 dot is broken) does it in float32, which is exact for bf16 products."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def head_ptr(base, b, h, stride_b, stride_h):
    """The (batch b, head h) slice of a (B, H, rows, dim) tensor, in 64-bit offsets."""
    return base + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def clamp_length(len_ptr, b, full):
    """A lengths entry clamped to [0, full] (values are not checked on the GPU)."""
    n = tl.load(len_ptr + b).to(tl.int32)
    return tl.minimum(tl.maximum(n, 0), full)


@triton.jit
def block_ranges(row_first, row_last, lo, hi, near, far, col_len, BLOCK: tl.constexpr):
    """Split the column blocks [lo, hi) seen by rows [row_first, row_last]
    into masked [lo, a), full [a, b) and masked [b, hi).

    Columns are visible from row r when r - near <= col <= r + far (an
    unbounded side is passed as UNBOUNDED) and col < col_len. (Forward and dQ:
    rows are queries, columns keys, near/far = window left/right; dK/dV:
    rows are keys, columns queries, near/far = window right/left.) Rows past
    their own length are the caller's to zero. The caller has
    already clipped lo (a multiple of BLOCK) and hi to the visible band. A
    block is "full" when every row of the block sees all its columns.
    """
    # col >= row_last - near for every row of the block
    full_lo = tl.maximum(lo, tl.cdiv(tl.maximum(row_last - near, 0), BLOCK) * BLOCK)
    full_hi = (tl.minimum(hi, col_len) // BLOCK) * BLOCK  # whole blocks of valid columns
    # col <= row_first + far for every column of the block
    full_hi = tl.minimum(full_hi, ((row_first + far + 1) // BLOCK) * BLOCK)
    a = tl.minimum(full_lo, hi)
    b = tl.maximum(tl.minimum(full_hi, hi), a)  # empty interior: b = a, the far edge is [a, hi)
    return a, b


@triton.jit
def stage_range(STAGE: tl.constexpr, lo, a, c, hi):
    """The blocks of one stage of a walk: 0 the near edge [lo, a) and 2 the far edge
    [c, hi), both masked by the structure; 1 the interior [a, c), which is not."""
    if STAGE == 0:
        return lo, a
    elif STAGE == 1:
        return a, c
    else:
        return c, hi


@triton.jit
def structure_visible(rows, cols, row_len, col_len, near, far):
    """Bool tile: rows (queries) and cols (keys) broadcast against each other."""
    return (rows < row_len) & (cols < col_len) & (cols >= rows - near) & (cols <= rows + far)


@triton.jit
def pair_index(offs_q, offs_k, KEYS_BY_QUERIES: tl.constexpr):
    """Broadcast (queries, keys) index tiles of a score tile: queries x keys (the forward, dQ),
    or keys x queries (KEYS_BY_QUERIES: the dK/dV kernel's transposed tiles). Built where each
    use needs them (so the kernels keep the op order ptxas was measured with)."""
    if KEYS_BY_QUERIES:
        return offs_q[None, :], offs_k[:, None]
    else:
        return offs_q[:, None], offs_k[None, :]


@triton.jit
def visible(offs_q, offs_k, mask_base, stride_mm, stride_mn, L, S, query_len, key_len, window_left, window_right,
            STRUCTURE_MASK: tl.constexpr, MASK_KIND: tl.constexpr, KEYS_BY_QUERIES: tl.constexpr):
    """Bool tile: the pairs neither the bool mask nor (STRUCTURE_MASK) the band and lengths
    hide. For calls with MASK_KIND == 1 or STRUCTURE_MASK only."""
    if MASK_KIND == 1:
        queries, keys = pair_index(offs_q, offs_k, KEYS_BY_QUERIES)
        keep = load_mask(mask_base, queries, keys, stride_mm, stride_mn, L, S, MASK_KIND)
        if STRUCTURE_MASK:
            queries, keys = pair_index(offs_q, offs_k, KEYS_BY_QUERIES)
            keep = keep & structure_visible(queries, keys, query_len, key_len, window_left, window_right)
    else:
        queries, keys = pair_index(offs_q, offs_k, KEYS_BY_QUERIES)
        keep = structure_visible(queries, keys, query_len, key_len, window_left, window_right)
    return keep


@triton.jit
def masked_scores(s, offs_q, offs_k, mask_base, stride_mm, stride_mn, L, S, query_len, key_len,
                  window_left, window_right, STRUCTURE_MASK: tl.constexpr, MASK_KIND: tl.constexpr):
    """The one score rule (the forward's): a tile of base-2 scores (scale * log2 e already
    applied), queries x keys, plus the float mask, and -inf wherever the bool mask or
    (STRUCTURE_MASK) the band and lengths hide the pair. ``offs_q``, ``offs_k``: the tile's
    query and key indices."""
    if MASK_KIND == 2:
        queries, keys = pair_index(offs_q, offs_k, False)
        s += load_mask(mask_base, queries, keys, stride_mm, stride_mn, L, S, MASK_KIND)
    if MASK_KIND == 1 or STRUCTURE_MASK:
        s = tl.where(visible(offs_q, offs_k, mask_base, stride_mm, stride_mn, L, S, query_len, key_len, window_left,
                             window_right, STRUCTURE_MASK, MASK_KIND, False), s, float("-inf"))
    return s


@triton.jit
def masked_probabilities(s, lse2, offs_q, offs_k, mask_base, stride_mm, stride_mn, L, S, query_len, key_len,
                         window_left, window_right, STRUCTURE_MASK: tl.constexpr, MASK_KIND: tl.constexpr,
                         KEYS_BY_QUERIES: tl.constexpr):
    """The backward twin of masked_scores: the probabilities P = exp2(s + mask - lse2)
    recomputed from the saved base-2 LSE (lse2: one per query, +inf for a row that saw no
    key, so P = 0 there), 0 wherever masked_scores put -inf; queries x keys, or keys x
    queries (KEYS_BY_QUERIES, the dK/dV kernel)."""
    if MASK_KIND == 2:
        queries, keys = pair_index(offs_q, offs_k, KEYS_BY_QUERIES)
        s += load_mask(mask_base, queries, keys, stride_mm, stride_mn, L, S, MASK_KIND)
    if KEYS_BY_QUERIES:
        p = tl.math.exp2(s - lse2[None, :])
    else:
        p = tl.math.exp2(s - lse2[:, None])
    if MASK_KIND == 1 or STRUCTURE_MASK:
        p = tl.where(visible(offs_q, offs_k, mask_base, stride_mm, stride_mn, L, S, query_len, key_len, window_left,
                             window_right, STRUCTURE_MASK, MASK_KIND, KEYS_BY_QUERIES), p, 0.0)
    return p


@triton.jit
def score_grad(p, dp, delta):
    """The backward twin of the softmax over masked_scores: dS = P * (dP - delta),
    delta = rowsum(dO * O) - dLSE broadcast along the keys (0 where P is)."""
    return p * (dp - delta)


@triton.jit
def load_mask(mask_base, rows, cols, stride_row, stride_col, n_rows, n_cols,
              MASK_KIND: tl.constexpr):
    """The dense mask's tile at (rows, cols) (broadcast index tensors).

    MASK_KIND 1: bool (stored as uint8), returns a bool tile "visible";
    MASK_KIND 2: additive float bias, returned in base-2 units (times log2 e).
    Out-of-range positions read as masked / 0.
    """
    ptrs = mask_base + rows.to(tl.int64) * stride_row + cols.to(tl.int64) * stride_col
    inb = (rows < n_rows) & (cols < n_cols)
    if MASK_KIND == 1:
        return tl.load(ptrs, mask=inb, other=0) != 0
    else:
        return tl.load(ptrs, mask=inb, other=0.0).to(tl.float32) * 1.4426950408889634


@triton.jit
def sequence_lengths(KEY_LENGTHS, QUERY_LENGTHS, b, L, S,
                     HAS_KEY_LENGTHS: tl.constexpr, HAS_QUERY_LENGTHS: tl.constexpr):
    """(query_len, key_len) of batch b: the lengths entries, clamped, or L and S."""
    key_len = S
    if HAS_KEY_LENGTHS:
        key_len = clamp_length(KEY_LENGTHS, b, S)
    query_len = L
    if HAS_QUERY_LENGTHS:
        query_len = clamp_length(QUERY_LENGTHS, b, L)
    return query_len, key_len


@triton.jit
def query_block(H, GROUP):
    """The prologue of the kernels that walk key blocks for one block of queries (the
    forward, dQ): grid (query block, batch * head, key split). Returns the batch b, head h,
    kv head hk, bh = b * H + h, the split and the query block's index. The kernel reads
    the sequence lengths itself, next (sequence_lengths), then forms the block's first row
    (that order is the one ptxas was measured with: Triton 3.6 spills 8 B more in a dQ
    config when the row is formed first). torch.compile's mutation analysis
    traces a store's address back through every argument of a helper call whose results
    form it, so a helper that both reads the lengths and returns the batch index would
    mark the lengths as written (and make inductor clone them). (The key blocks come
    after the kernel's base pointers, query_block_key_ranges: that order is what ptxas
    was measured with.)"""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    return b, h, hk, bh, split, pid_m


@triton.jit
def row_block(H, BLOCK_M: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr):
    """The prologue of the per-row kernels (grid: row block, batch * head): (b, h, bh, the
    block's rows, the value head dim's index vector)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    return bh // H, bh % H, bh, pid_m * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, HEAD_DIM_V_PAD)


@triton.jit
def tile_offsets(m0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                 HEAD_DIM_V_PAD: tl.constexpr):
    """The index vectors of a query block's tiles: its rows, a key block's columns (from 0),
    the head dim's and the value head dim's."""
    return (m0 + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, HEAD_DIM_PAD),
            tl.arange(0, HEAD_DIM_V_PAD))


@triton.jit
def query_block_key_ranges(m0, split, keys_per_split, query_len, key_len, window_left, window_right,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key blocks seen by the query block at m0 within one key split:
    (lo, a, c, hi) with masked [lo, a), interior [a, c), masked [c, hi)."""
    row_last = tl.minimum(m0 + BLOCK_M, query_len) - 1
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, key_len)
    lo = tl.maximum(lo, (tl.maximum(m0 - window_left, 0) // BLOCK_N) * BLOCK_N)
    hi = tl.minimum(hi, row_last + window_right + 1)
    if row_last < m0:  # the whole block is past query_lengths
        hi = lo
    a, c = block_ranges(m0, row_last, lo, hi, window_left, window_right, key_len, BLOCK_N)
    return lo, a, c, hi
