#!/usr/bin/env python3
"""Context parallelism on the CPU with gloo: 1, 2 and 4 processes at the same total L, and a model
of GPU scaling.

    python3 bench/context_parallel.py                  # L = 4096, B = 1, H = 8, E = 64, float32
    python3 bench/context_parallel.py --quick          # a smoke run of seconds (writes *-quick.*)

For each world size P (a fresh set of P processes, one torch thread each, joined by a gloo
process group) and each method, every rank holds its shard (L / P rows) of q, k, v and runs
forward+backward of
  single     effattn.attention on the whole sequence (P = 1 only: the baseline);
  ring       effattn.distributed.ring_attention (zigzag layout);
  allgather  effattn.distributed.allgather_attention (zigzag layout);
on cases: causal (Hkv = H), causal GQA (Hkv = H / 4), not causal (Hkv = H).
Measured per rank: forward and backward wall time (medians of --iters runs, each after a barrier;
the step's time is the slowest rank's), the CPU time of the rank's main thread (the work it did,
whatever the other processes on the machine took), the seconds spent in the ring's waits, the peak of live
tensor bytes during one forward+backward beyond the inputs (the profiler's allocations and frees,
summed in order: the CPU's max_memory_allocated, allocator caching left out), and the bytes of
q, k, v, out and their gradients, which fall as 1/P. Before timing, each method is validated at a
small size against effattn on the whole sequence.

The GPU model (no GPU measured here) is arithmetic: per ring step, a block's attention at the
effattn Triton forward rates measured on an H100 (results/triton-gpu.json) against the transfer
of the next K/V block (forward) or K/V + float32 dK/dV (backward) at NVLink 4 and InfiniBand NDR
bandwidths; it says from which L per GPU the ring hides its communication, for 8 GPUs (one node,
NVLink) and 64 GPUs (8 nodes: the ring crosses InfiniBand, its slowest hop sets each step).

Writes bench/results/context-parallel-cpu.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import queue as queue_mod
import statistics
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import common
from common import MiB, log

import effattn
import effattn.distributed as cp

CASES = {"causal": dict(causal=True, kv_div=1), "causal-gqa": dict(causal=True, kv_div=4),
         "full": dict(causal=False, kv_div=1)}


# ---------------------------------------------------------------------------
# One rank
# ---------------------------------------------------------------------------

def tensor_peak_bytes(fn):
    """Peak of live tensor bytes allocated while fn runs (beyond what was live before): the
    profiler's allocation (+) and free (-) records summed in time order (kineto's raw events,
    which keep every one; the aggregated events fold them into their ops)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]")
    live = peak = 0
    for _, delta in records:
        live += delta
        peak = max(peak, live)
    return peak


def call(method, q, k, v, causal, gqa):
    if method == "single":
        return effattn.attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    fn = cp.ring_attention if method == "ring" else cp.allgather_attention
    return fn(q, k, v, is_causal=causal, enable_gqa=gqa)


def validate(method, P, causal, gqa, dtype):
    """Max error of out and q/k/v gradients (gathered) against effattn on the whole sequence,
    relative to the largest magnitude, at B = 1, H = 4, L = 64 P, E = 16 (every rank)."""
    g = torch.Generator().manual_seed(1)
    H, Hkv, L, E = 4, 1 if gqa else 4, 64 * P, 16
    full = [torch.randn(1, h, L, E, generator=g, dtype=dtype) for h in (H, Hkv, Hkv, H)]
    want_leaves = [t.clone().requires_grad_() for t in full[:3]]
    want_out = effattn.attention(*want_leaves, is_causal=causal, enable_gqa=gqa)
    want = [want_out, *torch.autograd.grad(want_out, want_leaves, full[3])]
    if method == "single":
        return 0.0
    leaves = [cp.shard(t).requires_grad_() for t in full[:3]]
    out = call(method, *leaves, causal, gqa)
    got = [out, *torch.autograd.grad(out, leaves, cp.shard(full[3]))]
    got = [cp.unshard(t.detach()) for t in got]
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want))


def rank_main(rank, P, cfg):
    dtype = common.DTYPES[cfg["dtype"]]
    B, H, L, E = cfg["B"], cfg["H"], cfg["L"], cfg["E"]
    n = L // P
    rows = []
    for case_name in cfg["cases"]:
        case = CASES[case_name]
        Hkv = H // case["kv_div"]
        gqa = Hkv != H
        for method in cfg["methods"]:
            if method == "single" and P > 1:
                continue
            err = validate(method, P, case["causal"], gqa, dtype)
            g = torch.Generator().manual_seed(rank)
            q = torch.randn(B, H, n, E, generator=g, dtype=dtype).requires_grad_()
            k = torch.randn(B, Hkv, n, E, generator=g, dtype=dtype).requires_grad_()
            v = torch.randn(B, Hkv, n, E, generator=g, dtype=dtype).requires_grad_()
            dout = torch.randn(B, H, n, E, generator=g, dtype=dtype)

            def step():
                out = call(method, q, k, v, case["causal"], gqa)
                grads = torch.autograd.grad(out, (q, k, v), dout)
                return out, grads

            out, grads = step()  # warm-up
            io = sum(t.numel() * t.element_size() for t in (q, k, v, out, *grads))
            del out, grads
            peak = tensor_peak_bytes(step)
            fwd, bwd, cpu, wait = [], [], [], []
            for _ in range(cfg["iters"]):
                if P > 1:
                    dist.barrier()
                cp.reset_traffic()
                t0, c0 = time.perf_counter(), time.thread_time()
                out = call(method, q, k, v, case["causal"], gqa)
                t1 = time.perf_counter()
                torch.autograd.grad(out, (q, k, v), dout)
                t2, c2 = time.perf_counter(), time.thread_time()
                fwd.append(t1 - t0)
                bwd.append(t2 - t1)
                cpu.append(c2 - c0)
                wait.append(cp.traffic().get("wait_s", 0.0))
                del out
            tr = cp.traffic()
            rows.append(dict(case=case_name, method=method, P=P, rank=rank, B=B, H=H, Hkv=Hkv, L=L, E=E,
                             fwd_ms=1e3 * statistics.median(fwd), bwd_ms=1e3 * statistics.median(bwd),
                             cpu_ms=1e3 * statistics.median(cpu),
                             wait_ms=1e3 * statistics.median(wait), peak_bytes=peak, io_bytes=io,
                             validation_error=err,
                             traffic={k_: v_ for k_, v_ in tr.items() if k_ != "wait_s"}))
            log(f"  P={P} rank {rank} {case_name:10s} {method:9s} fwd {rows[-1]['fwd_ms']:8.1f} ms "
                f"bwd {rows[-1]['bwd_ms']:8.1f} ms cpu {rows[-1]['cpu_ms']:8.1f} ms wait {rows[-1]['wait_ms']:7.1f} ms "
                f"peak {peak / MiB:6.1f} MiB io {io / MiB:6.1f} MiB err {err:.1e}")
    return rows


def _entry(rank, P, store_path, cfg, results):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", store=dist.FileStore(store_path, P), rank=rank, world_size=P,
                                timeout=datetime.timedelta(seconds=300))
        results.put((rank, "ok", rank_main(rank, P, cfg)))
    except BaseException:  # noqa: BLE001  (reported to the parent)
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(P, cfg, timeout):
    """rank_main on P spawned processes; their rows, or SystemExit with every rank's traceback."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_entry, args=(r, P, os.path.join(tmp, "store"), cfg, results), daemon=True)
                 for r in range(P)]
        for p in procs:
            p.start()
        reports, deadline = {}, time.monotonic() + timeout
        while len(reports) < P and time.monotonic() < deadline:
            try:
                r, status, payload = results.get(timeout=1)
                reports[r] = (status, payload)
                if status == "error":
                    deadline = min(deadline, time.monotonic() + 10)
            except queue_mod.Empty:
                if not any(p.is_alive() for p in procs):
                    break
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if len(reports) == P and all(s == "ok" for s, _ in reports.values()):
        return [row for r in range(P) for row in reports[r][1]]
    raise SystemExit(f"P={P} failed:\n" + "\n".join(
        f"--- rank {r}: " + (reports[r][1] if r in reports else "no report (killed or died)") for r in range(P)))


# ---------------------------------------------------------------------------
# The GPU model
# ---------------------------------------------------------------------------

GPU_ASSUMPTIONS = dict(
    rates="effattn Triton forward and forward+backward TFLOP/s, bf16, measured on one H100 80GB "
          "(results/triton-gpu.json, hidden 2048, L = 1024 / 4096 / 16384; interpolated in log L, held "
          "flat outside). The H200 has the same compute (GH100) and more memory bandwidth; attention "
          "is compute-bound, so the H100 rates stand for it",
    nvlink_GBps=450.0, nvlink_note="NVLink 4 (H100/H200 SXM): 900 GB/s both directions, 450 GB/s one way; "
                                   "a ring step sends one way to one neighbour",
    ib_GBps=50.0, ib_note="InfiniBand NDR, 400 Gb/s = 50 GB/s per GPU (one HCA per GPU)",
    latency_us=dict(nvlink=10.0, ib=20.0),
    dtype_bytes=2, grad_bytes=4,
    ring_8="8 GPUs: one node, every hop NVLink",
    ring_64="64 GPUs: 8 nodes of 8, one ring: 8 of its 64 hops cross InfiniBand, and each step lasts as long "
            "as its slowest hop",
    backward="the backward recomputes each block's forward (the public API has no backward from a merged "
             "LSE), so its compute per block is effattn's forward+backward; it sends K/V in bf16 and dK/dV "
             "in float32 (12 bytes per (token, head dim, KV head) against the forward's 4)",
    causal="zigzag: every step computes half a block (c^2 / 2 pairs), at the causal rates",
)


def load_rates():
    """{(E, causal): [(L, forward TFLOP/s, forward+backward TFLOP/s)]} of effattn's Triton kernels."""
    with open(os.path.join(common.RESULTS, "triton-gpu.json")) as f:
        saved = json.load(f)
    rates = {}
    for r in saved["rows"]:
        if r.get("method") == "effattn" and not r.get("padded") and "fwd_tflops" in r:
            rates.setdefault((r["E"], bool(r["causal"])), []).append((r["L"], r["fwd_tflops"], r["fwd_bwd_tflops"]))
    return {k: sorted(v) for k, v in rates.items()}


def rate_at(table, c, which):
    """TFLOP/s at block size c, interpolated in log L between the measured lengths."""
    pts = [(math.log(L), (fwd, fb)[which]) for L, fwd, fb in table]
    x = math.log(c)
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def step_times(c, E, H, Hkv, causal, table, bw_GBps, latency_us):
    """(compute, transfer) seconds of one forward and one backward ring step at c tokens per GPU."""
    pairs = c * c * (0.5 if causal else 1.0)
    flop_fwd = 4 * H * pairs * E
    fwd = flop_fwd / (rate_at(table, c, 0) * 1e12)
    bwd = 3.5 * flop_fwd / (rate_at(table, c, 1) * 1e12)  # recompute + backward = forward+backward
    a = GPU_ASSUMPTIONS
    kv = 2 * Hkv * c * E * a["dtype_bytes"]
    dkv = 2 * Hkv * c * E * a["grad_bytes"]
    t_kv = kv / (bw_GBps * 1e9) + latency_us * 1e-6
    t_bwd = (kv + dkv) / (bw_GBps * 1e9) + latency_us * 1e-6
    return fwd, t_kv, bwd, t_bwd


def hiding_threshold(E, H, Hkv, causal, table, bw, lat, phase):
    """Smallest c (tokens per GPU, multiple of 256) from which compute >= transfer."""
    c = 256
    while c <= 1 << 22:
        f, tf, b, tb = step_times(c, E, H, Hkv, causal, table, bw, lat)
        if (f >= tf) if phase == "fwd" else (b >= tb):
            return c
        c += 256
    return None


def gpu_model():
    rates = load_rates()
    a = GPU_ASSUMPTIONS
    rows = []
    for E in (64, 128):
        for causal in (False, True):
            table = rates.get((E, causal))
            if not table:
                continue
            H = 2048 // E  # the measured runs' hidden size
            for kv_div in (1, 8):
                Hkv = H // kv_div
                row = dict(E=E, causal=causal, H=H, Hkv=Hkv)
                for link, bw, lat in (("nvlink", a["nvlink_GBps"], a["latency_us"]["nvlink"]),
                                      ("ib", a["ib_GBps"], a["latency_us"]["ib"])):
                    for phase in ("fwd", "bwd"):
                        row[f"{link}_{phase}_c"] = hiding_threshold(E, H, Hkv, causal, table, bw, lat, phase)
                    c = max(row[f"{link}_fwd_c"], row[f"{link}_bwd_c"])
                    f, tf, b, tb = step_times(c, E, H, Hkv, causal, table, bw, lat)
                    row[f"{link}_at_c"] = dict(fwd_compute_us=f * 1e6, fwd_transfer_us=tf * 1e6,
                                               bwd_compute_us=b * 1e6, bwd_transfer_us=tb * 1e6)
                row["L_8"] = 8 * max(row["nvlink_fwd_c"], row["nvlink_bwd_c"])
                row["L_64"] = 64 * max(row["ib_fwd_c"], row["ib_bwd_c"])
                rows.append(row)
    return dict(assumptions=a, rates={f"E={E} causal={c}": v for (E, c), v in rates.items()}, rows=rows)


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------

def summarize(rows):
    """Per (case, method, P): the slowest rank's times, the largest peak, the io bytes."""
    out = {}
    for r in rows:
        key = (r["case"], r["method"], r["P"])
        s = out.setdefault(key, dict(case=r["case"], method=r["method"], P=r["P"], fwd_ms=0, bwd_ms=0, cpu_ms=0,
                                     wait_ms=0, peak_bytes=0, io_bytes=0, validation_error=0))
        for name in ("fwd_ms", "bwd_ms", "cpu_ms", "wait_ms", "peak_bytes", "io_bytes", "validation_error"):
            s[name] = max(s[name], r[name])
    return list(out.values())


def tables(res, markdown=False):
    summary = res["summary"]
    base = {(s["case"]): s for s in summary if s["method"] == "single"}
    rows = []
    for s in sorted(summary, key=lambda s: (list(CASES).index(s["case"]), s["method"] != "single",
                                            s["method"], s["P"])):
        b = base.get(s["case"])
        rows.append([s["case"], s["method"], s["P"], common.fmt_ms(s["fwd_ms"]), common.fmt_ms(s["bwd_ms"]),
                     common.fmt_ms(s["fwd_ms"] + s["bwd_ms"]), common.fmt_ms(s["cpu_ms"]),
                     f"{s['cpu_ms'] / b['cpu_ms']:.2f}" if b else "-",
                     common.fmt_ms(s["wait_ms"]), f"{s['io_bytes'] / MiB:.1f}", f"{s['peak_bytes'] / MiB:.1f}",
                     f"{s['peak_bytes'] / s['io_bytes']:.2f}", f"{s['validation_error']:.1e}"])
    cfg = res["config"]
    t1 = (f"CPU, gloo, B = {cfg['B']}, H = {cfg['H']}, L = {cfg['L']} in total, E = {cfg['E']}, {cfg['dtype']}, "
          f"one thread per rank ({res['meta']['cpu_count']} cores, load average {res['meta']['load_average_at_start']} at the start: P = 4 shares them two to a core); the slowest rank's times (CPU ms: its main thread's CPU time for fwd+bwd, the work whatever the contention), the largest rank's memory",
          common.table(["case", "method", "P", "fwd ms", "bwd ms", "fwd+bwd ms", "CPU ms", "CPU vs single", "waited ms",
                        "q,k,v,out,grads MiB", "peak MiB", "peak/io", "valid. err"], rows, markdown))
    m = res["gpu_model"]
    rows2 = []
    for r in m["rows"]:
        rows2.append([r["E"], "yes" if r["causal"] else "no", f"{r['H']}/{r['Hkv']}",
                      r["nvlink_fwd_c"], r["nvlink_bwd_c"], f"{r['L_8']:,}",
                      r["ib_fwd_c"], r["ib_bwd_c"], f"{r['L_64']:,}"])
    t2 = ("GPU model (arithmetic, not measured): tokens per GPU from which a ring step's compute hides its "
          "transfer, bf16, H100 rates",
          common.table(["E", "causal", "H/Hkv", "NVLink fwd", "NVLink bwd", "8 GPUs: total L", "IB fwd", "IB bwd",
                        "64 GPUs: total L"], rows2, markdown))
    return [t1, t2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run (writes *-quick.*)")
    ap.add_argument("--procs", default="1,2,4")
    ap.add_argument("--L", type=int, default=4096)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--E", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=list(common.DTYPES))
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--methods", default="single,ring,allgather")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per world size")
    ap.add_argument("--out", default=common.RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.L, args.H, args.iters = 256, 4, 1
    procs = [int(p) for p in args.procs.split(",")]
    cfg = dict(B=args.B, H=args.H, L=args.L, E=args.E, dtype=args.dtype, iters=args.iters,
               cases=args.cases.split(","), methods=args.methods.split(","))
    rt = common.Runtime("cpu")
    torch.set_num_threads(1)
    meta = common.meta(rt, "context_parallel.py", argv if argv is not None else sys.argv[1:])
    rows = []
    for P in procs:
        t0 = time.perf_counter()
        log(f"P = {P}: {P} processes")
        rows += run_world(P, cfg, args.timeout)
        log(f"P = {P}: {time.perf_counter() - t0:.0f} s")
    res = dict(meta=meta, config=cfg, rows=rows, summary=summarize(rows), gpu_model=gpu_model())
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"context-parallel-cpu{'-quick' if args.quick else ''}.json")
    common.write_json(path, res)
    common.write_markdown(path[:-5] + ".md", "context_parallel.py", meta, tables(res, markdown=True))
    for title, text in tables(res):
        print(title)
        print(text)
        print()
    return res


if __name__ == "__main__":
    main()
