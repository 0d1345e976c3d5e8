#!/usr/bin/env python3
"""effattn vs PyTorch SDPA vs naive math, forward+backward, side by side.

The case: attention between two RNNs of an OCR model over ~800-step sequences,
which ran out of memory on an 8 GB GPU written as softmax(q @ k^T) @ v (autograd
keeps (B, H, L, S) score tensors for the backward).

    python3 bench/demo.py            # B=8 H=8 L=S=800 E=64 fp32 on CPU; B=32 bf16 on CUDA
    python3 bench/demo.py --quick    # tiny smoke run, a few seconds
    python3 bench/demo.py --seq 2048 --causal --device cpu

Each method runs in a fresh process (this script with --worker METHOD) so that
its peak memory is its own: on CPU the peak RSS growth over the RSS just before
the first full-size forward+backward (inputs allocated), on CUDA
max_memory_allocated minus what was allocated then; both include the q/k/v
gradients. Errors: max abs difference from float64 math on batch element 0
(output, and the q/k/v gradients for a fixed random upstream gradient). Times:
medians of up to --iters runs; a slow method gets fewer (--budget seconds each).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from common import proc_kib  # bench/common.py (this script's folder is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the checkout's effattn (built with setup.py build_ext --inplace)
try:
    import effattn
except ImportError as exc:
    sys.exit(f"cannot import effattn ({exc}); build it first: python setup.py build_ext --inplace")

METHODS = ["effattn", "sdpa", "naive"]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
MiB = 2 ** 20


def naive(q, k, v, causal):
    """What one writes by hand (and what ran out of memory): the full score matrix."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if causal:
        L, S = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1),
                                    float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def run_method(method, q, k, v, causal):
    if method == "effattn":
        return effattn.attention(q, k, v, is_causal=causal)
    if method == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return naive(q, k, v, causal)


def which_kernel(method, q, k, v, causal):
    """The backend/kernel that actually serves the call, and a note (e.g. a fallback warning)."""
    if method == "effattn":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            name = effattn.backends.select(effattn.make_spec(q, k, v, is_causal=causal)).name
        return name, "; ".join(str(w.message) for w in caught)
    if method == "sdpa":
        try:  # the dispatcher's own choice (private API: fall back to a plain label)
            from torch.nn.attention import SDPBackend
            choice = SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, causal))
            return "sdpa:" + choice.name.lower(), ""
        except Exception:
            return "sdpa", ""
    return "matmul+softmax", ""


def measure(method, args):
    """Memory, times and errors of one method (run in a fresh process unless --quick)."""
    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def inputs(L):
        torch.manual_seed(0)
        shape = (args.batch, args.heads, L, args.dim)
        return [torch.randn(shape, device=dev, dtype=dt, requires_grad=i < 3) for i in range(4)]

    def mark():  # a point in time: a recorded CUDA event, or the CPU clock
        if cuda:
            (ev := torch.cuda.Event(enable_timing=True)).record()
            return ev
        return time.perf_counter()

    def ms(a, b):
        return a.elapsed_time(b) if cuda else (b - a) * 1e3

    def step():  # one forward+backward: (output, [t_start, t_forward_done, t_backward_done])
        q.grad = k.grad = v.grad = None
        t = [mark()]
        out = run_method(method, q, k, v, args.causal)
        t.append(mark())
        out.backward(dout)
        t.append(mark())
        sync()
        return out, t

    q, k, v, dout = inputs(min(args.seq, 64))
    step()  # pays the one-time initialisation (thread pools, libraries) outside the memory run
    q, k, v, dout = inputs(args.seq)
    kernel, note = which_kernel(method, q, k, v, args.causal)  # records a fallback warning, if any

    # 1) peak memory of the first full-size forward+backward (it doubles as a warm-up)
    t_one = time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        step()
        peak, mem_kind = torch.cuda.max_memory_allocated(dev) - base, "cuda max_memory_allocated"
    else:
        try:  # reset the peak-RSS mark to the current RSS (Linux >= 4.0); else ru_maxrss, an upper bound
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            high, mem_kind = (lambda: proc_kib("VmHWM")), "peak RSS growth"
        except OSError:
            high, mem_kind = (lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), "ru_maxrss growth"
        before = proc_kib("VmRSS")
        step()
        peak = (high() - before) * 1024
    t_one = time.perf_counter() - t_one
    for _ in range(args.warmup - 1):
        step()
    iters = max(1, min(args.iters, int(args.budget / t_one)))  # fewer runs for a slow method

    # 2) timing: forward, and forward+backward, of the same iterations
    fwd, total = [], []
    for _ in range(iters):
        out, t = step()
        fwd.append(ms(t[0], t[1]))
        total.append(ms(t[0], t[2]))

    # 3) accuracy on the first batch element against float64 math
    q64, k64, v64 = (t[:1].detach().double().requires_grad_() for t in (q, k, v))
    ref = naive(q64, k64, v64, args.causal)
    ref.backward(dout[:1].double())
    err_out = (out[:1].double() - ref).abs().max().item()
    err_grad = max((a.grad[:1].double() - b.grad).abs().max().item()
                   for a, b in ((q, q64), (k, k64), (v, v64)))
    return dict(method=method, kernel=kernel, note=note, iters=iters, fwd_ms=statistics.median(fwd),
                fwdbwd_ms=statistics.median(total), peak_bytes=peak, mem_kind=mem_kind,
                err_out=err_out, err_grad=err_grad)


def device_name(dev):
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    with open("/proc/cpuinfo") as f:
        name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "CPU")
    return f"{name}, {torch.get_num_threads()} threads"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, help="default 8 on CPU, 32 on CUDA, 1 with --quick")
    p.add_argument("--heads", type=int, help="default 8 (2 with --quick)")
    p.add_argument("--seq", type=int, help="L = S, default 800 (128 with --quick)")
    p.add_argument("--dim", type=int, help="head dim E, default 64 (32 with --quick)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--warmup", type=int, help="warm-up runs; the first also measures memory")
    p.add_argument("--iters", type=int, help="timed runs (the median is reported)")
    p.add_argument("--budget", type=float, default=10.0,
                   help="seconds of timed runs per method: a slower method gets fewer than --iters")
    p.add_argument("--methods", default=",".join(METHODS), help="subset of " + ",".join(METHODS))
    p.add_argument("--quick", action="store_true", help="tiny smoke run, all in this process")
    p.add_argument("--out", help="JSON path (default bench/results/demo-<device>[-quick].json)")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device here")
    small = args.quick
    args.batch = args.batch or (1 if small else 32 if cuda else 8)
    args.heads = args.heads or (2 if small else 8)
    args.seq = args.seq or (128 if small else 800)
    args.dim = args.dim or (32 if small else 64)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.warmup = args.warmup or (5 if cuda and not small else 1)
    args.iters = args.iters or (2 if small else 20 if cuda else 3)
    return args


def main():
    args = parse_args()
    warnings.simplefilter("ignore")  # which_kernel() records effattn's fallback warning as a note
    if args.worker:
        print(json.dumps(measure(args.worker, args)))
        return 0
    dev = torch.device(args.device)
    t_start = time.perf_counter()
    B, H, L, E, dt = args.batch, args.heads, args.seq, args.dim, DTYPES[args.dtype]
    item = torch.empty((), dtype=dt).element_size()
    score_bytes = B * H * L * L * item
    header = (f"{device_name(dev)} | torch {torch.__version__} | effattn {effattn.__version__} | "
              f"B={B} H={H} L=S={L} E={E} {args.dtype}{' causal' if args.causal else ''}")
    print(header)
    print(f"one L x S score matrix: {L * L * item / MiB:.2f} MiB per (batch, head) in {args.dtype}; "
          f"the whole (B, H, L, S) tensor: {score_bytes / MiB:.1f} MiB")
    rows = []
    methods = [m for m in args.methods.split(",") if m]
    for i, m in enumerate(methods, 1):
        print(f"[{i}/{len(methods)}] {m}: 1 memory run + {args.warmup - 1} warm-up + <={args.iters} timed "
              f"forward+backward{'' if args.quick else ' in a fresh process'} ...", flush=True)
        t0 = time.perf_counter()
        if args.quick:  # in-process: fast, but the memory numbers are then not each method's own
            r = measure(m, args)
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", m] + [
                f"--{a}={getattr(args, a)}" for a in ("device", "batch", "heads", "seq", "dim", "dtype",
                                                      "warmup", "iters", "budget")] + ["--causal"] * args.causal
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            lines = proc.stdout.strip().splitlines()
            if proc.returncode != 0 or not lines:
                print(f"      FAILED (exit code {proc.returncode})")
                rows.append(dict(method=m, failed=True, exit_code=proc.returncode))
                continue
            r = json.loads(lines[-1])
        print(f"      done in {time.perf_counter() - t0:.1f} s ({r['iters']} timed)"
              + (f"; note: {r['note']}" if r["note"] else ""))
        rows.append(r)

    sdpa = next((r for r in rows if r["method"] == "sdpa" and not r.get("failed")), None)
    cols = ["method", "backend/kernel", "fwd ms", "fwd+bwd ms", "peak MiB", "peak/LxS",
            "err out", "err grad", "fwd+bwd/SDPA"]
    table = [cols]
    for r in rows:
        if r.get("failed"):
            table.append([r["method"], "FAILED"] + [""] * (len(cols) - 2))
            continue
        r["peak_over_scores"] = r["peak_bytes"] / score_bytes
        r["fwdbwd_over_sdpa"] = r["fwdbwd_ms"] / sdpa["fwdbwd_ms"] if sdpa else None
        table.append([r["method"], r["kernel"], f"{r['fwd_ms']:.1f}", f"{r['fwdbwd_ms']:.1f}",
                      f"{r['peak_bytes'] / MiB:.1f}", f"{r['peak_over_scores']:.2f}",
                      f"{r['err_out']:.1e}", f"{r['err_grad']:.1e}",
                      f"{r['fwdbwd_over_sdpa']:.2f}x" if sdpa else "-"])
    widths = [max(len(row[c]) for row in table) for c in range(len(cols))]
    print()
    for n, row in enumerate(table):
        print("  ".join(s.ljust(w) if c < 2 else s.rjust(w) for c, (s, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    mem_kind = next((r["mem_kind"] for r in rows if "mem_kind" in r), "")
    print(f"\npeak = {mem_kind}{' (in one process: not each method on its own)' if args.quick else ''} "
          f"during the first full-size forward+backward, incl. the q/k/v gradients; "
          f"peak/LxS = peak / {score_bytes / MiB:.1f} MiB;\nerr = max abs error vs float64 math on "
          f"batch element 0; fwd+bwd/SDPA > 1 means slower than SDPA; times are medians of the timed runs.")
    runtime = time.perf_counter() - t_start
    print(f"total runtime {runtime:.1f} s")

    out = args.out or os.path.join(ROOT, "bench", "results",
                                   f"demo-{dev.type}{'-quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(header=header, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       command="python bench/demo.py " + " ".join(sys.argv[1:]),
                       device=dev.type, device_name=device_name(dev),
                       torch=torch.__version__, effattn=effattn.__version__,
                       shape=dict(B=B, H=H, L=L, S=L, E=E), dtype=args.dtype, causal=args.causal,
                       warmup=args.warmup, iters=args.iters, score_matrix_bytes=score_bytes,
                       runtime_s=runtime, results=rows), f, indent=2)
    print(f"wrote {os.path.relpath(out)}")
    return 1 if any(r.get("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
