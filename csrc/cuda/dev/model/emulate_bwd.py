# Host emulation of csrc/cuda/flash_bwd_sm90_kernel.h (data path), step by step, on the
# hardware model of hw.py, against the float64 reference gradients. The kernel's index
# math (shared-memory layout, TMA boxes, descriptors, k-step offsets, fragments, dS^T
# stores, dQ split) is re-implemented here by hand: update it with the kernel.
import sys
sys.dont_write_bytecode = True  # noqa: E402 (keep __pycache__ out of the source tree)

import numpy as np

import harness
import hw
from hw import INF, LOG2E

USAGE = """
python3 csrc/cuda/dev/model/emulate_bwd.py [MUTATION ...]
  Emulates the Hopper backward on 6 cases (D = 64, 128) and compares dq, dk, dv with
  float64 reference gradients (delta and lse taken from the reference); one line per
  case, then a summary. Several mutations may be combined."""
MUTATIONS = {
    'ds_noswizzle': 'dS^T st.shared at row*128 + col*2 instead of sw128_offset(row, col)',
    'delta_half':   'dS^T = P^T (dP^T - delta/2) instead of P^T (dP^T - delta)',
    'afrag':        'A-fragment map with row and column halves swapped (same as pack_p with a[1], a[2] swapped)',
}
KBM, KBN, KSTAGES = 64, 128, 2
SMEM_BYTES = 256 * 1024


class Layout:
    """The kernel's tile sizes and shared-memory carve-up for head dimension D."""

    def __init__(self, D):
        self.D, self.panels = D, D // 64
        self.panel_kv, self.panel_q = KBN * 128, KBM * 128
        self.tile_kv, self.tile_q, self.tile_ds = self.panels * self.panel_kv, self.panels * self.panel_q, KBN * 128
        self.dq_by_keys = D == 64
        self.dq_cols = D if self.dq_by_keys else D // 2
        self.dq_keys = 64 if self.dq_by_keys else KBN
        self.sK = 1024
        self.sV = self.sK + self.tile_kv
        self.sQ = self.sV + self.tile_kv
        self.sdO = self.sQ + KSTAGES * self.tile_q
        self.sdS = self.sdO + KSTAGES * self.tile_q

    def load(self, sm, dst, tensor, r0, box_rows, panel_bytes):
        for pn in range(self.panels):
            hw.tma_load(sm, dst + pn * panel_bytes, tensor, pn * 64, r0, box_rows)


def mn_major_k_steps(sm, start, lead, n):
    """B operands of the four k-steps (16 rows each, kk * 16 rows apart), stacked: 64 x n."""
    return np.concatenate([hw.operand_mn_major(sm, hw.gmma_desc_mn_major(start + kk * 16 * 128, lead), n)
                           for kk in range(4)], 0)


def p_and_ds(acc_s, acc_dp, rows, cols, m0, key0, need_mask, vis, mask_bh, lse2_bh, delta_bh, sl2, mut):
    """P^T = exp2(S^T scale - lse) (masked) and dS^T = P^T (dP^T - delta) on one warpgroup's fragments."""
    L = lse2_bh.shape[0]
    i, key = m0 + cols, key0 + rows
    ic = np.clip(i, 0, L - 1)
    x = acc_s * sl2
    if need_mask:
        ok = vis(i, key)
        if mask_bh is not None:
            ok = ok & mask_bh[ic, np.clip(key, 0, mask_bh.shape[1] - 1)]
        x = np.where(ok, x, -INF)
    with np.errstate(invalid='ignore'):
        p = np.exp2(x - np.where(i < L, lse2_bh[ic], INF))
    delta_c = np.where(i < L, delta_bh[ic], 0.0)
    if 'delta_half' in mut:
        delta_c = delta_c * 0.5
    return p, p * (acc_dp - delta_c)


def run(D, q, k, v, do, out, lse_nat, scale, wl, wr, kl, ql, mask=None, mut=frozenset()):
    B, Hq, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    group = Hq // Hkv
    lay = Layout(D)
    # bwd_delta_kernel: delta = rowsum(dO o out), lse in log2 units (+inf: empty row)
    delta = np.where(lse_nat == -INF, 0.0, (do * out[..., :Ev]).sum(-1))
    lse2 = np.where(lse_nat == -INF, INF, lse_nat * LOG2E)
    dq_acc, dk, dv = np.zeros((B, Hq, L, E)), np.zeros(k.shape), np.zeros(v.shape)
    sl2 = scale * LOG2E
    regs = hw.PACK_P_REGS
    if 'afrag' in mut:
        regs = (regs[0], regs[2], regs[1], regs[3])
    rows_q, cols_q = hw.acc_grid(KBM // 8)       # S^T, dP^T: 64 keys x 64 queries per warpgroup
    rows_d, cols_d = hw.acc_grid(D // 8)         # dK, dV: 64 keys x D
    rows_dq, cols_dq = hw.acc_grid(lay.dq_cols // 8)
    stats = dict(blocks=0, steps=0)
    for b in range(B):
        for hk in range(Hkv):
            for nb in range((S + KBN - 1) // KBN):
                sm = hw.Smem(SMEM_BYTES)
                n0 = nb * KBN
                vis = hw.Visibility(hw.valid_length(ql, b, L), hw.valid_length(kl, b, S), wl, wr)
                mb_lo, mb_hi = hw.visible_blocks(n0, KBN, wr, wl, vis.l_eff, n0 >= vis.s_eff, KBM)
                num_mb = mb_hi - mb_lo
                num_iters = num_mb * group
                stats['blocks'] += 1
                if num_iters > 0:
                    lay.load(sm, lay.sK, k[b, hk], n0, KBN, lay.panel_kv)
                    lay.load(sm, lay.sV, v[b, hk], n0, KBN, lay.panel_kv)
                    if n0 + KBN > vis.s_eff and vis.s_eff < S:
                        for tile in (lay.sK, lay.sV):
                            hw.zero_rows(sm, tile, lay.panels, lay.panel_kv, max(0, vis.s_eff - n0), KBN)
                acc_dk = np.zeros((2, 4, 32, D // 8, 4))  # [warpgroup][warp][lane][n-tile][element]
                acc_dv = np.zeros((2, 4, 32, D // 8, 4))
                for it in range(num_iters):
                    stats['steps'] += 1
                    s, h, m0 = it % KSTAGES, hk * group + it // num_mb, (mb_lo + it % num_mb) * KBM
                    sQ_s, sdO_s = lay.sQ + s * lay.tile_q, lay.sdO + s * lay.tile_q
                    sdS_b = lay.sdS + (it % 2) * lay.tile_ds
                    lay.load(sm, sQ_s, q[b, h], m0, KBM, lay.panel_q)  # the ring, in order (data only)
                    lay.load(sm, sdO_s, do[b, h], m0, KBM, lay.panel_q)
                    if m0 + KBM > vis.l_eff and vis.l_eff < L:
                        for tile in (sQ_s, sdO_s):
                            hw.zero_rows(sm, tile, lay.panels, lay.panel_q, max(0, vis.l_eff - m0), KBM)
                    need_mask = mask is not None or not vis.tile_all_visible(m0, KBM, n0, KBN)
                    for wg in range(2):
                        acc_s = acc_dp = None
                        for kk in range(D // 16):
                            off_kv = (kk // 4) * lay.panel_kv + (kk % 4) * 32 + wg * 64 * 128
                            off_q = (kk // 4) * lay.panel_q + (kk % 4) * 32
                            acc_s = hw.wgmma_ss(acc_s, sm, hw.gmma_desc_k_major(lay.sK + off_kv),
                                                hw.gmma_desc_k_major(sQ_s + off_q), KBM, kk > 0)
                            acc_dp = hw.wgmma_ss(acc_dp, sm, hw.gmma_desc_k_major(lay.sV + off_kv),
                                                 hw.gmma_desc_k_major(sdO_s + off_q), KBM, kk > 0)
                        p, ds = p_and_ds(acc_s, acc_dp, rows_q, cols_q, m0, n0 + wg * 64, need_mask, vis,
                                         None if mask is None else mask[b, h], lse2[b, h], delta[b, h], sl2, mut)
                        # dV += P^T dO, dK += dS^T Q: A from registers (pack_p), B MN-major; the 4 k-steps as one
                        # 64-deep product per warp (float64: the summation order of the first version)
                        a_ds = [hw.pack_p(ds, kk, regs) for kk in range(KBM // 16)]
                        AP = np.concatenate([hw.a_tiles(hw.pack_p(p, kk, regs)) for kk in range(KBM // 16)], -1)
                        ADS = np.concatenate([hw.a_tiles(a) for a in a_ds], -1)
                        dv_step = AP @ mn_major_k_steps(sm, sdO_s, lay.panel_q, D)   # per warp: 16 x D
                        dk_step = ADS @ mn_major_k_steps(sm, sQ_s, lay.panel_q, D)
                        acc_dv[wg] += hw.acc_from_matrix(dv_step.reshape(64, D), D // 8)
                        acc_dk[wg] += hw.acc_from_matrix(dk_step.reshape(64, D), D // 8)
                        # dS^T to shared memory (each thread its A registers)
                        lane = np.arange(32)
                        for kk, a in enumerate(a_ds):
                            for reg in range(4):
                                r, c = hw.a_row_col(lane, reg)
                                row, col = wg * 64 + 16 * np.arange(4)[:, None] + r, kk * 16 + c
                                off = row * 128 + col * 2 if 'ds_noswizzle' in mut else hw.sw128_offset(row, col)
                                sm.st(sdS_b + off, a[..., reg, 0])
                                sm.st(sdS_b + off + 2, a[..., reg, 1])
                    # __syncthreads; dQ += dS K: kBM queries x this warpgroup's dq_cols columns
                    for wg in range(2):
                        acc_dq = None
                        for kk in range(lay.dq_keys // 16):
                            if lay.dq_by_keys:
                                a_start = sdS_b + (wg * 64 + kk * 16) * 128
                                b_start = lay.sK + (wg * 64 + kk * 16) * 128
                            else:
                                a_start = sdS_b + kk * 16 * 128
                                b_start = lay.sK + wg * lay.panel_kv + kk * 16 * 128
                            acc_dq = hw.wgmma_ss(acc_dq, sm, hw.gmma_desc_mn_major(a_start, lay.tile_ds),
                                                 hw.gmma_desc_mn_major(b_start, lay.panel_kv), lay.dq_cols, kk > 0,
                                                 mn_major=True)
                        i = m0 + rows_dq
                        c = (0 if lay.dq_by_keys else wg * lay.dq_cols) + cols_dq
                        keep = (i < vis.l_eff) & (c < E)
                        dq_acc[b, h, i[keep], c[keep]] += acc_dq[keep]
                for wg in range(2):
                    key = n0 + wg * 64 + rows_d
                    for grad, acc, width, f in ((dk, acc_dk, E, scale), (dv, acc_dv, Ev, 1.0)):
                        keep = (key < S) & (cols_d < width)
                        grad[b, hk, key[keep], cols_d[keep]] = acc[wg][keep] * f
    return dq_acc * scale, dk, dv, stats


CASES = [
    dict(D=64, B=1, Hq=1, Hkv=1, L=70, S=130, E=64, Ev=64),
    dict(D=128, B=1, Hq=2, Hkv=1, L=150, S=200, E=128, Ev=128, wr=0),
    dict(D=128, B=2, Hq=2, Hkv=2, L=130, S=260, E=120, Ev=96, kl=[260, 129], ql=[100, 130]),
    dict(D=64, B=2, Hq=4, Hkv=2, L=200, S=140, E=56, Ev=64, wl=40, wr=7),
    dict(D=128, B=1, Hq=1, Hkv=1, L=100, S=150, E=128, Ev=72, mask=True),
    dict(D=64, B=3, Hq=2, Hkv=1, L=70, S=300, E=64, Ev=64, kl=[150, 37, 300], ql=[70, 5, 0], nan=True),
]


def main(argv):
    mut, _ = harness.parse_args(argv, MUTATIONS, USAGE)
    rng = np.random.default_rng(0)
    worst, fails = 0.0, 0
    for n, c in enumerate(CASES):
        (D, B, Hq, Hkv, L, S, E, Ev), (wl, wr, kl, ql) = harness.case_params(c)
        q = rng.standard_normal((B, Hq, L, E))
        k = rng.standard_normal((B, Hkv, S, E))
        v = rng.standard_normal((B, Hkv, S, Ev))
        do = rng.standard_normal((B, Hq, L, Ev))
        scale = E ** -0.5
        mask = rng.random((B, Hq, L, S)) > 0.3 if c.get('mask') else None
        out, lse, dq, dk, dv = hw.attention_reference(q, k, v, scale, wl, wr, kl, ql, mask, 'bool', do=do)
        qq, kq, vq, dd = q.copy(), k.copy(), v.copy(), do.copy()
        if c.get('nan'):  # the reference saw clean inputs: compare with zero gradients past the lengths
            harness.poison_past(kl, kq, vq)
            harness.poison_past(ql, qq, dd)
            for b in range(B):
                dq[b, :, ql[b]:] = dk[b, :, kl[b]:] = dv[b, :, kl[b]:] = 0
        edq, edk, edv, st = run(D, qq, kq, vq, dd, out, lse, scale, wl, wr, kl, ql, mask, mut)
        errs = [harness.max_abs_err(a, r) for a, r in ((edq, dq), (edk, dk), (edv, dv))]
        ok = max(errs) < 1e-12
        worst = max(worst, *errs)
        fails += not ok
        assert hw.panels_overlap(D, E, Ev), 'a case the launcher sends to the sm_80 kernels'
        print(f"[{n}] {'PASS' if ok else 'FAIL'} dq {errs[0]:.2e} dk {errs[1]:.2e} dv {errs[2]:.2e}  "
              f"blocks={st['blocks']} steps={st['steps']}  {harness.describe(c)}")
    return harness.summary(mut, len(CASES), fails, worst)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
