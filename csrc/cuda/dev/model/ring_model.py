# Interleaving semantics for ring_check.py: two warpgroups, each running a small program
# (one step per instruction; a warpgroup is one unit, its wgmma warpgroup-collective),
# plus one asynchronous event per in-flight TMA box (lands its bytes, then complete_tx on
# its mbarrier), explored breadth-first over every interleaving with the checks below.
# mbarrier model (PTX ISA): a phase completes when the pending arrival count and the
# tx-count are both 0; the phase index then advances and the pending count resets to
# the init count. try_wait.parity(P) succeeds iff the current phase's parity != P.
# Checked at every reachable state (a failure raises Fail with a message):
#   (a) no deadlock; no TMA in flight when both warpgroups are done
#   (b) no write (TMA landing, zero_rows, dS^T store) into a buffer a warpgroup is reading;
#       a refill for step j only after both warpgroups finished reading step j - kStages
#   (c) a parity wait returns only with all boxes of exactly the intended step landed and
#       the barrier at exactly the intended phase index
#   (d) the block-wide __syncthreads never deadlocks
#   and no arrival on a barrier whose current phase has no pending arrival left.
# Instructions (tuples), per warpgroup:
#   ('issue', load)               expect_tx + TMA of load = dict(bar, bufs, step, cond[, refill_of]);
#                                 with cond, only if this warpgroup's refill flag is set
#   ('wait', bar, parity, expect) parity wait; expect = (buffers, step, phase index) for (c)
#   ('rd0'|'rd1', bufs, steps)    start / end of a wgmma read of bufs holding steps {buf: step}
#   ('wr0'|'wr1', bufs, steps)    start / end of generic-proxy writes (zero_rows, dS^T stores)
#   ('sync',)                     __syncthreads (barrier 0, both warpgroups)
#   ('count', s, wg, rule)        atomic add on released[s]; flag = rule(old value, wg)
#   ('done',)
# States are immutable tuples (hashable as they are); a buffer is a tuple such as ('K', s).
from collections import deque, namedtuple

KSTAGES = 2
PANELS = 2          # boxes per tile (D = 128); each box lands separately
BOX = 16384         # bytes of one box
TMA_BUFS = ('Q', 'K', 'V', 'dO')

# pc, flag (refill), synced (__syncthreads generation; odd: arrived, waiting): per warpgroup.
# bars: (phase index, pending arrivals, tx count, init count) per mbarrier; cnt: release counters;
# content: the step each (buffer, panel) holds, None before any; tma: boxes in flight
# (bar, buffer, panel, step); reading / writing: buffers per warpgroup; last_read: per warpgroup,
# frozenset of (buffer, last step whose read ended).
State = namedtuple('State', 'pc flag synced bars cnt content tma reading writing last_read')


class Fail(Exception):
    pass


def put(t, i, v):
    return t[:i] + (v,) + t[i + 1:]


def bar_settle(b):
    phase, pending, tx, init = b
    return (phase + 1, init, 0, init) if pending == 0 and tx == 0 else b


def bar_arrive_expect_tx(b, nbytes, what):
    if b[1] <= 0:
        raise Fail(f'arrival on a barrier with no pending arrival left ({what})')
    return bar_settle((b[0], b[1] - 1, b[2] + nbytes, b[3]))


def bar_complete_tx(b, nbytes):
    return bar_settle((b[0], b[1], b[2] - nbytes, b[3]))


def bar_test_parity(b, parity):
    return (b[0] & 1) != parity


def panels(buf):
    return range(PANELS if buf[0] in TMA_BUFS else 1)


class Machine:
    """Two warpgroup programs, their single-arrival mbarriers and release counters."""

    def __init__(self, progs, bars, counters):
        self.progs = progs
        self.bar_names = list(bars)
        self.bar_ix = {b: i for i, b in enumerate(self.bar_names)}
        self.cnt_ix = {c: i for i, c in enumerate(counters)}
        bufs = set()
        for p in progs:
            for ins in p:
                if ins[0] == 'issue':
                    bufs.update(ins[1]['bufs'])
                elif ins[0] == 'wait':
                    bufs.update(ins[3][0])
                elif ins[0] in ('rd0', 'rd1', 'wr0', 'wr1'):
                    bufs.update(ins[1])
        slots = sorted(((bf, pn) for bf in bufs for pn in panels(bf)), key=repr)
        self.slot = {s: i for i, s in enumerate(slots)}
        self._order = {}

    def initial(self):
        return State(pc=(0, 0), flag=(False, False), synced=(0, 0), bars=((0, 1, 0, 1),) * len(self.bar_names),
                     cnt=(0,) * len(self.cnt_ix), content=(None,) * len(self.slot), tma=frozenset(),
                     reading=((), ()), writing=((), ()), last_read=(frozenset(), frozenset()))

    def holds(self, st, buf, pn):
        return st.content[self.slot[(buf, pn)]]

    def bar(self, st, name):
        return st.bars[self.bar_ix[name]]

    def with_bar(self, st, name, value):
        return st._replace(bars=put(st.bars, self.bar_ix[name], value))

    def box_order(self, box):  # a fixed order of simultaneous landings
        key = self._order.get(box)
        if key is None:
            key = self._order[box] = repr(box)
        return key

    def enabled(self, st):
        """The enabled transitions, in a fixed order: (label, argument)."""
        ev = []
        for w in range(2):
            ins = self.progs[w][st.pc[w]]
            op = ins[0]
            if op == 'done':
                continue
            if op == 'wait' and not bar_test_parity(self.bar(st, ins[1]), ins[2]):
                continue
            if op == 'sync' and st.synced[w] % 2 == 1 and st.synced[1 - w] < st.synced[w]:
                continue  # arrived, waiting for the other warpgroup
            ev.append((('wg', w, st.pc[w], op), w))
        for box in sorted(st.tma, key=self.box_order):
            ev.append((('tma',) + box, box))
        return ev

    def step(self, st, label, arg):
        """The state after one transition; raises Fail on a violated check."""
        if label[0] == 'tma':
            return self.land_box(st, arg)
        w = arg
        ins = self.progs[w][st.pc[w]]
        op = ins[0]
        if op == 'sync':
            st = st._replace(synced=put(st.synced, w, st.synced[w] + 1))
            if st.synced[w] % 2 == 1:
                return st              # arrive; released by a later step (enabled() checks the other)
        elif op == 'issue':
            st = self.issue(st, w, ins[1])
        elif op == 'wait':
            self.check_wait(st, w, ins)
        elif op in ('rd0', 'rd1', 'wr0', 'wr1'):
            st = self.access(st, w, op, ins[1], ins[2])
        elif op == 'count':
            i = self.cnt_ix[ins[1]]
            old = st.cnt[i]
            st = st._replace(cnt=put(st.cnt, i, old + 1), flag=put(st.flag, w, ins[3](old, w)))
        return st._replace(pc=put(st.pc, w, st.pc[w] + 1))

    def land_box(self, st, box):
        bar, buf, pn, stepno = box
        for w in range(2):
            if buf in st.reading[w]:
                raise Fail(f'TMA box {buf} panel {pn} (step {stepno}) lands while WG {w} reads it')
            if buf in st.writing[w]:
                raise Fail(f'TMA box {buf} lands while WG {w} writes it')
        b, i = self.bar_ix[bar], self.slot[(buf, pn)]  # the hot path: one new State
        return State(st.pc, st.flag, st.synced, put(st.bars, b, bar_complete_tx(st.bars[b], BOX)), st.cnt,
                     put(st.content, i, stepno), st.tma - {box}, st.reading, st.writing, st.last_read)

    def issue(self, st, w, ld):
        if ld['cond'] and not st.flag[w]:
            return st
        j = ld['step']
        if 'refill_of' in ld:
            for x in range(2):
                last = dict(st.last_read[x])
                for bf in ld['bufs']:
                    if last.get(bf, -1) < j - KSTAGES:
                        raise Fail(f'refill of {bf} for step {j} issued before WG {x} finished reading step '
                                   f'{j - KSTAGES}')
        nbytes = BOX * PANELS * len(ld['bufs'])
        st = self.with_bar(st, ld['bar'], bar_arrive_expect_tx(self.bar(st, ld['bar']), nbytes, ld['bar']))
        return st._replace(tma=st.tma | {(ld['bar'], b, pn, j) for b in ld['bufs'] for pn in range(PANELS)})

    def check_wait(self, st, w, ins):
        bufs, stepno, phase_idx = ins[3]
        for bf in bufs:
            for pn in range(PANELS):
                if self.holds(st, bf, pn) != stepno:
                    raise Fail(f'WG {w} wait on {ins[1]} parity {ins[2]} for step {stepno} returned with {bf} '
                               f'panel {pn} holding step {self.holds(st, bf, pn)}')
                if any(t[1] == bf for t in st.tma):
                    raise Fail(f'WG {w} wait for step {stepno} returned with a TMA into {bf} still in flight')
        if self.bar(st, ins[1])[0] != phase_idx:
            raise Fail(f'WG {w} wait on {ins[1]} returned at phase index {self.bar(st, ins[1])[0]}, '
                       f'intended {phase_idx}')

    def access(self, st, w, op, bufs, exp):
        for bf in bufs:
            for pn in panels(bf):
                c = self.holds(st, bf, pn)
                if op[0] == 'r' and c != exp[bf]:
                    raise Fail(f'WG {w} {op} of {bf} panel {pn} for step {exp[bf]} sees step {c}')
                if op[0] == 'w' and bf[0] in TMA_BUFS and c != exp[bf]:
                    raise Fail(f'WG {w} zero_rows of {bf} for step {exp[bf]} while it holds step {c}')
            if any(t[1] == bf for t in st.tma):
                raise Fail(f'WG {w} {op} of {bf} (step {exp[bf]}) while a TMA into it is in flight')
            if op[0] == 'w' and bf in st.reading[1 - w]:
                raise Fail(f'WG {w} writes {bf} (step {exp[bf]}) while WG {1 - w} reads it')
        if op == 'rd0':
            return st._replace(reading=put(st.reading, w, tuple(bufs)))
        if op == 'rd1':
            last = dict(st.last_read[w])
            for bf in bufs:
                last[bf] = max(last.get(bf, -1), exp[bf])
            return st._replace(reading=put(st.reading, w, ()), last_read=put(st.last_read, w, frozenset(last.items())))
        if op == 'wr0':
            content = st.content
            for bf in bufs:
                if bf[0] == 'dS':
                    content = put(content, self.slot[(bf, 0)], exp[bf])
            return st._replace(writing=put(st.writing, w, tuple(bufs)), content=content)
        return st._replace(writing=put(st.writing, w, ()))

    def explore(self, limit=5_000_000):
        """Breadth-first search over all interleavings: dict(ok, states, error, trace)."""
        st0 = self.initial()
        parent = {st0: None}  # state -> (previous state, label): the seen set, and the traces
        q = deque([st0])
        n_states = n_trans = 0
        while q:
            st = q.popleft()
            n_states += 1
            moved = False
            for label, arg in self.enabled(st):
                try:
                    nst = self.step(st, label, arg)
                except Fail as e:
                    return dict(ok=False, states=n_states, error=str(e), trace=self.trace(parent, st) + (label,))
                moved = True
                n_trans += 1
                if nst in parent:
                    continue
                parent[nst] = (st, label)
                if len(parent) > limit:
                    return dict(ok=None, states=n_states, error='state limit')
                q.append(nst)
            done = all(self.progs[w][st.pc[w]][0] == 'done' for w in range(2))
            if done and st.tma:
                return dict(ok=False, states=n_states, error='CTA exits with TMA boxes in flight',
                            trace=self.trace(parent, st))
            if not moved and not done:
                where = [self.progs[w][st.pc[w]] for w in range(2)]
                return dict(ok=False, states=n_states, trace=self.trace(parent, st),
                            error=f'deadlock: WG0 at {where[0][:3]}, WG1 at {where[1][:3]}')
        return dict(ok=True, states=n_states, transitions=n_trans)

    @staticmethod
    def trace(parent, st):
        labels = []
        while parent[st] is not None:
            st, label = parent[st]
            labels.append(label)
        return tuple(reversed(labels))

    def fmt_trace(self, trace, last=14):
        out = []
        for lab in trace[-last:]:
            if lab[0] == 'wg':
                ins = self.progs[lab[1]][lab[2]]
                if ins[0] == 'issue':
                    d = dict((k, v) for k, v in ins[1].items() if k in ('bufs', 'step'))
                elif ins[0] == 'wait':
                    d = f'{ins[1]} parity={ins[2]} (step {ins[3][1]})'
                elif ins[0] == 'count':
                    d = ins[1:3]
                elif len(ins) > 2 and isinstance(ins[2], dict):
                    d = ins[2]
                else:
                    d = ins[1:] if len(ins) > 1 else ''
                out.append(f'WG{lab[1]} {ins[0]} {d}')
            else:
                out.append(f'TMA lands {lab[2]} panel {lab[3]} step {lab[4]}')
        return ('  ... ' if len(trace) > last else '  ') + '\n  '.join(out)
