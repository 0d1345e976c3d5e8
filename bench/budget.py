#!/usr/bin/env python3
"""The longest sequence each method can train (forward+backward) under a memory cap.

    python3 bench/budget.py                            # CUDA: 8 GiB cap, B=1 H=8 E=64 bfloat16
    python3 bench/budget.py --methods effattn,sdpa:flash,naive --max-seconds 150
    python3 bench/budget.py --device cpu               # RAM-based, 64 MiB cap, float32 (see below)
    python3 bench/budget.py --quick                    # tiny smoke run

The CRNN scenario's users train on an 8 GB GPU. On CUDA this script caps its own allocations
at --cap-gib (torch.cuda.set_per_process_memory_fraction(cap / total)) and, per method, finds
the longest L (a multiple of --step) for which one forward+backward at (B, H, E) = (1, 8, 64)
runs without torch.OutOfMemoryError. Every trial runs in this process; after each, tensors are
dropped and torch.cuda.empty_cache() is called.

The physical ceiling: q, k, v, the output, its gradient and dq, dk, dv must exist at once,
8 * L * H * E * itemsize bytes, which fill 8 GiB at L = 1,048,576 (bfloat16, H=8, E=64). Each
method's longest L is printed with its fraction of that ceiling (effattn's goal: >= 0.85).

Search per method: grow L 4x from ceiling/64 while trials fit; then, once two trials have
fitted, predict where the measured peak memory (linear in L through the last two points)
reaches the cap and try there, and after a fitting prediction try one step more; otherwise
bisect. Trials near the ceiling are long (a non-causal forward+backward at L = 1M is ~6e15
FLOPs): a trial whose time, extrapolated as L^2 from the last one, would pass --max-seconds
is not started and the method's longest verified L is reported as a lower bound.

Also: at (B, H, L, E) = (32, 8, 800, 64), the 800-step case, does one forward+backward fit under
the cap, and with how much room (cap - peak allocated).

CPU (--device cpu): there is no allocator cap to set, so each trial runs in a fresh process
and "fits" means its peak RSS growth (inputs included) stays under --cap-gib; the default cap
is 64 MiB (float32, ceiling 4096 tokens) so that the search finishes in minutes on a small
CPU; the 800-step check uses --batch-cap-gib (default 8). --quick runs in one process.

Writes bench/results/budget-<device>.json (+ .md, + .png).
"""
import argparse
import json
import math
import subprocess
import sys
import time

import torch

import common
from common import GiB, MiB, log


def ceiling_tokens(cap, H, E, itemsize):
    """L at which q, k, v, out, dout, dq, dk, dv (B=1) fill the cap."""
    return cap / (8 * H * E * itemsize)


def _run_once(rt, method, B, H, L, E, dtype, causal):
    q, k, v, dout = common.make_inputs(rt, B, H, L, E, dtype)
    case = common.make_case(rt, "causal" if causal else "dense", B, L, dout)
    out = method.call(q, k, v, case)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    rt.sync()
    # a finite check on a slice (a full-size one would allocate a mask as large as the output)
    return all(bool(torch.isfinite(t[..., :4096, :]).all()) for t in (out, *grads))


def trial_in_process(rt, method, B, H, L, E, dtype, causal):
    """One forward+backward under the cap: dict(L, fits, status, peak_bytes, seconds)."""
    rt.cleanup()
    rt.reset_peak()
    base = rt.allocated() if rt.rss else 0  # CUDA: the allocator's whole peak counts against the cap
    t0 = time.perf_counter()
    status, peak = "ok", None
    try:
        finite = _run_once(rt, method, B, H, L, E, dtype, causal)
        peak = rt.peak() - base
        if rt.rss and rt.cap_bytes is not None and peak > rt.cap_bytes:
            status = "OOM"  # RSS-based (CPU smoke run, fake CUDA): the cap checked afterwards
        elif not finite:
            status = "error: non-finite output"
    except Exception as exc:  # noqa: BLE001  (OOM ends a search branch; others end the method)
        status = common.classify_error(exc)
    seconds = time.perf_counter() - t0
    rt.cleanup()
    return dict(L=L, B=B, fits=status == "ok", status=status, peak_bytes=peak, seconds=seconds)


def worker(spec):
    """CPU trial in a fresh process: peak RSS growth of inputs + forward + backward."""
    rt = common.Runtime("cpu")
    dtype = common.DTYPES[spec["dtype"]]
    method = next(m for m in common.all_methods(rt, dtype, include_flex=False) if m.name == spec["method"])
    _run_once(rt, method, 1, 1, 64, spec["E"], dtype, spec["causal"])  # one-time initialisation
    common.reset_rss_peak()
    before = common.proc_kib("VmRSS")
    t0 = time.perf_counter()
    try:
        finite = _run_once(rt, method, spec["B"], spec["H"], spec["L"], spec["E"], dtype, spec["causal"])
        status = "ok" if finite else "error: non-finite output"
    except Exception as exc:  # noqa: BLE001
        status = common.classify_error(exc)
    peak = (common.proc_kib("VmHWM") - before) * 1024
    print(json.dumps(dict(status=status, peak_bytes=peak, seconds=time.perf_counter() - t0)))


def trial_subprocess(method, B, H, L, E, dtype_name, causal, cap, threads):
    spec = dict(method=method.name, B=B, H=H, L=L, E=E, dtype=dtype_name, causal=causal)
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)] + (["--threads", str(threads)] if threads else [])
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        status = "OOM" if p.returncode in (-9, 137) else "error: " + (p.stderr.strip().splitlines() or ["?"])[-1][:200]
        return dict(L=L, B=B, fits=False, status=status, peak_bytes=None, seconds=time.perf_counter() - t0)
    r = json.loads(lines[-1])
    if r["status"] == "ok" and r["peak_bytes"] > cap:
        r["status"] = "OOM"  # over the emulated cap
    return dict(L=L, B=B, fits=r["status"] == "ok", status=r["status"], peak_bytes=r["peak_bytes"],
                seconds=r["seconds"])


def search(trial, cap, step, hi_bound, start, deadline, max_trials=16):
    """Longest fitting L (multiple of step) in [step, hi_bound). Returns (longest, trials, note)."""
    lo, hi = 0, hi_bound  # lo fits (0: none yet), hi does not (or is the bound)
    fitted, trials = [], []
    L, predicted = start, False
    note = ""
    while hi - lo > step and len(trials) < max_trials:
        last_ok = fitted[-1] if fitted else None
        if last_ok and last_ok["seconds"] > 0:  # would this trial pass the deadline?
            est = last_ok["seconds"] * (L / last_ok["L"]) ** 2
            if time.perf_counter() + est > deadline:
                note = f"time budget: a trial at L={L} would take ~{est:.0f} s; longest verified L is a lower bound"
                break
        r = trial(L)
        trials.append(r)
        log(f"    L={L:>9,d}: {'fits' if r['fits'] else r['status']}"
            + (f", peak {r['peak_bytes'] / MiB:,.0f} MiB" if r["peak_bytes"] else "") + f" ({r['seconds']:.1f} s)")
        if r["fits"]:
            lo = L
            fitted.append(r)
        elif r["status"] == "OOM":
            hi = L
        else:
            note = r["status"]
            break
        if hi - lo <= step:
            break
        # the next L
        if predicted and r["fits"] and lo + step < hi:
            L, predicted = lo + step, False  # confirm the predicted boundary
            continue
        predicted = False
        nxt = None
        if len(fitted) >= 2 and fitted[-1]["peak_bytes"] and fitted[-2]["peak_bytes"]:
            (l1, p1), (l2, p2) = ((f["L"], f["peak_bytes"]) for f in fitted[-2:])
            if l2 != l1 and p2 > p1:
                slope = (p2 - p1) / (l2 - l1)
                guess = int((l2 + (cap - p2) / slope) // step * step)
                if lo < guess < hi:
                    nxt, predicted = guess, True
        if nxt is None:
            if hi == hi_bound and not any(t["status"] == "OOM" for t in trials):
                nxt = min(lo * 4, (hi - 1) // step * step)  # still growing
            else:
                nxt = (lo + hi) // 2 // step * step
            if nxt <= lo:
                nxt = lo + step
        L = nxt
    return lo, trials, note


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(ap, max_seconds=None)
    ap.add_argument("--cap-gib", type=float, default=None, help="memory cap (default 8 on CUDA, 1/16 = 64 MiB on CPU)")
    ap.add_argument("--batch-cap-gib", type=float, default=8.0, help="CPU: the cap of the 800-step check")
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--dtype", default=None, choices=sorted(common.DTYPES))
    ap.add_argument("--step", type=int, default=None, help="L resolution (default 1024 CUDA, 256 CPU)")
    ap.add_argument("--causal", action="store_true", help="causal attention (half the FLOPs; same memory)")
    ap.add_argument("--batch-case", default="32,800", help="B,L of the 800-step check ('' to skip)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(json.loads(args.worker))
        return None
    rt = common.Runtime(args.device)
    q_ = args.quick
    H = args.heads or (2 if q_ else 8)
    E = args.dim or (16 if q_ else 64)
    dtype_name = args.dtype or ("bfloat16" if rt.cuda else "float32")
    dtype = common.DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    cap = (args.cap_gib if args.cap_gib is not None else (8.0 if rt.cuda and not q_ else 1 / 16 if not q_ else 1 / 256)) * GiB
    step = args.step or (256 if q_ else 1024 if rt.cuda else 256)
    in_process = rt.cuda or q_
    if in_process:
        rt.set_cap(cap)  # CUDA: set_per_process_memory_fraction; RSS-based runs: checked after each trial
    ceiling = ceiling_tokens(cap, H, E, itemsize)
    methods = common.select_methods(common.all_methods(rt, dtype, include_flex=rt.cuda and not q_), args.methods)
    m = common.meta(rt, "budget.py", argv)
    log(common.stamp(m))
    log(f"cap {cap / GiB:g} GiB; B=1 H={H} E={E} {dtype_name}{' causal' if args.causal else ''}: "
        f"ceiling (q, k, v, out, dout, dq, dk, dv) L = {ceiling:,.0f}; methods: " + ", ".join(x.name for x in methods))
    t_start = time.perf_counter()
    deadline = t_start + (args.max_seconds if args.max_seconds else 1e9)
    threads = args.threads

    def trial(meth, B, L, E_=E, c=cap):
        if in_process:
            return trial_in_process(rt, meth, B, H, L, E_, dtype, args.causal)
        return trial_subprocess(meth, B, H, L, E_, dtype_name, args.causal, c, threads)

    # validation at a small size (outside the cap's concern)
    valid = {x.name: common.validate(rt, x, "causal" if args.causal else "dense", E, dtype, L=64) for x in methods}
    for name, (ok, err, st) in valid.items():
        if not ok:
            log(f"check {name}: {st}")

    # 1) the 800-step case: does it fit, with how much room
    batch = []
    if args.batch_case:
        bB, bL = (int(x) for x in args.batch_case.split(","))
        if q_:
            bB, bL = 4, 128
        bcap = cap if rt.cuda or q_ else args.batch_cap_gib * GiB
        log(f"the 800-step case: B={bB} L={bL} H={H} E={E}, cap {bcap / GiB:g} GiB")
        for meth in methods:
            if not valid[meth.name][0]:
                batch.append(dict(method=meth.name, status=valid[meth.name][2], fits=False))
                continue
            r = trial(meth, bB, bL, c=bcap)
            r.update(method=meth.name, cap_bytes=bcap,
                     room_bytes=(bcap - r["peak_bytes"]) if r["peak_bytes"] is not None else None)
            batch.append(r)
            log(f"  {meth.name:18s} " + (f"fits, peak {r['peak_bytes'] / MiB:,.0f} MiB, room {r['room_bytes'] / MiB:,.0f} MiB"
                                          if r["fits"] else r["status"]) + f" ({r['seconds']:.1f} s)")

    # 2) the longest L per method
    step_ceiling = int(ceiling // step * step)
    start = max(step, int(ceiling / 64) // step * step)
    results = []
    prog = common.Progress(len(methods))
    for meth in methods:
        if not valid[meth.name][0]:
            results.append(dict(method=meth.name, longest_L=None, status=valid[meth.name][2], trials=[]))
            prog.step(f"{meth.name}: {valid[meth.name][2]}")
            continue
        if time.perf_counter() > deadline:
            results.append(dict(method=meth.name, longest_L=None, status=f"skipped: --max-seconds {args.max_seconds:g}",
                                trials=[]))
            prog.step(f"{meth.name}: skipped (time budget)")
            continue
        log(f"{meth.name}: searching L in [{step}, {step_ceiling + step}) ...")
        longest, trials, note = search(lambda L, mm=meth: trial(mm, 1, L), cap, step, step_ceiling + step, start, deadline)
        frac = longest / ceiling if longest else 0.0
        status = note or "ok"
        results.append(dict(method=meth.name, longest_L=longest, fraction_of_ceiling=frac, status=status,
                            lower_bound=bool(note), trials=trials))
        prog.step(f"{meth.name}: longest L = {longest:,d} ({frac:.3f} of the ceiling){'; ' + note if note else ''}")

    res = dict(meta=m, cap_bytes=cap, B=1, H=H, E=E, dtype=dtype_name, causal=args.causal, step=step,
               ceiling_L=ceiling, goal_fraction=0.85, measure=(
                   "torch.cuda.max_memory_allocated under set_per_process_memory_fraction" if rt.cuda and not rt.fake
                   else "fake CUDA: process RSS" if rt.fake else
                   "peak RSS growth in a fresh process per trial, compared with the cap" if not in_process
                   else "peak RSS growth in one process (smoke run)"),
               batch_case=batch, longest=results, runtime_s=time.perf_counter() - t_start)
    path = common.out_path(args, "budget", rt.kind)
    common.write_results(path, "bench/budget.py", m, res, tables, draw)
    log(f"total {res['runtime_s']:.1f} s")
    return res


def tables(res, markdown=False):
    rows = []
    for r in res["longest"]:
        if r.get("longest_L") is None:
            rows.append([r["method"], common.short(r["status"]), "", "", ""])
            continue
        peak = max((t["peak_bytes"] or 0 for t in r["trials"] if t["fits"]), default=0)
        rows.append([r["method"], f"{r['longest_L']:,d}" + (" (>=)" if r.get("lower_bound") else ""),
                     f"{r['fraction_of_ceiling']:.3f}", f"{peak / MiB:,.0f}", str(len(r["trials"]))])
    title = (f"longest forward+backward L under {res['cap_bytes'] / GiB:g} GiB, B=1 H={res['H']} E={res['E']} "
             f"{res['dtype']}{' causal' if res['causal'] else ''}; ceiling L = {res['ceiling_L']:,.0f} "
             f"(effattn goal: >= {res['goal_fraction']} of it)")
    out = [(title, common.table(["method", "longest L", "of ceiling", "peak MiB", "trials"], rows, markdown))]
    if res["batch_case"]:
        brows = []
        for r in res["batch_case"]:
            if r.get("fits"):
                brows.append([r["method"], "yes", f"{r['peak_bytes'] / MiB:,.0f}", f"{r['room_bytes'] / MiB:,.0f}",
                              f"{r['seconds']:.2f}"])
            else:
                brows.append([r["method"], common.short(r["status"]), "", "", ""])
        b = next(r for r in res["batch_case"] if "L" in r) if any("L" in r for r in res["batch_case"]) else {}
        cap = next((r["cap_bytes"] for r in res["batch_case"] if "cap_bytes" in r), res["cap_bytes"])
        out.append((f"the 800-step case: B={b.get('B', '?')} L={b.get('L', '?')} H={res['H']} E={res['E']}, "
                    f"cap {cap / GiB:g} GiB",
                    common.table(["method", "fits", "peak MiB", "room MiB", "s (one fwd+bwd, incl. setup)"],
                                 brows, markdown)))
    return out


def draw(res):
    def fig(plt):
        rows = [r for r in res["longest"] if r.get("longest_L")]
        f, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.6))
        names = [r["method"] for r in rows]
        ax.barh(names, [r["longest_L"] for r in rows],
                color=["tab:green" if n.startswith("effattn") else "tab:gray" for n in names])
        ax.axvline(res["ceiling_L"], color="k", linestyle="--", label="ceiling (8 tensors fill the cap)")
        ax.axvline(res["goal_fraction"] * res["ceiling_L"], color="tab:red", linestyle=":", label="goal 0.85")
        ax.set_xlabel("longest L (forward+backward)")
        ax.invert_yaxis()
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title(f"under {res['cap_bytes'] / GiB:g} GiB, B=1 H={res['H']} E={res['E']} {res['dtype']}: "
                     f"{res['meta']['device_name']}", fontsize=9)
    return fig


if __name__ == "__main__":
    main()
