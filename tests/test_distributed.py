"""effattn.distributed: context-parallel attention over a sequence sharded across processes.

Single-process checks first: the per-block mask rule against effattn.attention on the whole
sequence (every rank and block emulated in one process), the explicit backward's formulas by
gradcheck, the layouts' errors. Then the real thing on the CPU with gloo: 2 and 4 processes
(torch.multiprocessing, spawn), each spawn running a list of cases; rank 0 compares the
unsharded outputs and q/k/v gradients with the float64 oracle and single-process effattn on the
whole sequence under the suite's tolerance rule (conftest.assert_bound); every rank checks its
traffic (P - 1 K/V blocks in the forward, P - 1 K/V and P - 1 dK/dV blocks in the backward,
counted by wrapping torch.distributed.batch_isend_irecv, and the module's own counters) and the
largest allocation (profiler). ``spawn_ranks`` bounds every run in time, destroys the process
groups, and fails with every rank's traceback; it never leaves CI hanging.
"""
from __future__ import annotations

import datetime
import os
import queue as queue_mod
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import effattn
import effattn.distributed as D
from torch.distributed.tensor.debug import CommDebugMode
from effattn import reference
from conftest import assert_bound, largest_allocation

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available in this torch build")


# ---------------------------------------------------------------------------
# Whole sequences and their shards (in one process)
# ---------------------------------------------------------------------------

def local(x, P, r, layout, dim=-2):
    """Rank r's shard of x, without a process group (the same slices as D.shard)."""
    parts = [x.narrow(dim, a, b - a) for a, b in D.shard_ranges(x.shape[dim], P, r, layout)]
    return torch.cat(parts, dim)


def make_inputs(B, Hq, Hkv, L, S, E, Ev, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev), (B, Hq, L, Ev), (B, Hq, L)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def emulated_forward(q, k, v, P, layout, is_causal=False, window=None, enable_gqa=False):
    """Every rank's merged out and lse, computed with D's per-block rule in one process, and the
    visible (query, key) pairs the rule counted."""
    band = D._band(is_causal, window, "test")
    outs, lses, total = [], [], 0
    for r in range(P):
        qr = local(q, P, r, layout)
        q_segs = D._local_segments(qr.shape[-2], P, r, layout)
        acc_o = torch.zeros((*qr.shape[:-1], v.shape[-1]), dtype=torch.float64)
        acc_l = torch.full(qr.shape[:-1], float("-inf"), dtype=torch.float64)
        for s in range(P):
            ks, vs = local(k, P, s, layout), local(v, P, s, layout)
            calls, pairs = D._block_calls(q_segs, D._local_segments(ks.shape[-2], P, s, layout), band)
            D._block_forward(qr, ks, vs, calls, None, enable_gqa, acc_o, acc_l)
            total += pairs
        outs.append(acc_o)
        lses.append(acc_l)
    return outs, lses, total


def global_order(parts, n, P, layout, dim=-2):
    """Per-rank shards -> the whole tensor along dim."""
    idx = torch.cat([torch.arange(a, b) for r in range(P) for a, b in D.shard_ranges(n, P, r, layout)])
    whole = torch.cat(parts, dim)
    out = torch.empty_like(whole)
    out.index_copy_(dim % whole.dim(), idx, whole)
    return out


WINDOWS = [None, (0, 0), (3, 5), (5, 3), (None, 2), (2, None), (7, 0), (0, 9), (1, 1), (13, None),
           (None, 13), (30, 30)]


@pytest.mark.parametrize("layout", D.LAYOUTS)
@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_block_rule_matches_the_whole_sequence(P, layout):
    """Per block, the global causal/window mask becomes slices plus a local window; merged by LSE,
    every rank's rows equal effattn.attention on the whole sequence (float64, to rounding)."""
    per = 2 if layout == "zigzag" else 1
    for L, S in ((per * P * 5, per * P * 5), (per * P * 3, per * P * 7), (per * P * 6, per * P * 2)):
        q, k, v, _, _ = make_inputs(1, 2, 2, L, S, 4, 3, torch.float64, seed=L + S)
        for is_causal in (False, True):
            for window in WINDOWS:
                outs, lses, pairs = emulated_forward(q, k, v, P, layout, is_causal, window)
                want, want_lse = effattn.attention(q, k, v, is_causal=is_causal, window=window, return_lse=True)
                got, got_lse = global_order(outs, L, P, layout), global_order(lses, L, P, layout, dim=-1)
                what = f"L={L} S={S} causal={is_causal} window={window}"
                assert torch.equal(torch.isinf(got_lse), torch.isinf(want_lse)), what
                assert (got - want).abs().max() < 1e-12, what
                fin = torch.isfinite(want_lse)
                assert (got_lse[fin] - want_lse[fin]).abs().max() < 1e-12, what
                i, j = torch.arange(L).view(-1, 1), torch.arange(S).view(1, -1)  # pairs the mask lets through
                lo, hi = D._band(is_causal, window, "test")
                assert pairs == int(((j - i >= lo) & (j - i <= hi)).sum()), what


def test_zigzag_balances_causal_work():
    """Under is_causal, zigzag gives every rank the same number of visible (query, key) pairs;
    contiguous gives rank r r+1 blocks and skips the others."""
    P, n = 4, 6
    band = D._band(True, None, "test")
    for layout in D.LAYOUTS:
        per_rank, computed = [], []
        for r in range(P):
            q_segs = D._local_segments(n, P, r, layout)
            total, blocks = 0, 0
            for s in range(P):
                calls, pairs = D._block_calls(q_segs, D._local_segments(n, P, s, layout), band)
                total, blocks = total + pairs, blocks + bool(calls)
            per_rank.append(total)
            computed.append(blocks)
        L = n * P
        assert sum(per_rank) == L * (L + 1) // 2
        if layout == "zigzag":
            assert len(set(per_rank)) == 1 and computed == [P] * P, per_rank
        else:
            assert computed == [1, 2, 3, 4] and per_rank[0] < per_rank[-1]


def test_calls_per_block():
    """Unmasked blocks are one effattn call whatever the layout; under causal zigzag the diagonal
    block is three (two causal chunks and the full one between them), every other block one."""
    P, n = 4, 6
    for layout in D.LAYOUTS:
        for r in range(P):
            for s in range(P):
                segs_q, segs_k = D._local_segments(n, P, r, layout), D._local_segments(n, P, s, layout)
                calls, pairs = D._block_calls(segs_q, segs_k, D._band(False, None, "test"))
                assert calls == [(0, n, 0, n, None, False)] and pairs == n * n
    c = n // 2
    for r in range(P):
        for s in range(P):
            calls, _ = D._block_calls(D._local_segments(n, P, r, "zigzag"), D._local_segments(n, P, s, "zigzag"),
                                      D._band(True, None, "test"))
            if s == r:
                assert sorted(calls) == [(0, c, 0, c, None, True), (c, n, 0, c, None, False),
                                         (c, n, c, n, None, True)], calls
            elif s < r:  # both query chunks see the block's first chunk, neither its second
                assert calls == [(0, n, 0, c, None, False)], calls
            else:  # only the second query chunk sees the block, all of it
                assert calls == [(c, n, 0, n, None, False)], calls


class _Emulated(torch.autograd.Function):
    """Every rank's forward and explicit backward (D._block_forward / D._block_backward), in one
    process: the ring's arithmetic without its transport, for gradcheck."""

    @staticmethod
    def forward(ctx, q, k, v, P, layout, is_causal, window):
        outs, lses, _ = emulated_forward(q, k, v, P, layout, is_causal, window)
        ctx.save_for_backward(q, k, v, *outs, *lses)
        ctx.args = (P, layout, is_causal, window)
        L = q.shape[-2]
        return global_order(outs, L, P, layout), global_order(lses, L, P, layout, dim=-1)

    @staticmethod
    def backward(ctx, gout, glse):
        P, layout, is_causal, window = ctx.args
        q, k, v = ctx.saved_tensors[:3]
        outs, lses = ctx.saved_tensors[3:3 + P], ctx.saved_tensors[3 + P:]
        band = D._band(is_causal, window, "test")
        dq = [torch.zeros_like(local(q, P, r, layout)) for r in range(P)]
        dk = [torch.zeros_like(local(k, P, r, layout)) for r in range(P)]
        dv = [torch.zeros_like(local(v, P, r, layout)) for r in range(P)]
        for r in range(P):
            qr, gout_r = local(q, P, r, layout), local(gout, P, r, layout)
            q_segs = D._local_segments(qr.shape[-2], P, r, layout)
            delta = D._backward_delta(gout_r, outs[r], local(glse, P, r, layout, dim=-1))
            for s in range(P):
                ks, vs = local(k, P, s, layout), local(v, P, s, layout)
                calls, _ = D._block_calls(q_segs, D._local_segments(ks.shape[-2], P, s, layout), band)
                g = D._block_backward(qr, ks, vs, calls, None, False, gout_r, delta, lses[r], True)
                if g is not None:
                    dq[r] += g[0]
                    dk[s] += g[1]
                    dv[s] += g[2]
        L, S = q.shape[-2], k.shape[-2]
        return (global_order(dq, L, P, layout), global_order(dk, S, P, layout), global_order(dv, S, P, layout),
                None, None, None, None)


@pytest.mark.parametrize("layout,is_causal,window", [("zigzag", True, None), ("contiguous", True, (3, None)),
                                                     ("zigzag", False, (2, 1))])
def test_explicit_backward_gradcheck(layout, is_causal, window):
    """The merge's derivatives (d o_b = w_b d out, d lse_b = w_b (d out . (o_b - out) + d lse)),
    through out and lse both, against finite differences in float64."""
    P = 2
    q, k, v, _, _ = make_inputs(1, 1, 1, 8, 8, 3, 2, torch.float64, seed=3)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    torch.autograd.gradcheck(lambda q, k, v: _Emulated.apply(q, k, v, P, layout, is_causal, window), inputs)
    # and the same function's gradients agree with effattn's on the whole sequence
    gout, glse = torch.randn(1, 1, 8, 2, dtype=torch.float64), torch.randn(1, 1, 8, dtype=torch.float64)
    out, lse = _Emulated.apply(*inputs, P, layout, is_causal, window)
    got = torch.autograd.grad((out * gout).sum() + (lse * glse).sum(), inputs)
    out, lse = effattn.attention(*inputs, is_causal=is_causal, window=window, return_lse=True)
    want = torch.autograd.grad((out * gout).sum() + (lse * glse).sum(), inputs)
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-12


def test_shard_ranges_and_their_errors():
    assert D.shard_ranges(16, 4, 1, "zigzag") == [(2, 4), (12, 14)]
    assert D.shard_ranges(16, 4, 1, "contiguous") == [(4, 8)]
    with pytest.raises(ValueError, match=r"length = 20 .*world size 3 with layout 'zigzag'.*multiple of 2 x 3 = 6"):
        D.shard_ranges(20, 3, 0, "zigzag")
    with pytest.raises(ValueError, match=r"length = 10 .*world size 4 with layout 'contiguous'.*1 x 4 = 4"):
        D.shard_ranges(10, 4, 0, "contiguous")
    with pytest.raises(ValueError, match="layout must be one of 'zigzag', 'contiguous', got 'ring'"):
        D.shard_ranges(16, 4, 0, "ring")


def test_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        D.ring_attention(q, q, q)


# ---------------------------------------------------------------------------
# Spawning ranks: bounded in time, every rank's traceback on failure
# ---------------------------------------------------------------------------

def _rank_entry(fn, rank, P, store_path, results, args):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one host: loopback, whatever the hostname resolves to
    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, P)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=P,
                                timeout=datetime.timedelta(seconds=60))
        results.put((rank, "ok", fn(rank, P, *args)))
    except BaseException:  # noqa: BLE001  (reported to the parent, which fails the test)
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_ranks(fn, P, *args, timeout=240, grace=5):
    """Runs fn(rank, P, *args) in P spawned processes joined by a gloo process group (a FileStore
    in a fresh temporary directory) and returns their results by rank. Fails the test with every
    rank's traceback if any rank raises, and with the ranks that did not report if the whole run
    passes ``timeout`` seconds (after one rank fails, the others get ``grace`` seconds: they may
    be blocked in a collective the failed rank will never join); survivors are killed."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank_entry, args=(fn, r, P, os.path.join(tmp, "store"), results, args),
                             daemon=True) for r in range(P)]
        for p in procs:
            p.start()
        reports, deadline = {}, time.monotonic() + timeout
        while len(reports) < P and time.monotonic() < deadline:
            try:
                rank, status, payload = results.get(timeout=0.5)
                reports[rank] = (status, payload)
                if status == "error":
                    deadline = min(deadline, time.monotonic() + grace)
            except queue_mod.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break  # died without a report (e.g. a segfault)
        for p in procs:
            p.join(timeout=max(0.1, min(10, deadline - time.monotonic())))
        killed = []
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
                killed.append(r)
    if len(reports) == P and all(s == "ok" for s, _ in reports.values()):
        return [reports[r][1] for r in range(P)]
    lines = [f"{getattr(fn, '__name__', fn)} on {P} ranks failed:"]
    for r in range(P):
        if r in reports:
            status, payload = reports[r]
            lines.append(f"--- rank {r}: {status}" + (f"\n{payload}" if status == "error" else ""))
        else:
            code = procs[r].exitcode
            lines.append(f"--- rank {r}: no report ("
                         + ("killed: still running at the time limit" if r in killed else f"exit code {code}") + ")")
    pytest.fail("\n".join(lines), pytrace=False)


def _fails_on_rank_1(rank, P):
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    dist.barrier()  # blocked: rank 1 never arrives
    return "unreachable"


def _sleeps(rank, P):
    time.sleep(600)


def test_a_failing_rank_fails_the_test_with_its_traceback():
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as info:
        spawn_ranks(_fails_on_rank_1, 2, timeout=120, grace=3)
    msg = str(info.value)
    assert "rank 1 fails on purpose" in msg and "Traceback" in msg, msg
    # rank 0, blocked in a barrier, either sees its peer go (gloo: connection reset) or is killed
    assert "--- rank 0: error" in msg or "--- rank 0: no report (killed" in msg, msg
    assert time.monotonic() - t0 < 100  # bounded by the grace period, not the gloo timeout


def test_a_hung_run_is_killed_at_its_time_limit():
    with pytest.raises(pytest.fail.Exception) as info:
        spawn_ranks(_sleeps, 1, timeout=10)
    assert "rank 0: no report (killed: still running at the time limit)" in str(info.value)


# ---------------------------------------------------------------------------
# The distributed cases
# ---------------------------------------------------------------------------

def _count_p2p(calls):
    """Wraps dist.batch_isend_irecv to record (isends, irecvs) of every batch posted."""
    orig = dist.batch_isend_irecv

    def counting(ops):
        calls.append((sum(op.op is dist.isend for op in ops), sum(op.op is dist.irecv for op in ops)))
        return orig(ops)
    dist.batch_isend_irecv = counting
    return orig


def _check_case(rank, P, case):
    """One call of ring/allgather attention on shards of a whole sequence, forward and backward,
    against the whole sequence (on rank 0); returns this rank's traffic counts."""
    variant, layout, dtype = case["variant"], case["layout"], case["dtype"]
    kw = dict(is_causal=case.get("causal", False), window=case.get("window"),
              enable_gqa=case.get("Hkv", 2) != 4)
    B, Hq, Hkv, L, S, E, Ev = 2, 4, case.get("Hkv", 2), case["L"], case.get("S", case["L"]), 8, 6
    use_lse = case.get("lse", False)
    group = case.get("group")
    if group is not None:  # a subgroup of the world: its ranks, and whether this rank is in it
        sub = dist.new_group(group)  # (every rank of the world takes part in making it)
        if rank not in group:
            return None
        P, rank, group = dist.get_world_size(sub), dist.get_rank(sub), sub
    q, k, v, gout, glse = make_inputs(B, Hq, Hkv, L, S, E, Ev, dtype, seed=case.get("seed", 0))
    shards = [D.shard(t, group=group, layout=layout).detach().requires_grad_() for t in (q, k, v)]
    fn = D.ring_attention if variant == "ring" else D.allgather_attention
    p2p = []
    D.reset_traffic()
    orig = _count_p2p(p2p)
    cdm_fwd, cdm_bwd = CommDebugMode(), CommDebugMode()  # collectives (it does not see P2P ops)
    try:
        with cdm_fwd:
            out, lse = fn(*shards, group=group, layout=layout, return_lse=True, **kw)
        fwd, fwd_p2p = D.traffic(), list(p2p)
        loss = (out.double() * D.shard(gout, group=group, layout=layout).double()).sum()
        if use_lse:
            loss = loss + (lse.masked_fill(torch.isinf(lse), 0).double()
                           * D.shard(glse, dim=-1, group=group, layout=layout).double()).sum()
        with cdm_bwd:
            loss.backward()
    finally:
        dist.batch_isend_irecv = orig
    bwd = {n: c - fwd.get(n, 0) for n, c in D.traffic().items()}
    bwd_p2p = p2p[len(fwd_p2p):]
    if variant == "ring" and P > 1:
        assert fwd["forward_kv"] == P - 1 and "backward_kv" not in fwd, fwd
        assert sum(s for s, _ in fwd_p2p) == 2 * (P - 1) and sum(r for _, r in fwd_p2p) == 2 * (P - 1)
        assert bwd["backward_kv"] == P - 1 and bwd["backward_dkv"] == P - 1, bwd
        assert sum(s for s, _ in bwd_p2p) == 4 * (P - 1) and sum(r for _, r in bwd_p2p) == 4 * (P - 1)
    elif variant == "ring":
        assert not p2p
    else:  # two all-gathers (K, V) forward, two reduce-scatters (dK, dV) backward, nothing else
        assert not p2p and fwd.get("allgather_kv", 0) == (2 if P > 1 else 0)
        assert bwd.get("reduce_scatter_dkv", 0) == (2 if P > 1 else 0)
        for cdm, name in ((cdm_fwd, "allgather"), (cdm_bwd, "reduce_scatter")):
            counts = {str(op): n for op, n in cdm.get_comm_counts().items()}
            assert cdm.get_total_counts() == (2 if P > 1 else 0) and all(name in op for op in counts), counts
    got = [D.unshard(t.detach(), group=group, layout=layout) for t in (out, shards[0].grad, shards[1].grad,
                                                                      shards[2].grad)]
    got_lse = D.unshard(lse.detach().unsqueeze(-1), group=group, layout=layout).squeeze(-1)
    if rank == 0:
        _compare(q, k, v, gout, glse if use_lse else None, got, got_lse, dtype, kw, case)
    return dict(fwd=fwd, bwd=bwd)


def _whole(q, k, v, gout, glse, kw, dtype=None, backend=None):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    if backend is None:
        out, lse = reference.attention(*leaves, return_lse=True, compute_dtype=dtype, **kw)
    else:
        out, lse = effattn.attention(*leaves, return_lse=True, backend=backend, **kw)
    loss = (out.double() * gout.double()).sum()
    if glse is not None:
        loss = loss + (lse.masked_fill(torch.isinf(lse), 0).double() * glse.double()).sum()
    return [out.detach(), *torch.autograd.grad(loss, leaves)], lse.detach()


def _compare(q, k, v, gout, glse, got, got_lse, dtype, kw, case):
    d64 = [t.double() for t in (q, k, v, gout)] + [glse.double() if glse is not None else None]
    oracle, oracle_lse = _whole(*d64, kw, dtype=torch.float64)
    same, _ = _whole(q, k, v, gout, glse, kw)  # the same-precision math (reference, input dtype)
    single, single_lse = _whole(*d64, kw, backend="cpu")  # single-process effattn, float64
    where = f"{case}"
    assert torch.equal(torch.isinf(got_lse), torch.isinf(oracle_lse)), where
    fin = torch.isfinite(oracle_lse)
    for name, g, o, s, e in zip(("out", "dq", "dk", "dv"), got, oracle, same, single):
        assert g.dtype == dtype and g.shape == o.shape, (name, g.dtype, g.shape, where)
        if dtype == torch.float64:  # strictly: the same arithmetic as the whole sequence's, merged
            scale = max(1.0, o.abs().max().item())
            assert (g - e).abs().max().item() <= 1e-10 * scale, (name, where)
            assert (g - o).abs().max().item() <= 1e-10 * scale, (name, where)
        else:
            assert_bound(name, g, s, o, dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert (got_lse[fin].double() - oracle_lse[fin]).abs().max() <= tol, where
    assert (single_lse[fin] - oracle_lse[fin]).abs().max() <= 1e-10


def _no_seq_by_seq_tensor(rank, P, L):
    """The largest allocation of a causal forward+backward, ring and all-gather, stays far below
    one (L/P, L) float32 matrix; and the same profiler does see such a matrix when one is made."""
    B, H, E = 1, 2, 8
    one = (L // P) * L * 4
    q, k, v, gout, _ = make_inputs(B, H, H, L, L, E, E, torch.float32, seed=5)
    q, k, v, gout = (D.shard(t) for t in (q, k, v, gout))
    sizes = {}
    for name, fn in (("ring", D.ring_attention), ("allgather", D.allgather_attention)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]

        def step():
            fn(*leaves, is_causal=True).backward(gout)
        step()  # warm-up
        sizes[name] = largest_allocation(step)
        assert sizes[name] < one // 8, (name, sizes[name], one)
    k_all, v_all = D.unshard(k), D.unshard(v)
    sizes["scores"] = largest_allocation(lambda: effattn.attention(q, k_all, v_all, backend="reference"))
    assert sizes["scores"] >= one
    return sizes


F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16


def _cases(P):
    n = 2 * P  # a multiple of both layouts' chunk counts
    L = 5 * n  # chunks of 5 (zigzag) or 10 (contiguous) rows
    cases = []
    for variant in ("ring", "allgather"):
        cases += [
            dict(variant=variant, layout="zigzag", causal=True, dtype=F64, L=L, lse=True),
            dict(variant=variant, layout="zigzag", causal=True, dtype=F32, L=L, Hkv=4),
            dict(variant=variant, layout="contiguous", causal=True, dtype=F32, L=L, Hkv=1, lse=True),
            dict(variant=variant, layout="zigzag", causal=False, dtype=F32, L=L),
            dict(variant=variant, layout="contiguous", causal=False, dtype=F64, L=L, S=3 * n, Hkv=4),
            dict(variant=variant, layout="zigzag", causal=True, dtype=F64, L=L, S=7 * n),
            dict(variant=variant, layout="zigzag", window=(3, 7), dtype=F64, L=L, lse=True),
            dict(variant=variant, layout="contiguous", causal=True, window=(6, None), dtype=F32, L=L),
        ]
    cases += [
        dict(variant="ring", layout="zigzag", window=(0, 0), dtype=F64, L=L, S=3 * n, lse=True),  # rows see nothing
        dict(variant="ring", layout="contiguous", window=(None, 2), dtype=F64, L=L),
        dict(variant="ring", layout="zigzag", causal=True, dtype=BF16, L=L),
        dict(variant="allgather", layout="zigzag", causal=True, dtype=F16, L=L, Hkv=1),
        dict(variant="ring", layout="contiguous", causal=False, dtype=F16, L=L, Hkv=1),
        dict(variant="allgather", layout="contiguous", causal=True, dtype=BF16, L=L),
    ]
    return cases


def _run_cases(rank, P, cases, profile_L=None):
    """Every case, the errors for lengths that do not split, and (profile_L) the allocation check:
    one spawn per world size (starting processes is what costs time on a shared 2-core machine)."""
    torch.manual_seed(0)
    results = [_check_case(rank, P, case) for case in cases]
    # a sequence that does not split: a clear error on every rank, before any communication
    x = torch.randn(1, 2 * P + 1, 3)
    for layout in D.LAYOUTS:
        try:
            D.shard(x, dim=1, layout=layout)
        except ValueError as exc:
            assert f"x.size(-2) = {2 * P + 1}" in str(exc) and f"world size {P}" in str(exc) \
                and repr(layout) in str(exc), str(exc)
        else:
            raise AssertionError(f"a length of {2 * P + 1} was split across {P} ranks")
    odd = torch.randn(1, 1, 3, 4)
    for fn in (D.ring_attention, D.allgather_attention):
        try:
            fn(odd, odd, odd)
        except ValueError as exc:
            assert "query.size(-2) = 3" in str(exc) and f"world size {P}" in str(exc) and "'zigzag'" in str(exc)
        else:
            raise AssertionError("an odd zigzag shard was accepted")
    return results, (_no_seq_by_seq_tensor(rank, P, profile_L) if profile_L else None)


@pytest.mark.parametrize("P", [2, 4])
def test_context_parallel_matches_the_whole_sequence(P):
    """Outputs, lse and q/k/v gradients of every case against the whole sequence; the traffic of
    each call; zigzag's balance; (P = 4) no (L/P, L) allocation on any rank."""
    cases = _cases(P)
    if P == 4:  # a ring on a subgroup whose ranks are not the world's (peers are translated)
        cases += [dict(variant="ring", layout="zigzag", causal=True, dtype=F64, L=20, group=[1, 3], lse=True),
                  dict(variant="allgather", layout="contiguous", causal=True, dtype=F64, L=20, group=[3, 0])]
    else:  # world size 1 (a group of one rank): no communication at all
        cases += [dict(variant="ring", layout="zigzag", causal=True, dtype=F64, L=10, group=[1], lse=True),
                  dict(variant="allgather", layout="zigzag", causal=True, dtype=F32, L=10, group=[0])]
    profile_L = 1024 if P == 4 else None
    reports = spawn_ranks(_run_cases, P, cases, profile_L)
    results = [r for r, _ in reports]
    if profile_L:
        sizes = [s for _, s in reports]
        assert all(s["ring"] < (profile_L // P) * profile_L * 4 // 8 for s in sizes), sizes
    for case, *per_rank in zip(cases, *results):
        if case["variant"] == "ring" and case.get("group") is None and case.get("causal") \
                and case.get("window") is None and case.get("S") is None:
            computed = [r["fwd"].get("blocks_computed", 0) for r in per_rank]
            pairs = [r["fwd"]["pairs"] for r in per_rank]
            if case["layout"] == "zigzag":  # the same work on every rank, no block skipped
                assert computed == [P] * P and len(set(pairs)) == 1, (case, computed, pairs)
            else:  # rank r computes r + 1 blocks and skips the rest
                assert computed == list(range(1, P + 1)), (case, computed)

