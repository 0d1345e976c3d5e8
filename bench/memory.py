#!/usr/bin/env python3
"""Peak memory of one forward+backward, and the extra beyond inputs, outputs and gradients.

    python3 bench/memory.py                    # GPU if there is one, else CPU
    python3 bench/memory.py --device cpu       # L 256 .. 4096, float32, each run in a fresh process
    python3 bench/memory.py --quick            # tiny grid: a smoke run

For each cell (case, B, H, L = S, E) and method (the same methods as speed.py), one
out = attention(q, k, v); dq, dk, dv = autograd.grad(out, (q, k, v), dout):
  CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus what was
        allocated just before (the inputs q, k, v, dout and a mask); one warm-up run of the same
        cell first, so one-time allocations (cuBLAS workspace, compiles) are not counted.
  CPU:  each run in a fresh process (this script with --worker), peak RSS growth (VmHWM after
        /proc/self/clear_refs reset it) over the RSS with the inputs allocated, after a tiny
        warm-up call; minus a baseline process that only allocates and fills tensors the size of
        the output and the three gradients (so the allocator's own behaviour cancels).
peak = growth during the forward+backward (output and gradients included);
extra = peak - (output + gradients) (CUDA: their bytes; CPU: the baseline's growth).
Expected: effattn's extra is O(B*H*L) (the LSE, delta, a float32 dQ accumulator), constant per
(b, h, row); the naive math's is O(B*H*L*S), constant per (b, h, row, column).

Writes bench/results/memory-<device>.json (+ .md, + .png).
"""
import argparse
import json
import subprocess
import sys

import torch

import common
from common import MiB, log


def grid(rt, quick):
    if quick:
        return [("dense", 64, [64, 128]), ("padded", 64, [128])]
    if rt.cuda:
        return [("dense", 64, [1024, 2048, 4096, 8192, 16384]), ("causal", 64, [4096, 16384]),
                ("dense", 128, [4096, 16384]), ("padded", 64, [4096, 16384])]
    return [("dense", 64, [256, 512, 1024, 2048, 4096]), ("causal", 64, [4096]), ("dense", 128, [4096]),
            ("padded", 64, [1024, 4096])]


def shape(rt, quick):
    """(B, H): fixed over L so that extra memory shows its growth in L directly."""
    return (2, 2) if quick else ((2, 16) if rt.cuda else (2, 4))


def nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


def measure_in_process(rt, method, kind, B, H, L, E, dtype, warmup=True):
    """{peak_bytes, io_bytes, inputs_bytes} of one forward+backward (CUDA counters, or fake)."""
    q, k, v, dout = common.make_inputs(rt, B, H, L, E, dtype)
    case = common.make_case(rt, kind, B, L, dout)

    def run():
        out = method.call(q, k, v, case)
        return out, torch.autograd.grad(out, (q, k, v), dout)

    if warmup:
        r = run()
        del r
        rt.cleanup()
    rt.reset_peak()
    base = rt.allocated()
    out, grads = run()
    peak = rt.peak() - base
    res = dict(peak_bytes=peak, io_bytes=nbytes(out, *grads), inputs_bytes=nbytes(q, k, v, dout))
    del out, grads
    return res


def worker(spec):
    """A fresh process: one method's (or the baseline's) peak RSS growth, printed as JSON."""
    rt = common.Runtime("cpu")
    dtype = common.DTYPES[spec["dtype"]]
    B, H, L, E, kind = spec["B"], spec["H"], spec["L"], spec["E"], spec["kind"]
    if spec["method"] == "baseline":
        q = torch.randn(B, H, L, E, dtype=dtype)
        common.reset_rss_peak()
        before = common.proc_kib("VmRSS")
        ts = [torch.empty_like(q).normal_() for _ in range(4)]  # output + dq, dk, dv
        print(json.dumps(dict(peak_bytes=(common.proc_kib("VmHWM") - before) * 1024, io_bytes=nbytes(*ts))))
        return
    method = next(m for m in common.all_methods(rt, dtype, include_flex=False) if m.name == spec["method"])
    small = common.make_inputs(rt, 1, 1, 64, E, dtype)  # one-time initialisation (thread pools, ...)
    scase = common.make_case(rt, kind, 1, 64, small[3])
    torch.autograd.grad(method.call(*small[:3], scase), small[:3], small[3])
    q, k, v, dout = common.make_inputs(rt, B, H, L, E, dtype)
    case = common.make_case(rt, kind, B, L, dout)
    common.reset_rss_peak()
    before = common.proc_kib("VmRSS")
    out = method.call(q, k, v, case)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    print(json.dumps(dict(peak_bytes=(common.proc_kib("VmHWM") - before) * 1024, io_bytes=nbytes(out, *grads),
                          inputs_bytes=nbytes(q, k, v, dout))))


def measure_subprocess(spec):
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    if spec.get("threads"):
        cmd += ["--threads", str(spec["threads"])]
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        err = (p.stderr.strip().splitlines() or ["exit code %d" % p.returncode])[-1]
        if p.returncode in (-9, 137):
            err = "out of memory (killed)"
        raise RuntimeError(err)
    return json.loads(lines[-1])


def cell(rt, methods, valid, kind, B, H, L, E, dtype_name, threads, in_process):
    dtype = common.DTYPES[dtype_name]
    rows = []
    base = None
    if not in_process:
        base = measure_subprocess(dict(method="baseline", kind=kind, B=B, H=H, L=L, E=E, dtype=dtype_name,
                                       threads=threads))
    for m in methods:
        ok, _, status = valid[(m.name, kind, E)]
        row = dict(method=m.name)
        if not ok:
            row["status"] = status
            rows.append(row)
            continue
        try:
            if in_process:
                r = measure_in_process(rt, m, kind, B, H, L, E, dtype)
                extra = r["peak_bytes"] - r["io_bytes"]
            else:
                r = measure_subprocess(dict(method=m.name, kind=kind, B=B, H=H, L=L, E=E, dtype=dtype_name,
                                            threads=threads))
                extra = r["peak_bytes"] - base["peak_bytes"]
                r["baseline_bytes"] = base["peak_bytes"]
            row.update(r, status="ok", extra_bytes=extra, extra_per_row=extra / (B * H * L),
                       extra_per_score=extra / (B * H * L * L))
        except Exception as exc:  # noqa: BLE001
            row["status"] = common.classify_error(exc)
        rt.cleanup()
        rows.append(row)
    return rows


def tables(res, markdown=False):
    out = []
    for s in res["series"]:
        cells = [c for c in res["cells"] if c["kind"] == s["kind"] and c["E"] == s["E"]]
        rows = []
        for c in cells:
            score = c["B"] * c["H"] * c["L"] * c["L"] * c["itemsize"]
            for r in c["rows"]:
                if r["status"] != "ok":
                    rows.append([c["L"], r["method"], common.short(r["status"])] + [""] * 4)
                    continue
                rows.append([c["L"], r["method"], f"{r['peak_bytes'] / MiB:.1f}", f"{r['extra_bytes'] / MiB:.1f}",
                             f"{r['extra_per_row']:.1f}", f"{r['extra_per_score']:.2f}",
                             f"{r['extra_bytes'] / score:.2f}"])
        B, H = cells[0]["B"], cells[0]["H"]
        out.append((f"{s['kind']}, E={s['E']}, B={B}, H={H}, {res['dtype']}: forward+backward peak and extra memory",
                    common.table(["L", "method", "peak MiB", "extra MiB", "extra B/(b,h,row)",
                                  "extra B/(b,h,row,col)", "extra / one score tensor"], rows, markdown)))
    return out


def draw(res):
    def fig(plt):
        series = res["series"]
        f, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.8), squeeze=False)
        for j, s in enumerate(series):
            ax = axes[0][j]
            cells = [c for c in res["cells"] if c["kind"] == s["kind"] and c["E"] == s["E"]]
            for name in res["methods"]:
                pts = [(c["L"], max(r["extra_bytes"], 1) / MiB) for c in cells for r in c["rows"]
                       if r["method"] == name and r["status"] == "ok"]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name, linewidth=2.5 if name.startswith("effattn") else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{s['kind']} E={s['E']}: extra memory", fontsize=9)
            ax.set_xlabel("L = S")
            ax.set_ylabel("MiB beyond inputs, output, gradients")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        f.tight_layout(rect=(0, 0, 1, 0.95))
        f.suptitle(f"forward+backward memory, {res['dtype']}: {res['meta']['device_name']}", fontsize=10)
    return fig


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(ap)
    ap.add_argument("--dtype", default=None, choices=sorted(common.DTYPES))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(json.loads(args.worker))
        return None
    rt = common.Runtime(args.device)
    dtype_name = args.dtype or ("bfloat16" if rt.cuda else "float32")
    dtype = common.DTYPES[dtype_name]
    # FlexAttention: the CPU has no flex backward; on CUDA it is measured like the others
    methods = common.select_methods(common.all_methods(rt, dtype, include_flex=rt.cuda and not args.quick),
                                    args.methods)
    m = common.meta(rt, "memory.py", argv)
    log(common.stamp(m))
    log("methods: " + ", ".join(x.name for x in methods))
    series = grid(rt, args.quick)
    B, H = shape(rt, args.quick)
    cells = sorted([(k, e, L) for k, e, Ls in series for L in Ls], key=lambda c: c[2])
    prog = common.Progress(len(cells), args.max_seconds)  # the budget's clock starts before validation
    valid = {}
    for kind, E in sorted({(k, e) for k, e, _ in series}):
        for meth in methods:
            valid[(meth.name, kind, E)] = common.validate(rt, meth, kind, E, dtype, L=64)
            if not valid[(meth.name, kind, E)][0]:
                log(f"check {meth.name} {kind} E={E}: {valid[(meth.name, kind, E)][2]}")
    in_process = rt.cuda or args.quick  # CPU: a fresh process per run, except in the smoke run
    out_cells = []
    itemsize = torch.empty((), dtype=dtype).element_size()
    for kind, E, L in cells:
        if prog.over_budget():
            rows = [dict(method=x.name, status=f"skipped: --max-seconds {args.max_seconds:g}") for x in methods]
        else:
            rows = cell(rt, methods, valid, kind, B, H, L, E, dtype_name, args.threads, in_process)
        out_cells.append(dict(kind=kind, E=E, L=L, B=B, H=H, itemsize=itemsize, rows=rows))
        prog.step(f"{kind:7s} E={E} L={L:<6d}: extra MiB " + ", ".join(
            f"{r['method']} {r['extra_bytes'] / MiB:.1f}" if r["status"] == "ok" else f"{r['method']} {common.short(r['status'])}"
            for r in rows))
    res = dict(meta=m, dtype=dtype_name, methods=[x.name for x in methods],
               method_notes={x.name: x.note for x in methods},
               measure=("torch.cuda.max_memory_allocated growth" if rt.cuda and not rt.fake else
                        "fake CUDA: process RSS" if rt.fake else "peak RSS growth, fresh process per run"
                        if not in_process else "peak RSS growth in one process (smoke run: undercounts)"),
               series=[dict(kind=k, E=e, L=ls) for k, e, ls in series],
               cells=sorted(out_cells, key=lambda c: (c["kind"], c["E"], c["L"])), runtime_s=prog.elapsed())
    path = common.out_path(args, "memory", rt.kind)
    common.write_results(path, "bench/memory.py", m, res, tables, draw)
    log(f"total {prog.elapsed():.1f} s")
    return res


if __name__ == "__main__":
    main()
