# Host emulation of csrc/cuda/flash_fwd_sm90_kernel.h (data path), step by step, on the
# hardware model of hw.py, against the float64 reference. The kernel's index math
# (shared-memory layout, TMA boxes, descriptors, k-step offsets, fragments, masking,
# online softmax, epilogue) is re-implemented here by hand: update it with the kernel.
import sys
sys.dont_write_bytecode = True  # noqa: E402 (keep __pycache__ out of the source tree)

import numpy as np

import harness
import hw
from hw import INF, LN2, LOG2E

USAGE = """
python3 csrc/cuda/dev/model/emulate_fwd.py [MUTATION ...]
  Emulates the Hopper forward on 28 cases (D = 64, 128) and compares out and lse with a
  float64 reference; one line per case, then a summary. Several mutations may be combined."""
MUTATIONS = {
    'vstep':  'O += P V: V k-step offset kk*8*128 instead of kk*16*128',
    'panel':  'S = Q K^T: k-step offset kk*32 (no panel term) instead of (kk/4)*kPanel + (kk%4)*32',
    'nozero': 'no zero_rows of V rows past key_lengths',
    'vlbo':   'V MN-major descriptor with LBO = 1024 instead of kPanelKV',
    'neginf': 'online_softmax without the mx == -inf guard (m_use = mx)',
    'packp':  'pack_p with a[1] and a[2] swapped',
}
KBM, KBN, KSTAGES = 128, 128, 2


def online_softmax(acc_s, acc_o, row_max, row_sum, mut):  # block_utils.h online_softmax, one warpgroup
    for r in range(2):
        mx = row_max[:, :, r].copy()
        for j in range(acc_s.shape[2]):
            mx = np.fmax(mx, np.fmax(acc_s[:, :, j, 2 * r], acc_s[:, :, j, 2 * r + 1]))
        mx = np.fmax(mx, hw.shfl_xor(mx, 1))
        mx = np.fmax(mx, hw.shfl_xor(mx, 2))
        with np.errstate(invalid='ignore'):
            if 'neginf' in mut:
                alpha = np.exp2(row_max[:, :, r] - mx)
                m_use = mx
            else:
                alpha = np.where(mx == -INF, 1.0, np.exp2(row_max[:, :, r] - mx))
                m_use = np.where(mx == -INF, 0.0, mx)
            row_max[:, :, r] = mx
            ssum = np.zeros((4, 32))
            for j in range(acc_s.shape[2]):
                acc_s[:, :, j, 2 * r] = np.exp2(acc_s[:, :, j, 2 * r] - m_use)
                acc_s[:, :, j, 2 * r + 1] = np.exp2(acc_s[:, :, j, 2 * r + 1] - m_use)
                ssum = ssum + acc_s[:, :, j, 2 * r] + acc_s[:, :, j, 2 * r + 1]
            row_sum[:, :, r] = row_sum[:, :, r] * alpha + ssum
            acc_o[:, :, :, 2 * r] *= alpha[:, :, None]
            acc_o[:, :, :, 2 * r + 1] *= alpha[:, :, None]


def scale_and_mask(acc_s, need_mask, vis, row0, n0, mask, mask_bh, mask_kind, scale_log2):  # block_utils.h
    if not need_mask:
        return acc_s * scale_log2
    rows, cols = hw.acc_grid(acc_s.shape[2])
    i, jj = row0 + rows, n0 + cols
    ok = vis(i, jj)
    bias = np.zeros(ok.shape)
    if mask is not None:
        L, S = mask_bh.shape
        mv = mask_bh[np.clip(i, 0, L - 1), np.clip(jj, 0, S - 1)]
        if mask_kind == 'bool':
            ok = ok & np.where(ok, mv, True)
        else:
            bias = np.where(ok, mv * LOG2E, 0.0)
    with np.errstate(invalid='ignore'):
        return np.where(ok, acc_s * scale_log2 + bias, -INF)


def write_rows(out_bh, lse_bh, acc_o, row_max, row_sum, row0):  # block_utils.h write_rows, one warpgroup
    L, Ev = out_bh.shape
    rows, cols = hw.acc_grid(acc_o.shape[2])
    for r in range(2):
        ssum = row_sum[:, :, r]
        ssum = ssum + hw.shfl_xor(ssum, 1)
        ssum = ssum + hw.shfl_xor(ssum, 2)
        inv = np.where(ssum == 0, 0.0, 1.0 / np.where(ssum == 0, 1, ssum))
        for e in (2 * r, 2 * r + 1):
            i, c = row0 + rows[..., e], cols[..., e]
            keep = (i < L) & (c < Ev)
            out_bh[i[keep], c[keep]] = (acc_o[..., e] * inv[:, :, None])[keep]
        i = row0 + rows[:, :, 0, 2 * r]
        first = (i < L) & (hw.LANE[:, :, 0, 0] % 4 == 0)
        with np.errstate(divide='ignore'):
            lse = np.where(ssum == 0, -INF, (row_max[:, :, r] + np.log2(ssum)) * LN2)
        lse_bh[i[first]] = lse[first]


def run(D, q, k, v, scale, wl, wr, kl, ql, mask, mask_kind, smem_base=0, mut=frozenset()):
    B, Hq, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    kPanels = D // 64
    kPanelQ, kPanelKV = KBM * 128, KBN * 128
    kTileQ, kTileKV = kPanels * kPanelQ, kPanels * kPanelKV
    kNTilesS, kNTilesO = KBN // 16 * 2, D // 8
    kSmemBytes = kTileQ + 2 * KSTAGES * kTileKV + 1024 + 8 * (1 + 3 * KSTAGES)
    out = np.full((B, Hq, L, Ev), np.nan)
    lse_out = np.full((B, Hq, L), np.nan)
    grid_x = (L + KBM - 1) // KBM
    stats = dict(blocks=0, steps=0, zero_steps=0)
    for b in range(B):
        for h in range(Hq):
            for bx in range(grid_x):
                sm = hw.Smem(smem_base + kSmemBytes)
                txlog = []
                hk = h // (Hq // Hkv)
                m0 = (grid_x - 1 - bx) * KBM
                vis = hw.Visibility(hw.valid_length(ql, b, L), hw.valid_length(kl, b, S), wl, wr)
                nb_lo, nb_hi = hw.visible_blocks(m0, KBM, wl, wr, vis.s_eff, m0 >= vis.l_eff, KBN)
                n_blocks = nb_hi - nb_lo
                sQ = (smem_base + 1023) & ~1023
                sK = sQ + kTileQ
                sV = sK + KSTAGES * kTileKV
                bar_q = sV + KSTAGES * kTileKV
                assert bar_q + 8 * (1 + 3 * KSTAGES) <= smem_base + kSmemBytes

                def load_tile(dst, tensor, r0, box_rows, tile_bytes):
                    tx = len(txlog)
                    for pn in range(kPanels):
                        hw.tma_load(sm, dst + pn * (tile_bytes // kPanels), tensor, pn * 64, r0, box_rows, txlog)
                    assert sum(txlog[tx:]) == tile_bytes  # expect_tx matches the boxes' bytes

                def load_kv(it):
                    s, n0 = it % KSTAGES, (nb_hi - 1 - it) * KBN
                    load_tile(sK + s * kTileKV, k[b, hk], n0, KBN, kTileKV)
                    load_tile(sV + s * kTileKV, v[b, hk], n0, KBN, kTileKV)

                if n_blocks > 0:
                    load_tile(sQ, q[b, h], m0, KBM, kTileQ)
                    for it in range(min(KSTAGES, n_blocks)):
                        load_kv(it)
                acc_o = [np.zeros((4, 32, kNTilesO, 4)) for _ in range(2)]
                row_max = [np.full((4, 32, 2), -INF) for _ in range(2)]
                row_sum = [np.zeros((4, 32, 2)) for _ in range(2)]
                stats['blocks'] += 1
                for it in range(n_blocks):
                    s = it % KSTAGES
                    n0 = (nb_hi - 1 - it) * KBN
                    stats['steps'] += 1
                    zero_step = n0 + KBN > vis.s_eff and vis.s_eff < S
                    for wg in range(2):
                        # S = Q K^T
                        acc_s = np.full((4, 32, kNTilesS, 4), np.nan)
                        for kk in range(D // 16):
                            if 'panel' in mut:
                                offq = offk = kk * 32
                            else:
                                offq = (kk // 4) * kPanelQ + (kk % 4) * 32
                                offk = (kk // 4) * kPanelKV + (kk % 4) * 32
                            acc_s = hw.wgmma_ss(acc_s, sm, hw.gmma_desc_k_major(sQ + wg * 64 * 128 + offq),
                                                hw.gmma_desc_k_major(sK + s * kTileKV + offk), KBN, kk > 0)
                        need_mask = mask is not None or not vis.tile_all_visible(m0, KBM, n0, KBN)
                        acc_s = scale_and_mask(acc_s, need_mask, vis, m0 + wg * 64, n0, mask,
                                               None if mask is None else mask[b, h], mask_kind, scale * LOG2E)
                        online_softmax(acc_s, acc_o[wg], row_max[wg], row_sum[wg], mut)
                        regs = hw.PACK_P_REGS
                        if 'packp' in mut:
                            regs = (regs[0], regs[2], regs[1], regs[3])
                        a_p = [hw.pack_p(acc_s, kk, regs) for kk in range(KBN // 16)]
                        # mbar_wait full_v; at the straddling step all 256 threads zero the V rows past
                        # key_lengths, then __syncthreads: done once, before warpgroup 0's P V.
                        if zero_step and wg == 0:
                            stats['zero_steps'] += 1
                            if 'nozero' not in mut:
                                hw.zero_rows(sm, sV + s * kTileKV, kPanels, kPanelKV, max(0, vis.s_eff - n0), KBN)
                        # O += P V
                        for kk in range(KBN // 16):
                            step = kk * 8 * 128 if 'vstep' in mut else kk * 16 * 128
                            lbo = 1024 if 'vlbo' in mut else kPanelKV
                            acc_o[wg] = hw.wgmma_rs_mn(acc_o[wg], a_p[kk], sm,
                                                       hw.gmma_desc_mn_major(sV + s * kTileKV + step, lbo), D)
                    # stage s released by both warpgroups: refill it for step it + kStages
                    if it + KSTAGES < n_blocks:
                        load_kv(it + KSTAGES)
                for wg in range(2):
                    write_rows(out[b, h], lse_out[b, h], acc_o[wg], row_max[wg], row_sum[wg], m0 + wg * 64)
    return out, lse_out, stats


def cases():
    cs = []
    for D in (64, 128):
        e2 = D - 8                      # E = D - 8: zero-filled columns
        ev2 = 40 if D == 64 else 72     # Ev < E, same panel count
        one = dict(D=D, B=1, Hq=1, Hkv=1)
        cs += [
            dict(one, L=130, S=130, E=D, Ev=D),
            dict(one, L=1, S=1, E=D, Ev=D),
            dict(one, L=97, S=300, E=e2, Ev=D),
            dict(one, L=300, S=97, E=D, Ev=ev2),
            dict(one, Hq=2, L=300, S=300, E=D, Ev=D, wr=0),                   # causal
            dict(one, L=130, S=300, E=e2, Ev=ev2, wr=0),                     # causal, L < S
            dict(one, L=300, S=300, E=D, Ev=D, wl=40, wr=7),
            dict(one, L=300, S=130, E=e2, Ev=D, wl=16, wr=0),
            dict(one, B=3, L=130, S=300, E=D, Ev=D, kl=[0, 1, 129], nan=True),
            dict(one, B=3, L=300, S=130, E=D, Ev=ev2, ql=[1, 97, 300], kl=[129, 130, 97], nan=True),
            dict(D=D, B=2, Hq=4, Hkv=2, L=97, S=300, E=e2, Ev=ev2, kl=[300, 129], ql=[0, 97], wl=40, wr=7,
                 nan=True),                                                  # GQA 4:2
            dict(one, Hq=4, Hkv=2, L=130, S=130, E=D, Ev=D, mask='bool'),
            dict(one, B=2, Hq=2, L=300, S=97, E=e2, Ev=D, mask='bool', wr=0, kl=[97, 50], nan=True),
            dict(one, Hq=2, Hkv=2, L=130, S=300, E=D, Ev=ev2, mask='float', wl=16, wr=0),
        ]
    return cs


def main(argv):
    mut, _ = harness.parse_args(argv, MUTATIONS, USAGE)
    rng = np.random.default_rng(1)
    worst, fails, all_cases = 0.0, 0, cases()
    for n, c in enumerate(all_cases):
        (D, B, Hq, Hkv, L, S, E, Ev), (wl, wr, kl, ql) = harness.case_params(c)
        mk = c.get('mask')
        q = rng.standard_normal((B, Hq, L, E)) * 1.5
        k = rng.standard_normal((B, Hkv, S, E)) * 1.5
        v = rng.standard_normal((B, Hkv, S, Ev))
        scale = E ** -0.5
        mask = None
        if mk == 'bool':
            mask = rng.random((B, Hq, L, S)) > 0.3
            mask[:, :, 3] = False  # one row with nothing visible
        elif mk == 'float':
            mask = rng.standard_normal((B, Hq, L, S))
            mask[rng.random(mask.shape) < 0.2] = -INF
            mask[:, :, 5] = -INF
        ref_o, ref_l = hw.attention_reference(q, k, v, scale, wl, wr, kl, ql, mask, mk)
        qq, kq, vq = q.copy(), k.copy(), v.copy()
        if c.get('nan'):
            harness.poison_past(kl, kq, vq)
            harness.poison_past(ql, qq)
        base = int(rng.integers(0, 64)) * 16  # an smem base aligned to 16 bytes only: the kernel rounds up
        eo, el, st = run(D, qq, kq, vq, scale, wl, wr, kl, ql, mask, mk, smem_base=base, mut=mut)
        e_o, e_l = harness.max_abs_err(eo, ref_o), harness.max_abs_err(el, ref_l)
        ok = e_o < 1e-12 and e_l < 1e-12
        worst = max(worst, e_o, e_l)
        fails += not ok
        print(f"[{n:2d}] {'PASS' if ok else 'FAIL'} out {e_o:.2e} lse {e_l:.2e}  blocks={st['blocks']} "
              f"steps={st['steps']} zero_steps={st['zero_steps']} rows_inf={int((ref_l == -INF).sum())}  "
              f"{harness.describe(c)}")
    return harness.summary(mut, len(all_cases), fails, worst)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
