# Exhaustive interleaving model check (semantics: ring_model.py) of the Hopper kernels'
# TMA rings, as the programs below transcribe them by hand (update them with the kernels):
#   fwd: csrc/cuda/flash_fwd_sm90_kernel.h: K/V ring (kStages = 2) with per-stage release
#        counters (the warpgroup that counts in second refills), zero_rows + __syncthreads
#   bwd: csrc/cuda/flash_bwd_sm90_kernel.h: Q/dO ring (kStages = 2), refilled by thread 0
#        after the per-step __syncthreads; dS^T double buffer read by both dQ wgmma
# For every step count n < 8 (n = number of ring steps of one block) and the zero_rows variants.
import sys
sys.dont_write_bytecode = True  # noqa: E402 (keep __pycache__ out of the source tree)

import harness
from ring_model import KSTAGES, Machine

USAGE = """
python3 csrc/cuda/dev/model/ring_check.py [--quick] [MUTATION]
  Explores every interleaving of the two warpgroups and the TMA boxes for n = 0..7 ring
  steps (--quick: n = 0..4) and every zero_rows variant; one line per configuration
  (PASS/FAIL and the states explored), the trace of the first two failures, a summary.
  Full: about 100 s; --quick: about 30 s. One mutation at a time; old_eq_1 first fails at
  n = 5, so --quick does not detect it."""
MUTATIONS = {
    'first_refills': 'fwd: the FIRST warpgroup to count in (old even) refills the stage',
    'parity_it':     'fwd: wait parity it & 1 instead of (it / kStages) & 1',
    'old_eq_1':      'fwd: refill iff old == 1 (instead of old odd): counter never matches again',
    'no_count':      'fwd: each warpgroup refills its own way: WG 0 refills, no counting (no wait for WG 1)',
    'refill_early':  'bwd: thread 0 refills stage s before the per-step __syncthreads',
    'one_ds':        'bwd: a single dS^T buffer instead of two',
    'vbar_k':        'fwd: P V waits on full_k instead of full_v',
}
FWD_MUTATIONS = ('first_refills', 'parity_it', 'old_eq_1', 'no_count', 'vbar_k')
BWD_MUTATIONS = ('refill_early', 'one_ds')
FULL_N, QUICK_N = 7, 4
REFILL_RULES = {  # flag = rule(old counter value, warpgroup): this warpgroup refills the stage
    '':              lambda old, wg: old % 2 == 1,   # the kernel: the second to count in
    'first_refills': lambda old, wg: old % 2 == 0,
    'old_eq_1':      lambda old, wg: old == 1,
    'no_count':      lambda old, wg: wg == 0,
}


def fwd_programs(n, zero_steps, mut):
    rule = REFILL_RULES.get(mut, REFILL_RULES[''])
    progs = []
    for wg in range(2):
        p = [('sync',)]  # after mbarrier init
        if wg == 0 and n > 0:
            p.append(('issue', dict(bar='q', bufs=[('Q',)], step=0, cond=False)))
            for it in range(min(KSTAGES, n)):
                s = it % KSTAGES
                p.append(('issue', dict(bar=('fk', s), bufs=[('K', s)], step=it, cond=False)))
                p.append(('issue', dict(bar=('fv', s), bufs=[('V', s)], step=it, cond=False)))
        if n > 0:
            p.append(('wait', 'q', 0, ([('Q',)], 0, 1)))
        for it in range(n):
            s = it % KSTAGES
            ph = (it & 1) if mut == 'parity_it' else (it // KSTAGES) & 1
            expect = it // KSTAGES + 1
            p.append(('wait', ('fk', s), ph, ([('K', s)], it, expect)))
            p.append(('rd0', [('Q',), ('K', s)], {('Q',): 0, ('K', s): it}))
            p.append(('rd1', [('Q',), ('K', s)], {('Q',): 0, ('K', s): it}))
            v_bar = ('fk', s) if mut == 'vbar_k' else ('fv', s)
            p.append(('wait', v_bar, ph, ([('K', s)] if mut == 'vbar_k' else [('V', s)], it, expect)))
            if it in zero_steps:
                p.append(('wr0', [('V', s)], {('V', s): it}))
                p.append(('wr1', [('V', s)], {('V', s): it}))
                p.append(('sync',))
            p.append(('rd0', [('V', s)], {('V', s): it}))
            p.append(('rd1', [('V', s)], {('V', s): it}))
            if it + KSTAGES < n:
                j = it + KSTAGES
                # named_barrier_sync(1 + wg, 128): the warpgroup is one unit here
                p.append(('count', s, wg, rule))
                p.append(('issue', dict(bar=('fk', s), bufs=[('K', s)], step=j, cond=True, refill_of=it)))
                p.append(('issue', dict(bar=('fv', s), bufs=[('V', s)], step=j, cond=True, refill_of=it)))
        p.append(('done',))
        progs.append(p)
    return progs


def bwd_programs(n, zero_kv, zero_steps, dq_by_keys, mut):
    nds = 1 if mut == 'one_ds' else 2
    progs = []
    for wg in range(2):
        p = [('sync',)]
        if wg == 0 and n > 0:
            p.append(('issue', dict(bar='kv', bufs=[('K',), ('V',)], step=0, cond=False)))
            for it in range(min(KSTAGES, n)):
                s = it % KSTAGES
                p.append(('issue', dict(bar=('f', s), bufs=[('Q', s), ('dO', s)], step=it, cond=False)))
        if n > 0:
            p.append(('wait', 'kv', 0, ([('K',), ('V',)], 0, 1)))
            if zero_kv:
                p.append(('wr0', [('K',), ('V',)], {('K',): 0, ('V',): 0}))
                p.append(('wr1', [('K',), ('V',)], {('K',): 0, ('V',): 0}))
                p.append(('sync',))
        for it in range(n):
            s, bb = it % KSTAGES, it % nds
            qb = [('Q', s), ('dO', s)]
            exp_q = {('Q', s): it, ('dO', s): it}
            p.append(('wait', ('f', s), (it // KSTAGES) & 1, (qb, it, it // KSTAGES + 1)))
            if it in zero_steps:
                p += [('wr0', qb, exp_q), ('wr1', qb, exp_q), ('sync',)]
            exp = {**exp_q, ('K',): 0, ('V',): 0}
            rd = qb + [('K',), ('V',)]
            p += [('rd0', rd, exp), ('rd1', rd, exp)]      # S^T, dV, dP^T, dK wgmma (wait<0> each)
            mine = ('dS', bb, wg)
            p += [('wr0', [mine], {mine: it}), ('wr1', [mine], {mine: it})]  # dS^T st.shared
            refill = ('issue', dict(bar=('f', s), bufs=qb, step=it + KSTAGES, cond=False, refill_of=it))
            if mut == 'refill_early' and wg == 0 and it + KSTAGES < n:
                p.append(refill)
            p.append(('sync',))  # fence.proxy.async; __syncthreads
            if mut != 'refill_early' and wg == 0 and it + KSTAGES < n:
                p.append(refill)
            dsb = [mine] if dq_by_keys else [('dS', bb, 0), ('dS', bb, 1)]
            e2 = {**{x: it for x in dsb}, ('K',): 0}
            p += [('rd0', dsb + [('K',)], e2), ('rd1', dsb + [('K',)], e2)]  # dQ wgmma, wait<0>
        p.append(('done',))
        progs.append(p)
    return progs


def fwd_configs(n, mut):
    if n == 0:
        variants = [('zero {}', set())]
    else:
        variants = [('zero {}', set()), ('zero {0}', {0})] + [(f'zero {{{k}}}', {k}) for k in range(1, n)]
        if n > 1:
            variants.append(('zero all', set(range(n))))
    bars = ['q'] + [(x, s) for s in range(KSTAGES) for x in ('fk', 'fv')]
    return [(name, Machine(fwd_programs(n, zs, mut), bars, range(KSTAGES))) for name, zs in variants]


def bwd_configs(n, mut):
    out = []
    bars = ['kv'] + [('f', s) for s in range(KSTAGES)]
    for dq in (True, False):
        for zkv in (False, True):
            zs = [set(), {n - 1}] if n > 0 else [set()]  # query tile past query_lengths: the last (and all)
            if n > 2:
                zs.append(set(range(n)))
            for z in zs:
                name = f'dq_by_keys={int(dq)} zero_kv={int(zkv)} zero_q={sorted(z)}'
                out.append((name, Machine(bwd_programs(n, zkv, z, dq, mut), bars, [])))
    return out


def main(argv):
    muts, flags = harness.parse_args(argv, MUTATIONS, USAGE, unit='configuration', flags=('--quick',),
                                     max_mutations=1)
    mut = next(iter(muts), '')
    max_n = QUICK_N if '--quick' in flags else FULL_N
    kinds = []
    if mut not in BWD_MUTATIONS:
        kinds.append(('fwd', fwd_configs))
    if mut not in FWD_MUTATIONS:
        kinds.append(('bwd', bwd_configs))
    failures = limits = 0
    for kind, configs in kinds:
        for n in range(max_n + 1):
            for name, machine in configs(n, mut):
                r = machine.explore()
                tag = 'PASS' if r['ok'] else ('FAIL' if r['ok'] is False else 'LIMIT')
                print(f'{kind} n={n} {name}: {tag} states={r["states"]}' + ('' if r['ok'] else f'  {r["error"]}'),
                      flush=True)
                if r['ok'] is False:
                    failures += 1
                    if failures <= 2:
                        print(machine.fmt_trace(r['trace']))
                elif r['ok'] is None:
                    limits += 1
    print(f'mutation={mut or "none"} max_n={max_n} failures={failures}' + (f' state_limit={limits}' if limits else '')
          + (f' detected={"yes" if failures else "NO"}' if mut else ''))
    return 1 if limits and not muts else harness.exit_code(failures, muts)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
