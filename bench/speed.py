#!/usr/bin/env python3
"""Forward, backward and forward+backward time and FLOP rate of every attention method here.

    python3 bench/speed.py                     # GPU if there is one, else CPU
    python3 bench/speed.py --device cpu        # L 256 .. 4096, float32 (a few minutes on 2 cores)
    python3 bench/speed.py --quick             # tiny grid: a smoke run, not a timing
    python3 bench/speed.py --methods effattn,sdpa:flash,naive --max-seconds 120

Methods, all in this process on the same inputs (bench/common.py): every effattn backend that
can serve the call (from effattn.backends), the naive math (softmax(q k^T) v, the score matrix
materialised), SDPA with each of its backends selected explicitly (sdpa_kernel: flash,
efficient, cudnn, math; on the CPU flash and math), FlexAttention (torch.compile(flex_attention),
block masks for causal and padding; forward only on the CPU, which has no flex backward), and
xformers' memory_efficient_attention if it is importable (CUDA).

Grid: series (case, head dim) over L = S:
  dense E=64, causal E=64, dense E=128, padded E=64 (half of the batch at half length).
  GPU: bfloat16, L in 512 .. 16384, B = 16384 / L (B >= 2 for padded), H = 1024 / E.
  CPU: float32, L in 256 .. 4096 (the other series at fewer L), B = 4096 / L, H = 512 / E.
Padded batches: effattn gets key_lengths and query_lengths (the lengths a user has; rows past a
length return zeros), FlexAttention a block mask from the same lengths, SDPA and the naive math
the equivalent dense (B, 1, 1, S) bool key mask (SDPA's flash kernel takes no mask: recorded as
unsupported). The upstream gradient of padding rows is zero for every method. FLOP rates of
padded cells count the useful work (sum over the batch of 4*H*len^2*E), the same for all methods.

FLOPs: 4*B*H*L*S*E forward, halved for causal; backward 2.5x the forward (common.flops).
Timing: CUDA: triton.testing.do_bench (median, L2 cache flushed before each run). CPU: the
median of --iters runs after a warm-up, the methods of a cell timed round-robin. Forward: the
training forward (inputs require grad); backward: autograd.grad through a retained graph.
Every method is checked against float64 math at a small size before it is timed (a method that
fails is recorded as "invalid" and not timed); a cell that runs out of memory or is not
supported is recorded as "OOM" / "unsupported: why".

Writes bench/results/speed-<device>.json (+ .md table, + .png plot).
"""
import argparse
import json
import sys

import torch

import common
from common import log

MODES = ["fwd", "bwd", "fwd+bwd"]


def grid(rt, quick):
    """[(kind, E, [L...])] and B, H, dtype as functions of the cell."""
    if quick:
        return [("dense", 64, [128]), ("causal", 64, [128]), ("dense", 128, [128]), ("padded", 64, [128])]
    if rt.cuda:
        Ls = [512, 1024, 2048, 4096, 8192, 16384]
        return [("dense", 64, Ls), ("causal", 64, Ls), ("dense", 128, [1024, 4096, 16384]),
                ("padded", 64, [1024, 4096, 16384])]
    return [("dense", 64, [256, 512, 1024, 2048, 4096]), ("causal", 64, [1024, 4096]),
            ("dense", 128, [1024, 4096]), ("padded", 64, [1024, 4096])]


def shape(rt, quick, kind, L, E):
    if quick:
        return 2, 2
    tokens, width = (16384, 1024) if rt.cuda else (4096, 512)
    B = max(2 if kind == "padded" else 1, tokens // L)
    return B, width // E


def mode_fn(method, mode, q, k, v, dout, case):
    """A callable running one mode (method.raw: the caller holds method.context() open), keeping
    alive what it needs (the retained graph of the backward)."""
    if mode == "fwd":
        return lambda: method.raw(q, k, v, case, need_grad=False)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(method.raw(q, k, v, case), (q, k, v), dout)
    out = method.raw(q, k, v, case)  # backward alone: one forward, then the graph is reused
    if not out.requires_grad:
        raise common.Unsupported("no backward")
    return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)


def in_context(context, fn):
    def run():
        with context():
            return fn()
    return run


def run_cell(rt, methods, valid, kind, B, H, L, E, dtype, iters):
    """[{method, mode, ms | status}] for one (case, B, H, L, E)."""
    rows = []
    try:
        q, k, v, dout = common.make_inputs(rt, B, H, L, E, dtype)
    except Exception as exc:  # noqa: BLE001
        return [dict(method=m.name, mode=md, status=common.classify_error(exc)) for m in methods for md in MODES]
    case = common.make_case(rt, kind, B, L, dout)
    for mode in MODES:
        fns, status, times = {}, {}, {}
        for m in methods:
            v_ok, _, v_status = valid[(m.name, kind, E)]
            if not v_ok and not (mode == "fwd" and v_status.startswith("forward only")):
                status[m.name] = v_status
                continue
            try:
                with m.context():  # e.g. sdpa_kernel([backend]), entered once, not per timed call
                    fn = mode_fn(m, mode, q, k, v, dout, case)
                    fn()  # one run: compiles, warms up, and says whether the cell fits
                    rt.sync()
                    if rt.cuda:  # do_bench, one method at a time; its graph is dropped before the next
                        times.update(rt.time_ms({m.name: fn}))
                if not rt.cuda:
                    fns[m.name] = in_context(m.context, fn)
            except Exception as exc:  # noqa: BLE001  (OOM / unsupported per cell)
                status[m.name] = common.classify_error(exc)
            fn = None
            rt.cleanup()
        if fns:  # CPU: the methods of the cell round-robin
            times = rt.time_ms(fns, iters=iters)
        fns = None
        rt.cleanup()
        fl = common.case_flops(case, B, H, L, E, mode)
        for m in methods:
            row = dict(method=m.name, mode=mode, flops=fl)
            if m.name in times:
                row.update(ms=times[m.name], tflops=fl / times[m.name] / 1e9, status="ok")
            else:
                row["status"] = status.get(m.name, "not run")
            rows.append(row)
    return rows


def cell_text(r, scale=1.0):
    """ "ms (rate)": rate in TFLOP/s (scale 1) or GFLOP/s (scale 1000)."""
    if r.get("status") != "ok":
        return common.short(r.get("status"))
    return f"{common.fmt_ms(r['ms'])} ({r['tflops'] * scale:.3g})"


def tables(res, markdown=False):
    """One table per series: rows (L, mode), columns methods, cells "ms (TFLOP/s)"."""
    out = []
    names = res["methods"]
    scale, unit = (1, "TFLOP/s") if res["meta"]["device"] == "cuda" else (1e3, "GFLOP/s")
    for s in res["series"]:
        rows = []
        for c in [c for c in res["cells"] if c["kind"] == s["kind"] and c["E"] == s["E"]]:
            for mode in MODES:
                by = {r["method"]: r for r in c["rows"] if r["mode"] == mode}
                rows.append([f"{c['L']}", mode] + [cell_text(by[n], scale) if n in by else "-" for n in names])
        title = (f"{s['kind']}, E={s['E']}, {res['dtype']}: ms ({unit}); "
                 f"(B, H) per L: " + ", ".join(f"{c['L']}: ({c['B']}, {c['H']})" for c in res["cells"]
                                               if c["kind"] == s["kind"] and c["E"] == s["E"]))
        out.append((title, common.table(["L", "mode"] + names, rows, markdown)))
    return out


def draw(res):
    def fig(plt):
        series = res["series"]
        f, axes = plt.subplots(2, len(series), figsize=(4.2 * len(series), 7), squeeze=False)
        scale, unit = (1, "TFLOP/s") if res["meta"]["device"] == "cuda" else (1e3, "GFLOP/s")
        for j, s in enumerate(series):
            cells = [c for c in res["cells"] if c["kind"] == s["kind"] and c["E"] == s["E"]]
            for i, mode in enumerate(["fwd", "fwd+bwd"]):
                ax = axes[i][j]
                for name in res["methods"]:
                    pts = [(c["L"], r["tflops"] * scale) for c in cells for r in c["rows"]
                           if r["method"] == name and r["mode"] == mode and r.get("status") == "ok"]
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=name,
                                linewidth=2.5 if name.startswith("effattn") else 1.2)
                ax.set_xscale("log", base=2)
                ax.set_title(f"{s['kind']} E={s['E']} {mode}", fontsize=9)
                ax.set_xlabel("L = S")
                ax.set_ylabel(unit)
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        f.tight_layout(rect=(0, 0, 1, 0.95))
        f.suptitle(f"attention speed, {res['dtype']}: {res['meta']['device_name']}", fontsize=10)
    return fig


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(ap)
    ap.add_argument("--iters", type=int, default=None, help="CPU: timed runs per cell (median); default 3")
    ap.add_argument("--dtype", default=None, choices=sorted(common.DTYPES),
                    help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--kinds", default=None, help="series to run: comma-separated of dense,causal,padded "
                    "(default all)")
    ap.add_argument("--no-flex", action="store_true", help="leave FlexAttention out (its compiles take time)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rt = common.Runtime(args.device)
    dtype_name = args.dtype or ("bfloat16" if rt.cuda else "float32")
    dtype = common.DTYPES[dtype_name]
    iters = 1 if args.quick else (args.iters or 3)
    # flex on a CPU compiles C++ for ~20 s: left out of quick CPU runs unless asked for by name
    flex = not args.no_flex and not (args.quick and rt.device.type == "cpu" and "flex" not in (args.methods or ""))
    methods = common.select_methods(common.all_methods(rt, dtype, include_flex=flex), args.methods)
    m = common.meta(rt, "speed.py", argv)
    log(common.stamp(m))
    log("methods: " + ", ".join(x.name for x in methods))

    series = grid(rt, args.quick)
    if args.kinds:
        series = [x for x in series if x[0] in args.kinds.split(",")]
    cells = [(kind, E, L) for kind, E, Ls in series for L in Ls]
    cells.sort(key=lambda c: c[2])  # short sequences first: a time budget cuts the longest
    # the budget's clock starts here: validation (FlexAttention's first compiles) counts
    prog = common.Progress(len(cells), args.max_seconds)
    path = common.out_path(args, "speed", rt.kind)
    # validation: each method, each case kind and head dim, at a small size against float64
    valid = {}
    for kind, E in sorted({(k, e) for k, e, _ in series}):
        for meth in methods:
            ok, err, status = common.validate(rt, meth, kind, E, dtype, L=64 if args.quick else 256)
            valid[(meth.name, kind, E)] = (ok, err, status)
            log(f"check {meth.name:18s} {kind:7s} E={E:<4d}: "
                + (f"max rel. error {err:.1e} " if err is not None else "") + status)
    out_cells = []

    def result(complete):
        return dict(meta=m, dtype=dtype_name, methods=[x.name for x in methods],
                    method_notes={x.name: x.note for x in methods},
                    series=[dict(kind=k, E=e, L=ls) for k, e, ls in series],
                    validation={f"{n}|{k}|E={e}": dict(ok=ok, max_rel_error=err, status=st)
                                for (n, k, e), (ok, err, st) in valid.items()},
                    cells=sorted(out_cells, key=lambda c: (c["kind"], c["E"], c["L"])),
                    complete=complete, runtime_s=prog.elapsed())

    for kind, E, L in cells:
        B, H = shape(rt, args.quick, kind, L, E)
        if prog.over_budget():
            rows = [dict(method=x.name, mode=md, status=f"skipped: --max-seconds {args.max_seconds:g}")
                    for x in methods for md in MODES]
        else:
            rows = run_cell(rt, methods, valid, kind, B, H, L, E, dtype, iters)
        out_cells.append(dict(kind=kind, E=E, L=L, B=B, H=H, rows=rows))
        fb = {r["method"]: r for r in rows if r["mode"] == "fwd+bwd"}
        prog.step(f"{kind:7s} E={E} L={L:<6d} B={B} H={H} fwd+bwd: "
                  + ", ".join(f"{n} {cell_text(r, 1 if rt.cuda else 1e3)}" for n, r in fb.items()))
        with open(path, "w") as f:  # partial results survive a hard timeout
            json.dump(result(False), f, indent=1, default=str)

    res = result(True)
    common.write_results(path, "bench/speed.py", m, res, tables, draw)
    log(f"total {prog.elapsed():.1f} s")
    return res


if __name__ == "__main__":
    main()
