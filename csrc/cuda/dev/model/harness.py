# Command line and verdict shared by emulate_fwd.py, emulate_bwd.py and ring_check.py:
# planted-bug ("mutation") names from argv, the error measure, and the exit code
# (0 = as expected: no failure for the kernels as written, at least one failure, i.e.
# the planted bug detected, when a mutation is given).
import sys

import numpy as np


EXIT_RULE = """  Exit 0: no {unit} fails. With MUTATION (planted bugs, below): exit 0 only if at least one
  {unit} fails, i.e. the planted bug is detected; 1 otherwise. Exit 2: bad arguments."""


def parse_args(argv, mutations, usage, unit='case', flags=(), max_mutations=None):
    """(set of mutation names, set of flags given) from argv; prints usage and exits on -h or a bad name."""
    names = [a for a in argv if not a.startswith('-')]
    given = {a for a in argv if a.startswith('-')}
    bad = [n for n in names if n not in mutations] + sorted(given - set(flags) - {'-h', '--help'})
    too_many = max_mutations is not None and len(names) > max_mutations
    if bad or too_many or given & {'-h', '--help'}:
        print(usage.strip())
        print(EXIT_RULE.format(unit=unit))
        print('mutations (planted bugs):')
        for name, what in mutations.items():
            print(f'  {name:14s} {what}')
        if bad:
            print(f'unknown: {" ".join(bad)}')
        sys.exit(0 if not bad and not too_many else 2)
    return set(names), given


def exit_code(failures, mutations):
    """0 when the result is the expected one: no failure, or (with a mutation) at least one."""
    if mutations:
        return 0 if failures > 0 else 1
    return 1 if failures > 0 else 0


def max_abs_err(got, ref):
    """Largest |got - ref|, equal values (infinities included) 0, a NaN anywhere inf."""
    if got.size == 0:
        return 0.0
    with np.errstate(invalid='ignore'):
        err = np.where(got == ref, 0.0, np.abs(got - ref))
    return float(np.where(np.isnan(err), np.inf, err).max())


def case_params(case):
    """(D, B, Hq, Hkv, L, S, E, Ev) and (window_left, window_right, key_lengths, query_lengths) of a case."""
    shape = tuple(case[x] for x in ('D', 'B', 'Hq', 'Hkv', 'L', 'S', 'E', 'Ev'))
    return shape, (case.get('wl', -1), case.get('wr', -1), case.get('kl'), case.get('ql'))


def describe(case):
    (D, B, Hq, Hkv, L, S, E, Ev), (wl, wr, kl, ql) = case_params(case)
    return (f"D={D} B={B} Hq={Hq}:{Hkv} L={L} S={S} E={E} Ev={Ev} win=({wl},{wr}) kl={kl} ql={ql} "
            f"mask={case.get('mask')} nan={case.get('nan', False)}")


def poison_past(lengths, *tensors):
    """NaN in rows lengths[b]: of each (batch, head, rows, cols) tensor: garbage the kernel must not read."""
    if lengths is None:
        return
    for b, n in enumerate(lengths):
        for t in tensors:
            t[b, :, n:] = np.nan


def summary(mutations, n_cases, failures, worst):
    """Prints the summary line; returns the exit code."""
    print(f"mutations={sorted(mutations)} cases={n_cases} failed={failures} worst={worst:.2e}"
          + (f" detected={'yes' if failures else 'NO'}" if mutations else ''))
    return exit_code(failures, mutations)
