# Host (numpy, float64) model of the Hopper hardware and shared kernel helpers that
# emulate_fwd.py and emulate_bwd.py run the sm_90a kernels' index math on:
#   - shared memory as 2-byte slots (NaN until written, bounds-checked), the 128-byte
#     swizzle on absolute byte addresses (sm90.h sw128_offset, TMA SWIZZLE_128B);
#   - TMA tile loads of a 64-column box, swizzled, zero fill outside the tensor;
#   - wgmma shared-memory descriptors, encoded as sm90.h does and decoded as the
#     PTX ISA reads them, canonical SW128 K-major / MN-major operand reads;
#   - wgmma register fragments: the accumulator (D) and A-operand index maps per
#     warp of a warpgroup and lane, pack_p (block_utils.h), __shfl_xor_sync;
#   - block_utils.h's visibility, valid lengths and visible block ranges;
#   - a float64 attention reference (forward and gradients), the oracle.
# No fp16/bf16 rounding, no timing, no memory ordering: data path only.
import numpy as np

INF = np.inf
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
ROW_BYTES = 128      # one swizzled row: 64 16-bit elements
ATOM_BYTES = 1024    # 8 rows: the swizzle atom, the descriptors' stride offset
BOX_COLS = 64        # TMA box width in elements (kPanelCols)


# ---- shared memory and the 128-byte swizzle ----
def swz(addr):
    """128-byte swizzle of absolute byte addresses (tiles 1024-byte aligned)."""
    addr = np.asarray(addr)
    return addr ^ (((addr >> 7) & 7) << 4)


def sw128_offset(row, col):
    """sm90.h sw128_offset: byte offset of element (row, col < 64) of a swizzled tile."""
    return row * ROW_BYTES + ((col // 8) ^ (row % 8)) * 16 + (col % 8) * 2


class Smem:
    """Shared memory as 2-byte slots holding float64 values, NaN until written."""

    def __init__(self, nbytes):
        self.nbytes = nbytes
        self.slots = np.full(nbytes // 2, np.nan)

    def _check(self, addr):
        a = np.asarray(addr)
        assert (a >= 0).all() and (a + 2 <= self.nbytes).all() and (a % 2 == 0).all(), 'smem access out of the allocation'

    def st(self, addr, value):
        self._check(addr)
        self.slots[np.asarray(addr) // 2] = value

    def ld(self, addr):
        self._check(addr)
        return self.slots[np.asarray(addr) // 2]


def tma_load(sm, dst, tensor2d, c0, r0, box_rows, txlog=None):
    """cp.async.bulk.tensor of a 64 x box_rows box of tensor2d (rows x cols of one head and
    batch) at (r0, c0), SWIZZLE_128B, zero fill outside; txlog gets the bytes complete_tx credits.
    A box wholly outside is an error: the launcher excludes those calls (panels_overlap)."""
    assert dst % ATOM_BYTES == 0, 'TMA SW128 destination must be 1024-aligned'
    R, C = tensor2d.shape
    assert r0 < R and c0 < C, 'box wholly outside the tensor (launcher should have excluded it)'
    r = np.arange(box_rows)[:, None]
    c = np.arange(BOX_COLS)[None, :]
    rr, cc = r0 + r, c0 + c
    inside = (rr < R) & (cc < C) & (rr >= 0) & (cc >= 0)
    val = np.where(inside, tensor2d[np.clip(rr, 0, R - 1), np.clip(cc, 0, C - 1)], 0.0)
    sm.st(swz(dst + r * ROW_BYTES + c * 2), val)
    if txlog is not None:
        txlog.append(box_rows * ROW_BYTES)  # the full box, zero fill included


def zero_rows(sm, tile, panels, panel_bytes, row0, rows):
    """sm90.h zero_rows: rows [row0, rows) of each panel, 16 bytes a chunk (all threads together)."""
    n = rows - row0
    for c in range(panels * n * 8):
        addr = tile + (c // (n * 8)) * panel_bytes + (row0 + (c // 8) % n) * ROW_BYTES + (c % 8) * 16
        sm.st(addr + 2 * np.arange(8), 0.0)


def panels_overlap(D, E, Ev):
    """launch_templates.h panels_overlap: every 64-column box overlaps q/k (E) and v/dO (Ev) columns;
    false sends the call to the sm_80 kernels."""
    last_panel = (D // BOX_COLS - 1) * BOX_COLS
    return E > last_panel and Ev > last_panel


# ---- wgmma shared-memory descriptors ----
def gmma_desc_sw128(addr, lead, stride):  # sm90.h gmma_desc_sw128
    return (((addr & 0x3FFFF) >> 4) | (((lead >> 4) & 0x3FFF) << 16) | (((stride >> 4) & 0x3FFF) << 32)
            | (1 << 62))


def gmma_desc_k_major(addr):
    return gmma_desc_sw128(addr, 16, ATOM_BYTES)


def gmma_desc_mn_major(addr, panel_bytes):
    return gmma_desc_sw128(addr, panel_bytes, ATOM_BYTES)


def decode_desc(desc):
    """(start, leading, stride) byte offsets as the hardware reads them; SW128, base offset 0."""
    start = (desc & 0x3FFF) << 4
    lead = ((desc >> 16) & 0x3FFF) << 4
    stride = ((desc >> 32) & 0x3FFF) << 4
    assert desc >> 62 == 1 and (desc >> 49) & 7 == 0
    return start, lead, stride


def operand_k_major(sm, desc, rows):
    """rows x 16 (element (row, k)) of a canonical SW128 K-major operand."""
    start, _, stride = decode_desc(desc)
    m = np.arange(rows)[:, None]
    k = np.arange(16)[None, :]
    return sm.ld(swz(start + (m // 8) * stride + (m % 8) * ROW_BYTES + k * 2))


def operand_mn_major(sm, desc, n):
    """16 x n (element (k, x)) of a canonical SW128 MN-major operand."""
    start, lead, stride = decode_desc(desc)
    k = np.arange(16)[:, None]
    x = np.arange(n)[None, :]
    return sm.ld(swz(start + (x // 64) * lead + (k // 8) * stride + (k % 8) * ROW_BYTES + (x % 64) * 2))


# ---- wgmma register fragments: (warp 0..3, lane 0..31, ...) per warpgroup ----
WARP = np.arange(4)[:, None, None, None]
LANE = np.arange(32)[None, :, None, None]


def acc_row_col(w, lane, j, e):
    """Accumulator element e of n-tile j of (warp w, lane) -> (row in 64, column)."""
    g, t = lane // 4, lane % 4
    return 16 * w + g + 8 * (e >> 1), 8 * j + 2 * t + (e & 1)


def acc_grid(ntiles):
    """(row, column) of every accumulator element, shaped (4 warps, 32 lanes, ntiles, 4)."""
    rows, cols = acc_row_col(WARP, LANE, np.arange(ntiles)[None, None, :, None], np.arange(4)[None, None, None, :])
    return np.broadcast_arrays(rows, cols)


def acc_from_matrix(Dm, ntiles):
    r, c = acc_grid(ntiles)
    return Dm[r, c]


def a_row_col(lane, reg):
    """A-operand register reg (2 halves) of lane -> (row, first column) in its warp's 16 x 16 tile."""
    g, t = lane // 4, lane % 4
    return g + 8 * (reg & 1), 8 * (reg >> 1) + 2 * t


PACK_P_REGS = ((0, 0), (0, 2), (1, 0), (1, 2))  # pack_p: a[reg] = acc tile 2 kk + dj, elements e0, e0 + 1


def pack_p(acc, kk, regs=PACK_P_REGS):
    """block_utils.h pack_p: accumulator (..., ntiles, 4) -> A registers (..., 4 regs, 2 halves) of k-step kk."""
    return np.stack([np.stack([acc[..., 2 * kk + dj, e0], acc[..., 2 * kk + dj, e0 + 1]], -1) for dj, e0 in regs], -2)


def a_tiles(a):
    """A registers (..., 32 lanes, 4 regs, 2 halves) -> (..., 16, 16): one 16 x 16 tile per leading index."""
    A = np.full(a.shape[:-3] + (16, 16), np.nan)
    lane = np.arange(32)
    for reg in range(4):
        row, col = a_row_col(lane, reg)
        A[..., row, col] = a[..., reg, 0]
        A[..., row, col + 1] = a[..., reg, 1]
    return A


def wgmma_ss(acc, sm, desc_a, desc_b, n, scale_d, mn_major=False):
    """D(64 x n) (+)= A(64 x 16) B(16 x n), both from shared memory, K-major or both MN-major."""
    if mn_major:
        Dm = operand_mn_major(sm, desc_a, 64).T @ operand_mn_major(sm, desc_b, n)
    else:
        Dm = operand_k_major(sm, desc_a, 64) @ operand_k_major(sm, desc_b, n).T
    f = acc_from_matrix(Dm, n // 8)
    return acc + f if scale_d else f


def wgmma_rs_mn(acc, a, sm, desc_b, n):
    """D(64 x n) += A(registers, (4 warps, 32 lanes, 4, 2)) B(16 x n, MN-major)."""
    A = a_tiles(a).reshape(64, 16)
    return acc + acc_from_matrix(A @ operand_mn_major(sm, desc_b, n), n // 8)


def shfl_xor(x, mask):
    """__shfl_xor_sync over the lane axis of (4 warps, 32 lanes, ...)."""
    return x[:, np.arange(32) ^ mask]


# ---- block_utils.h: lengths, visibility, visible block ranges ----
def valid_length(lengths, b, full):
    if lengths is None:
        return full
    return 0 if lengths[b] < 0 else min(lengths[b], full)


class Visibility:
    """Query i sees key j: both within the valid lengths and the window (-1: unbounded)."""

    def __init__(self, l_eff, s_eff, wl, wr):
        self.l_eff, self.s_eff, self.wl, self.wr = l_eff, s_eff, wl, wr

    def __call__(self, i, j):
        return ((i < self.l_eff) & (j < self.s_eff) & ((self.wl < 0) | (j >= i - self.wl))
                & ((self.wr < 0) | (j <= i + self.wr)))

    def tile_all_visible(self, m0, bm, n0, bn):
        return (m0 + bm <= self.l_eff and n0 + bn <= self.s_eff and (self.wl < 0 or n0 >= m0 + bm - 1 - self.wl)
                and (self.wr < 0 or n0 + bn - 1 <= m0 + self.wr))


def visible_blocks(x0, width, reach_lo, reach_hi, other_eff, own_past_end, blk):
    """Blocks [lo, hi) of size blk on the other axis seen by positions [x0, x0 + width):
    fwd_key_blocks (x = queries, reach_lo = window_left, reach_hi = window_right) and
    bwd_query_blocks (x = keys, reach_lo = window_right, reach_hi = window_left)."""
    lo, hi = 0, other_eff
    if reach_lo >= 0:
        lo = max(0, x0 - reach_lo)
    if reach_hi >= 0:
        hi = min(hi, x0 + width + reach_hi)
    if own_past_end:
        hi = lo
    return lo // blk, ((hi + blk - 1) // blk if hi > lo else lo // blk)


# ---- float64 oracle ----
def attention_reference(q, k, v, scale, wl, wr, kl, ql, mask, mask_kind, do=None):
    """out, lse (natural log, -inf for a row that sees nothing); with do also dq, dk, dv."""
    B, Hq, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    grp = Hq // Hkv
    kk, vv = np.repeat(k, grp, 1), np.repeat(v, grp, 1)
    s = np.einsum('bhie,bhje->bhij', q, kk) * scale
    vis = np.ones((B, Hq, L, S), bool)
    for b in range(B):
        vis[b] = Visibility(valid_length(ql, b, L), valid_length(kl, b, S), wl, wr)(
            np.arange(L)[:, None], np.arange(S)[None, :])
    if mask is not None:
        if mask_kind == 'bool':
            vis = vis & mask
        else:
            s = s + np.where(vis, mask, 0.0)
    s = np.where(vis, s, -INF)
    mx = s.max(-1, keepdims=True)
    mxs = np.where(np.isinf(mx), 0, mx)
    p = np.exp(s - mxs)
    den = p.sum(-1, keepdims=True)
    with np.errstate(divide='ignore'):
        lse = np.where(den == 0, -INF, np.log(np.where(den == 0, 1, den)) + mxs)[..., 0]
    p = np.where(den == 0, 0, p / np.where(den == 0, 1, den))
    out = np.einsum('bhij,bhjd->bhid', p, vv)
    if do is None:
        return out, lse
    dv = np.einsum('bhij,bhid->bhjd', p, do)
    dp = np.einsum('bhid,bhjd->bhij', do, vv)
    ds = p * (dp - (do * out).sum(-1, keepdims=True))
    dq = np.einsum('bhij,bhjd->bhid', ds, kk) * scale
    dk = np.einsum('bhij,bhid->bhjd', ds, q) * scale
    return out, lse, dq, dk.reshape(B, Hkv, grp, S, -1).sum(2), dv.reshape(B, Hkv, grp, S, -1).sum(2)
