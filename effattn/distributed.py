"""Context parallelism: one attention over a sequence sharded across processes.

Each rank of a ``torch.distributed`` group (NCCL on GPUs, gloo on CPUs) holds its shard of the
sequence dim (-2) of q, k and v; the functions here return this rank's shard of the output of
``effattn.attention`` on the whole sequence, forward and backward, and never build a
(L / P, L) tensor. They use only the public ``effattn.attention(..., return_lse=True)``.

    import effattn.distributed as cp
    q, k, v = (cp.shard(t) for t in (q_full, k_full, v_full))   # this rank's chunks
    out = cp.ring_attention(q, k, v, is_causal=True)             # this rank's rows of the output
    out_full = cp.unshard(out)                                   # (differentiable) all-gather

* ``ring_attention``: K/V blocks travel around the ring (rank r sends to r + 1 and receives from
  r - 1) with ``torch.distributed.batch_isend_irecv``, the next block's transfer posted before the
  attention on the block in hand and waited for after it: P - 1 transfers per rank. Partials are
  merged by their log-sum-exp. The backward (explicit, recompute per block) sends the K/V blocks
  around again and the dK/dV of each block one step behind it, ending on the block's owner:
  P - 1 K/V and P - 1 dK/dV transfers per rank.
* ``allgather_attention``: all-gathers K/V once, attends locally, reduce-scatters dK/dV in the
  backward (through the differentiable ``unshard``). Good when K/V are small (GQA, few KV heads).

Layouts: ``"zigzag"`` (the default) cuts the sequence into 2P equal chunks and gives rank r chunks
r and 2P-1-r, so that under ``is_causal`` every rank does the same work; ``"contiguous"`` gives
rank r chunk r of P. Masks (``is_causal``, ``window``) are in global positions, as
``effattn.attention`` on the whole sequence means them (top-left aligned); a block that the mask
hides entirely is not computed (its K/V still travel: the ring's traffic is fixed).

``traffic()`` / ``reset_traffic()``: per-process counters of what was sent and computed
(transfers, P2P ops, bytes, computed and skipped blocks, (query, key) pairs, seconds waited).

Every rank of the group must make the same calls (and run their backward): the transfers and
collectives pair up across ranks.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .api import attention

__all__ = ["ring_attention", "allgather_attention", "shard", "unshard", "shard_ranges", "traffic",
           "reset_traffic", "LAYOUTS"]

LAYOUTS = ("zigzag", "contiguous")
_INF = math.inf

# ---------------------------------------------------------------------------
# Counters (read by the tests and the bench)
# ---------------------------------------------------------------------------

_TRAFFIC: Counter = Counter()


def traffic() -> dict:
    """What this process sent and computed since the last ``reset_traffic()``:
    ``forward_kv`` / ``backward_kv`` / ``backward_dkv``: block transfers sent by the ring;
    ``p2p_ops``: P2P operations posted (sends and receives); ``bytes_sent``;
    ``allgather_kv`` / ``reduce_scatter_dkv``: the all-gather variant's collectives (one per
    tensor); ``blocks_computed`` / ``blocks_skipped`` (forward, per K/V block), ``pairs``: the
    (query, key) pairs the forward's mask lets through, summed over blocks; ``wait_s``: seconds
    spent in the transfers' ``wait()`` (gloo: blocked, what the overlap did not hide; NCCL: the
    wait only orders the streams, so it says little)."""
    return dict(_TRAFFIC)


def reset_traffic() -> None:
    _TRAFFIC.clear()


# ---------------------------------------------------------------------------
# Layouts: which global positions each rank holds
# ---------------------------------------------------------------------------

def _check_layout(layout, who):
    if layout not in LAYOUTS:
        raise ValueError(f"effattn.distributed.{who}: layout must be one of {', '.join(map(repr, LAYOUTS))}, "
                         f"got {layout!r}")


def _chunks_per_rank(layout) -> int:
    return 2 if layout == "zigzag" else 1


def _split_error(who, what, length, world_size, layout, local=False):
    per = _chunks_per_rank(layout)
    how = ("2 equal chunks per rank (rank r holds chunks r and 2P-1-r)" if layout == "zigzag"
           else "one equal chunk per rank")
    if local:
        return ValueError(
            f"effattn.distributed.{who}: {what} = {length} is this rank's shard, but layout {layout!r} "
            f"holds {how}: with world size {world_size} the shard length must be a multiple of {per} "
            f"(the whole sequence, {length} x {world_size} = {length * world_size}, a multiple of "
            f"{per * world_size})")
    return ValueError(
        f"effattn.distributed.{who}: {what} = {length} (the sequence length) does not split across "
        f"world size {world_size} with layout {layout!r} ({how}): it must be a multiple of "
        f"{per} x {world_size} = {per * world_size}")


def shard_ranges(length: int, world_size: int, rank: int, layout: str = "zigzag") -> List[Tuple[int, int]]:
    """The global (start, stop) ranges, in storage order, that ``rank`` holds of a sequence of
    ``length`` positions: e.g. for position ids (rotary embeddings) of a shard."""
    _check_layout(layout, "shard_ranges")
    per = _chunks_per_rank(layout)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"effattn.distributed.shard_ranges: rank {rank} is not in a world of size {world_size}")
    if length % (per * world_size):
        raise _split_error("shard_ranges", "length", length, world_size, layout)
    c = length // (per * world_size)
    chunks = [rank] if layout == "contiguous" else [rank, 2 * world_size - 1 - rank]
    return [(i * c, (i + 1) * c) for i in chunks]


def _local_segments(n_local, world_size, rank, layout):
    """[(global offset, length)] of the chunks a rank holds, given its shard length."""
    return [(a, b - a) for a, b in shard_ranges(n_local * world_size, world_size, rank, layout)]


def _group_of(group):
    if not dist.is_available():
        raise RuntimeError("effattn.distributed needs torch.distributed, which this build of torch lacks")
    if not dist.is_initialized():
        raise RuntimeError("effattn.distributed: the default process group is not initialized "
                           "(call torch.distributed.init_process_group first)")
    return group if group is not None else dist.group.WORLD


def _size_rank(group):
    group = _group_of(group)
    return group, dist.get_world_size(group), dist.get_rank(group)


def _seq_dim(x, dim, who):
    nd = x.dim()
    if not -nd <= dim < nd:
        raise ValueError(f"effattn.distributed.{who}: dim {dim} is out of range for x of shape {tuple(x.shape)}")
    return dim - nd if dim >= 0 else dim  # negative: the same dim once a leading world dim is stacked


def _pieces(x, dim, ranges, base=0):
    return [x.narrow(dim, a - base, b - a) for a, b in ranges]


def shard(x: torch.Tensor, dim: int = -2, group=None, layout: str = "zigzag") -> torch.Tensor:
    """This rank's shard of ``x`` (the whole tensor, the same on every rank) along ``dim``:
    chunk r of P (``"contiguous"``), or chunks r and 2P-1-r of 2P, concatenated (``"zigzag"``).
    Differentiable (slices and a cat)."""
    _check_layout(layout, "shard")
    dim = _seq_dim(x, dim, "shard")
    group, P, r = _size_rank(group)
    n = x.shape[dim]
    if n % (_chunks_per_rank(layout) * P):
        raise _split_error("shard", f"x.size({dim})", n, P, layout)
    parts = _pieces(x, dim, shard_ranges(n, P, r, layout))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _ranks_to_global(stacked, dim, P, layout):
    """(P, *shard shape) stacked shards -> the whole tensor in global order along dim (< 0)."""
    n = stacked.shape[dim]
    owners = []  # (global start, rank, offset in that rank's shard)
    for s in range(P):
        off = 0
        for a, b in shard_ranges(n * P, P, s, layout):
            owners.append((a, s, off, b - a))
            off += b - a
    owners.sort()
    return torch.cat([stacked[s].narrow(dim, off, c) for _, s, off, c in owners], dim)


def _global_to_ranks(x, dim, P, layout):
    """The whole tensor -> (P, *shard shape): every rank's shard, stacked."""
    n = x.shape[dim]
    shards = []
    for s in range(P):
        parts = _pieces(x, dim, shard_ranges(n, P, s, layout))
        shards.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim))
    return torch.stack(shards)


# torch 2.14 renames the flat collectives (the old names warn); torch 2.10 has only the old ones.
# Looked up at call time: this module imports where torch.distributed is not available.
def _all_gather_flat(out, x, group):
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x, group=group)


def _reduce_scatter_flat(out, x, group):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, x, op=dist.ReduceOp.SUM, group=group)


class _Unshard(torch.autograd.Function):
    """Forward: all-gather the shards into the whole tensor. Backward: every rank's gradient of
    the whole tensor, summed, each rank keeping its shard (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, dim, group, P, layout, grad_dtype, counter):
        ctx.dim, ctx.group, ctx.P, ctx.layout, ctx.grad_dtype, ctx.counter = dim, group, P, layout, grad_dtype, counter
        x = x.contiguous()
        stacked = x.new_empty((P, *x.shape))
        _all_gather_flat(stacked.view(P * x.shape[0], *x.shape[1:]), x, group=group)  # gloo: flat only
        if counter:
            _TRAFFIC[counter[0]] += 1
        return _ranks_to_global(stacked, dim, P, layout)

    @staticmethod
    def backward(ctx, grad):
        dtype = ctx.grad_dtype or grad.dtype
        stacked = _global_to_ranks(grad.to(dtype), ctx.dim, ctx.P, ctx.layout).contiguous()
        out = stacked.new_empty(stacked.shape[1:])
        _reduce_scatter_flat(out, stacked.view(-1, *stacked.shape[2:]), ctx.group)
        if ctx.counter:
            _TRAFFIC[ctx.counter[1]] += 1
        return out.to(grad.dtype), None, None, None, None, None, None


def unshard(x: torch.Tensor, dim: int = -2, group=None, layout: str = "zigzag") -> torch.Tensor:
    """The whole tensor from every rank's shard along ``dim`` (an all-gather; the inverse of
    ``shard``). Differentiable: the gradient of a shard sums every rank's gradient of the whole
    tensor at that shard's positions (a reduce-scatter)."""
    _check_layout(layout, "unshard")
    dim = _seq_dim(x, dim, "unshard")
    group, P, _ = _size_rank(group)
    if x.shape[dim] % _chunks_per_rank(layout):
        raise _split_error("unshard", f"x.size({dim})", x.shape[dim], P, layout, local=True)
    if P == 1:
        return x
    return _Unshard.apply(x, dim, group, P, layout, None, None)


# ---------------------------------------------------------------------------
# Per-block masks in global positions
# ---------------------------------------------------------------------------

def _band(is_causal, window, who):
    """The visible band of key - query global positions, [lo, hi] (+-inf when unbounded)."""
    lo, hi = -_INF, _INF
    if window is not None:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise ValueError(f"effattn.distributed.{who}: window must be a pair (left, right) of ints >= 0 "
                             f"or None, got {window!r}")
        for side, w in zip(("left", "right"), window):
            if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
                raise ValueError(f"effattn.distributed.{who}: window {side} size must be an int >= 0 or "
                                 f"None (unbounded), got {w!r}")
        lo = -_INF if window[0] is None else -window[0]
        hi = _INF if window[1] is None else window[1]
    if is_causal:
        hi = min(hi, 0)
    return lo, hi


def _visible_pairs(m, n, left, right):
    """The (query, key) pairs of an m x n block under window (left, right) (None: unbounded)
    when every row sees at least one key (true of ``_pair_call``'s slices): the sum over rows i
    of min(n - 1, i + right) - max(0, i - left) + 1, in closed form."""
    if right is None:
        last = m * (n - 1)
    else:  # rows i <= n - 1 - right end at i + right, the others at n - 1
        k = min(m, max(0, n - right))
        last = k * (k - 1) // 2 + k * right + (m - k) * (n - 1)
    j = 0 if left is None else max(0, m - 1 - left)  # rows i > left start at i - left
    return last - j * (j + 1) // 2 + m


def _pair_call(m, n, a, b):
    """Rows i < m of a query segment against keys j < n of a key segment where query i sees key j
    iff a <= j - i <= b (local coordinates, a <= b, +-inf allowed). Returns None when no pair is
    visible, else (r0, r1, c0, c1, window, causal, pairs): only rows [r0, r1) see a key (the others
    see none: output 0, lse -inf), only keys [c0, c1) are seen, and on that slice the mask is
    ``effattn.attention``'s window (or is_causal, or nothing)."""
    r0 = max(0, -b)          # first row with i + b >= 0
    r1 = min(m, n - a)       # rows with i + a <= n - 1
    if r0 >= r1:
        return None
    c0 = max(0, r0 + a)      # the first row's first key
    c1 = min(n, r1 + b)      # the last row's last key + 1
    if c0 >= c1:
        return None
    r0, r1, c0, c1 = int(r0), int(r1), int(c0), int(c1)
    m2, n2 = r1 - r0, c1 - c0
    a2, b2 = a + r0 - c0, b + r0 - c0   # the band on the slices: a2 <= 0 <= b2 (row r0 sees key c0)
    left = None if a2 <= -(m2 - 1) else int(-a2)   # a side that never binds is unbounded
    right = None if b2 >= n2 - 1 else int(b2)
    pairs = _visible_pairs(m2, n2, left, right)
    if left is None and right is None:
        return (r0, r1, c0, c1, None, False, pairs)
    if left is None and right == 0:
        return (r0, r1, c0, c1, None, True, pairs)
    return (r0, r1, c0, c1, (left, right), False, pairs)


def _block_calls(q_segs, k_segs, band):
    """The effattn.attention calls that compute one (query shard, key block) pair, in storage
    coordinates of the shards: [(r0, r1, c0, c1, window, causal)], and the visible pair count.

    q_segs, k_segs: [(global offset, length)] in storage order. Rows of a query segment that
    see whole key segments with no mask are served by one call over the consecutive run of
    those segments, and consecutive query segments with the same run by one call (the
    unmasked case is a single call however the chunks lie)."""
    lo, hi = band
    calls, full_runs, pairs = [], [], 0
    q_base = 0
    for qo, m in q_segs:
        k_base, full = 0, []
        for ko, n in k_segs:
            d = ko - qo
            call = _pair_call(m, n, lo - d, hi - d)
            if call is not None:
                r0, r1, c0, c1, win, causal, p = call
                pairs += p
                if win is None and not causal and (r0, r1, c0, c1) == (0, m, 0, n):
                    full.append((k_base, k_base + n))
                else:
                    calls.append((q_base + r0, q_base + r1, k_base + c0, k_base + c1, win, causal))
            k_base += n
        runs = []  # consecutive full key segments -> one column range
        for c0, c1 in full:
            if runs and runs[-1][1] == c0:
                runs[-1] = (runs[-1][0], c1)
            else:
                runs.append((c0, c1))
        full_runs.append((q_base, q_base + m, runs))
        q_base += m
    merged = []  # consecutive query segments with the same runs -> one row range
    for r0, r1, runs in full_runs:
        if merged and merged[-1][2] == runs and merged[-1][1] == r0:
            merged[-1] = (merged[-1][0], r1, runs)
        else:
            merged.append((r0, r1, runs))
    full_calls = [(r0, r1, c0, c1, None, False) for r0, r1, runs in merged for c0, c1 in runs]
    return full_calls + calls, pairs


def _call(q, k, v, c, scale, enable_gqa):
    r0, r1, c0, c1, window, causal = c
    return attention(q[..., r0:r1, :], k[..., c0:c1, :], v[..., c0:c1, :], is_causal=causal, scale=scale,
                     enable_gqa=enable_gqa, window=window, return_lse=True)


def _merge(acc_o, acc_lse, r0, r1, o, lse):
    """acc rows [r0, r1) <- the LSE-weighted merge of acc and a partial (o, lse), in place, in the
    accumulators' dtype (float32, float64 for float64); rows that see no key stay 0 / -inf."""
    a_o, a_l = acc_o[..., r0:r1, :], acc_lse[..., r0:r1]
    lse = lse.to(a_l.dtype)
    new = torch.logaddexp(a_l, lse)
    safe = new.masked_fill(new == -_INF, 0.0)
    a_o.mul_(torch.exp(a_l - safe).unsqueeze(-1)).add_(o.to(a_o.dtype) * torch.exp(lse - safe).unsqueeze(-1))
    a_l.copy_(new)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_forward(q, k, v, calls, scale, enable_gqa, acc_o, acc_lse):
    """Attend q to one K/V block through ``calls``, merging every partial into the accumulators."""
    for c in calls:
        o, lse = _call(q, k, v, c, scale, enable_gqa)
        _merge(acc_o, acc_lse, c[0], c[1], o, lse)


def _rowdot(a, b):
    """sum over the last dim of a * b, without an a * b temporary."""
    return torch.einsum("...e,...e->...", a, b)


def _backward_delta(grad_out, out, grad_lse):
    """Per row, sum_e d out * out - d lse (accumulation dtype): the part of every block's d lse_b
    that does not depend on the block."""
    acc = _acc_dtype(out.dtype)
    delta = _rowdot(grad_out.to(acc), out.to(acc))
    return delta if grad_lse is None else delta - grad_lse.to(acc)


def _block_backward(q, k, v, calls, scale, enable_gqa, grad_out, delta, lse, need_dq):
    """Gradients (dq or None, dk, dv) of one block's share of the merged output, by recomputing the
    block's partials (o_b, lse_b) with effattn and back-propagating through them with

        d o_b   = w_b * d out,                  w_b = exp(lse_b - lse)
        d lse_b = w_b * (sum_e d out * (o_b - out) + d lse) = w_b * (sum_e d out * o_b - delta)

    (out = sum_b w_b o_b and lse = log sum_b exp lse_b: the merge's own derivatives; delta from
    ``_backward_delta``), which makes each block's score gradient the whole sequence's. None when
    the block has no call."""
    if not calls:
        return None
    with torch.enable_grad():
        ql = q.detach().requires_grad_(need_dq)
        kl, vl = k.detach().requires_grad_(True), v.detach().requires_grad_(True)
        outs, cots = [], []
        for c in calls:
            o, lse_b = _call(ql, kl, vl, c, scale, enable_gqa)
            r0, r1 = c[0], c[1]
            acc = lse_b.dtype
            lse_r = lse[..., r0:r1].to(acc)
            w = torch.exp(lse_b - lse_r.masked_fill(lse_r == -_INF, 0.0))  # 0 where the row sees nothing
            do = grad_out[..., r0:r1, :]
            d_lse = w * (_rowdot(do.to(acc), o.detach().to(acc)) - delta[..., r0:r1])
            outs += [o, lse_b]
            cots += [(w.unsqueeze(-1) * do.to(acc)).to(o.dtype), d_lse]
        inputs = [ql, kl, vl] if need_dq else [kl, vl]
        grads = torch.autograd.grad(outs, inputs, cots)
    return (grads[0] if need_dq else None,) + tuple(grads[-2:])


# ---------------------------------------------------------------------------
# The ring
# ---------------------------------------------------------------------------

class _RingComm:
    """Point-to-point transfers to the next rank of the ring, from the previous one."""

    def __init__(self, group, P, rank):
        self.group = group
        # P2POp takes global ranks
        self.send_peer = dist.get_global_rank(group, (rank + 1) % P)
        self.recv_peer = dist.get_global_rank(group, (rank - 1) % P)

    def start(self, send, recv, counts):
        """Posts the sends of ``send`` and the receives into ``recv`` (one batch); returns the
        works to wait on. counts: {counter: blocks} for traffic()."""
        ops = [dist.P2POp(dist.isend, t, self.send_peer, self.group, tag) for tag, t in enumerate(send)]
        ops += [dist.P2POp(dist.irecv, t, self.recv_peer, self.group, tag) for tag, t in enumerate(recv)]
        for name, n in counts.items():
            _TRAFFIC[name] += n
        _TRAFFIC["p2p_ops"] += len(ops)
        _TRAFFIC["bytes_sent"] += sum(t.numel() * t.element_size() for t in send)
        return dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(works):
        t0 = time.perf_counter()
        for w in works:
            w.wait()
        _TRAFFIC["wait_s"] += time.perf_counter() - t0


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cfg):
        group, P, rank, layout, band, scale, enable_gqa = cfg
        comm = _RingComm(group, P, rank)
        q_segs = _local_segments(q.shape[-2], P, rank, layout)
        acc = _acc_dtype(q.dtype)
        acc_o = torch.zeros((*q.shape[:-1], v.shape[-1]), dtype=acc, device=q.device)
        acc_lse = torch.full(q.shape[:-1], -_INF, dtype=acc, device=q.device)
        k_cur, v_cur = k.contiguous(), v.contiguous()
        for t in range(P):
            works = None
            if t < P - 1:  # the next block travels while this one is computed
                k_nxt, v_nxt = torch.empty_like(k_cur), torch.empty_like(v_cur)
                works = comm.start([k_cur, v_cur], [k_nxt, v_nxt], {"forward_kv": 1})
            src = (rank - t) % P
            calls, pairs = _block_calls(q_segs, _local_segments(k.shape[-2], P, src, layout), band)
            _TRAFFIC["blocks_computed" if calls else "blocks_skipped"] += 1
            _TRAFFIC["pairs"] += pairs
            _block_forward(q, k_cur, v_cur, calls, scale, enable_gqa, acc_o, acc_lse)
            if works is not None:
                comm.wait(works)
                k_cur, v_cur = k_nxt, v_nxt
        out = acc_o.to(q.dtype)
        ctx.cfg = cfg
        ctx.save_for_backward(q, k, v, out, acc_lse)
        ctx.set_materialize_grads(False)
        return out, acc_lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        group, P, rank, layout, band, scale, enable_gqa = ctx.cfg
        comm = _RingComm(group, P, rank)
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        need_dq = ctx.needs_input_grad[0]
        q_segs = _local_segments(q.shape[-2], P, rank, layout)
        acc = _acc_dtype(q.dtype)
        dq = None  # the first contribution, then their sum (accumulation dtype)
        delta = _backward_delta(grad_out, out, grad_lse)
        k_cur, v_cur = k.contiguous(), v.contiguous()

        def zeros_kv():
            return (torch.zeros(k_cur.shape, dtype=acc, device=k.device),
                    torch.zeros(v_cur.shape, dtype=acc, device=v.device))

        own = None   # this rank's own block's dk, dv (step 0), kept here
        prev = None  # the (dk, dv) accumulator of the block computed at the step before
        for t in range(P):
            send, recv, counts = [], [], {}
            if t < P - 1:
                k_nxt, v_nxt = torch.empty_like(k_cur), torch.empty_like(v_cur)
                send += [k_cur, v_cur]
                recv += [k_nxt, v_nxt]
                counts["backward_kv"] = 1
            if t >= 2:  # the block's dK/dV follow it one step behind: pass the last one on
                in_dk, in_dv = torch.empty_like(prev[0]), torch.empty_like(prev[1])
                send += list(prev)
                recv += [in_dk, in_dv]
                counts["backward_dkv"] = 1
            works = comm.start(send, recv, counts) if send else None
            src = (rank - t) % P
            calls, _ = _block_calls(q_segs, _local_segments(k.shape[-2], P, src, layout), band)
            g = _block_backward(q, k_cur, v_cur, calls, scale, enable_gqa, grad_out, delta, lse, need_dq)
            if g is not None and need_dq:
                dq = g[0].to(acc) if dq is None else dq.add_(g[0])
            if works is not None:
                comm.wait(works)
            if t == 0:
                own = zeros_kv() if g is None else (g[1].to(acc), g[2].to(acc))
            elif t == 1:  # the accumulator of block rank-1 starts here
                prev = zeros_kv() if g is None else (g[1].to(acc).contiguous(), g[2].to(acc).contiguous())
            else:
                prev = (in_dk, in_dv) if g is None else (in_dk.add_(g[1]), in_dv.add_(g[2]))
            del g  # (before the next block's buffers: a lower peak)
            if t < P - 1:
                k_cur, v_cur = k_nxt, v_nxt
        dk, dv = own
        if P > 1:  # the last block computed here is rank+1's own: its dK/dV go home
            in_dk, in_dv = torch.empty_like(prev[0]), torch.empty_like(prev[1])
            comm.wait(comm.start(list(prev), [in_dk, in_dv], {"backward_dkv": 1}))
            dk, dv = dk + in_dk, dv + in_dv
        if need_dq and dq is None:  # no row of this rank sees any key
            dq = torch.zeros_like(q)
        return (dq.to(q.dtype) if need_dq else None, dk.to(k.dtype), dv.to(v.dtype), None)


def _check_inputs(who, q, k, v, layout, P):
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor) or t.dim() < 2:
            raise ValueError(f"effattn.distributed.{who}: {name} must be a tensor (..., seq, dim), got "
                             f"{type(t).__name__ if not isinstance(t, torch.Tensor) else tuple(t.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"effattn.distributed.{who}: key.size(-2) = {k.shape[-2]} must equal "
                         f"value.size(-2) = {v.shape[-2]}")
    per = _chunks_per_rank(layout)
    for name, t in (("query", q), ("key", k)):
        if t.shape[-2] % per:
            raise _split_error(who, f"{name}.size(-2)", t.shape[-2], P, layout, local=True)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None, is_causal: bool = False,
                   scale: Optional[float] = None, enable_gqa: bool = False,
                   window: Optional[Sequence[Optional[int]]] = None, layout: str = "zigzag",
                   return_lse: bool = False):
    """This rank's rows of ``effattn.attention(Q, K, V, is_causal=, scale=, enable_gqa=, window=)``
    on the whole sequences, each rank holding its shard (``shard(x, layout=layout)``) of the
    sequence dim (-2) of q, k and v. Every rank of ``group`` must call it with shards of the same
    shapes. K/V blocks travel around the ring (P - 1 transfers per rank, overlapped with the
    attention on the block in hand); the backward sends the blocks around again with their
    dK/dV, which end on their owner. Returns out (and lse, float32; float64 for float64, -inf
    for a row that sees no key, differentiable) in q's layout of rows."""
    _check_layout(layout, "ring_attention")
    group, P, rank = _size_rank(group)
    _check_inputs("ring_attention", q, k, v, layout, P)
    band = _band(is_causal, window, "ring_attention")
    out, lse = _Ring.apply(q, k, v, (group, P, rank, layout, band, scale, enable_gqa))
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------
# All-gather
# ---------------------------------------------------------------------------

def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None, is_causal: bool = False,
                        scale: Optional[float] = None, enable_gqa: bool = False,
                        window: Optional[Sequence[Optional[int]]] = None, layout: str = "zigzag",
                        return_lse: bool = False):
    """Like ``ring_attention`` (same arguments, same result), but K and V are all-gathered once
    (two collectives), q's shard attends to the whole K/V locally with effattn's own backward,
    and dK/dV are reduce-scattered back to their owners (two collectives). Each rank holds the
    whole K/V for the call: the better choice when they are small (GQA, few KV heads)."""
    _check_layout(layout, "allgather_attention")
    group, P, rank = _size_rank(group)
    _check_inputs("allgather_attention", q, k, v, layout, P)
    band = _band(is_causal, window, "allgather_attention")
    acc = _acc_dtype(k.dtype)
    if P > 1:
        k_all = _Unshard.apply(k, -2, group, P, layout, acc, ("allgather_kv", "reduce_scatter_dkv"))
        v_all = _Unshard.apply(v, -2, group, P, layout, acc, ("allgather_kv", "reduce_scatter_dkv"))
    else:
        k_all, v_all = k, v
    q_segs = _local_segments(q.shape[-2], P, rank, layout)
    calls, pairs = _block_calls(q_segs, [(0, k_all.shape[-2])], band)
    _TRAFFIC["pairs"] += pairs
    # each query segment has one key segment: its call(s) cover disjoint rows, put side by side
    calls = sorted(calls, key=lambda c: c[0])
    if not calls:  # no row sees a key: an empty call still takes part in the backward's collectives
        calls = [(0, q.shape[-2], 0, 0, None, False)]
    out_shape, n = (*q.shape[:-1], v.shape[-1]), q.shape[-2]
    outs, lses, row = [], [], 0
    for c in calls:
        o, lse = _call(q, k_all, v_all, c, scale, enable_gqa)
        if c[0] > row:
            outs.append(q.new_zeros((*out_shape[:-2], c[0] - row, out_shape[-1])))
            lses.append(torch.full((*out_shape[:-2], c[0] - row), -_INF, dtype=lse.dtype, device=q.device))
        outs.append(o)
        lses.append(lse)
        row = c[1]
    if row < n:  # rows that see no key at all
        outs.append(q.new_zeros((*out_shape[:-2], n - row, out_shape[-1])))
        lses.append(torch.full((*out_shape[:-2], n - row), -_INF, dtype=_acc_dtype(q.dtype), device=q.device))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, -2)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, -1)
    return (out, lse) if return_lse else out
