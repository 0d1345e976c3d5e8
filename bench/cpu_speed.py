#!/usr/bin/env python3
"""effattn's CPU kernel against PyTorch's own CPU attention, side by side in one run.

    python3 bench/cpu_speed.py             # the full table (a few minutes on 2 cores)
    python3 bench/cpu_speed.py --quick     # tiny smoke run (CI): checks the script, not the speed

Sections (each row: effattn and its peer measured in this process, same inputs):
  headline  forward and forward+backward at (B, H, L, E) = (8, 8, 800, 64) and
            (1, 8, 4096, 64), float32 and bfloat16, against
            torch.nn.functional.scaled_dot_product_attention on CPU tensors;
  causal    is_causal at L = 4096 against effattn's own non-causal time (tiles
            outside the band are skipped) and SDPA's causal time;
  padded    half the batch at half length: effattn given key_lengths and
            query_lengths, against SDPA (and effattn) given the equivalent dense
            key-padding mask; plus the peak memory of effattn's forward+backward,
            measured in a fresh process, at two lengths (it should grow like L,
            not L x S);
  head_dim  the FLOP rate over head dims 40 .. 256 relative to 64;
  isa       each compiled kernel variant this CPU can run (effattn.config.cpu_isa).

FLOPs: 4 * B * H * L * S * E for the forward (two GEMMs), halved for causal, and
2.5x that for the backward; for padded batches the FLOPs of the dense problem.
Times: medians of --iters runs after one warm-up, the methods of a row timed
round-robin. Writes JSON and a markdown table under bench/results/.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import cpu_model, effattn, flops, medians_ms, proc_kib  # noqa: E402,F401  (shared with speed.py etc.)
from common import padded_case as _padded_case  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ISA_NAMES = ["baseline", "avx2", "avx512"]


def inputs(B, H, L, E, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(B, H, L, E, generator=g).to(dtype) for _ in range(4))
    return [t.requires_grad_(i < 3) for i, t in enumerate((q, k, v, dout))]


def fwd_and_fwdbwd(calls, q, k, v, dout, iters):
    """{name: (forward ms, forward+backward ms)} of each call(q, k, v), compared
    round-robin."""
    def no_grad(call):
        def run():
            with torch.no_grad():
                call(q, k, v)
        return run

    fwd = medians_ms({n: no_grad(c) for n, c in calls.items()}, iters)
    both = medians_ms({n: (lambda c=c: torch.autograd.grad(c(q, k, v), (q, k, v), dout))
                       for n, c in calls.items()}, iters)
    return {n: (fwd[n], both[n]) for n in calls}


def sdpa(q, k, v, **kw):
    return F.scaled_dot_product_attention(q, k, v, **kw)


def eff(q, k, v, **kw):
    return effattn.attention(q, k, v, backend="cpu", **kw)


def headline(shapes, iters, log):
    rows = []
    for (B, H, L, E) in shapes:
        for dname, dt in DTYPES.items():
            q, k, v, dout = inputs(B, H, L, E, dt)
            t = fwd_and_fwdbwd(dict(effattn=eff, sdpa=sdpa), q, k, v, dout, iters)
            e, s = t["effattn"], t["sdpa"]
            row = dict(shape=[B, H, L, E], dtype=dname, effattn_fwd_ms=e[0], effattn_fwdbwd_ms=e[1],
                       sdpa_fwd_ms=s[0], sdpa_fwdbwd_ms=s[1], ratio_fwd=e[0] / s[0],
                       ratio_fwdbwd=e[1] / s[1],
                       effattn_fwd_gflops=flops(B, H, L, L, E) / e[0] / 1e6,
                       effattn_fwdbwd_gflops=flops(B, H, L, L, E, backward=True) / e[1] / 1e6)
            log(f"headline {row['shape']} {dname}: fwd {e[0]:.1f} ms vs SDPA {s[0]:.1f} "
                f"({row['ratio_fwd']:.2f}x), fwd+bwd {e[1]:.1f} vs {s[1]:.1f} ({row['ratio_fwdbwd']:.2f}x)")
            rows.append(row)
    return rows


def causal(shape, iters, log):
    B, H, L, E = shape
    q, k, v, dout = inputs(B, H, L, E, torch.float32)
    t = fwd_and_fwdbwd(dict(dense=eff, causal=lambda *a: eff(*a, is_causal=True),
                            sdpa_causal=lambda *a: sdpa(*a, is_causal=True)), q, k, v, dout, iters)
    dense, tri, s_tri = t["dense"], t["causal"], t["sdpa_causal"]
    row = dict(shape=list(shape), dtype="float32", effattn_fwd_ms=dense[0], effattn_fwdbwd_ms=dense[1],
               effattn_causal_fwd_ms=tri[0], effattn_causal_fwdbwd_ms=tri[1],
               sdpa_causal_fwd_ms=s_tri[0], sdpa_causal_fwdbwd_ms=s_tri[1],
               speedup_fwd=dense[0] / tri[0], speedup_fwdbwd=dense[1] / tri[1])
    log(f"causal {list(shape)}: fwd {dense[0]:.1f} -> {tri[0]:.1f} ms ({row['speedup_fwd']:.2f}x), "
        f"fwd+bwd {dense[1]:.1f} -> {tri[1]:.1f} ms ({row['speedup_fwdbwd']:.2f}x); "
        f"SDPA causal {s_tri[0]:.1f} / {s_tri[1]:.1f} ms")
    return row


def padded_case(B, L):
    """Lengths: the first half of the batch full, the second half at L // 2; and the dense
    (B, 1, 1, S) key-padding mask SDPA needs (common.padded_case)."""
    return _padded_case(B, L)


def padded(shape, iters, log):
    B, H, L, E = shape
    q, k, v, dout = inputs(B, H, L, E, torch.float32)
    lengths, mask = padded_case(B, L)
    t = fwd_and_fwdbwd(dict(lengths=lambda *a: eff(*a, key_lengths=lengths, query_lengths=lengths),
                            mask=lambda *a: eff(*a, attn_mask=mask),
                            sdpa_mask=lambda *a: sdpa(*a, attn_mask=mask)), q, k, v, dout, iters)
    e_len, e_mask, s_mask = t["lengths"], t["mask"], t["sdpa_mask"]
    row = dict(shape=list(shape), dtype="float32", lengths=lengths.tolist(),
               effattn_lengths_fwd_ms=e_len[0], effattn_lengths_fwdbwd_ms=e_len[1],
               effattn_mask_fwd_ms=e_mask[0], effattn_mask_fwdbwd_ms=e_mask[1],
               sdpa_mask_fwd_ms=s_mask[0], sdpa_mask_fwdbwd_ms=s_mask[1],
               speedup_fwd=s_mask[0] / e_len[0], speedup_fwdbwd=s_mask[1] / e_len[1])
    log(f"padded {list(shape)}: effattn+lengths fwd {e_len[0]:.1f} / fwd+bwd {e_len[1]:.1f} ms, "
        f"effattn+mask {e_mask[0]:.1f} / {e_mask[1]:.1f}, SDPA+mask {s_mask[0]:.1f} / {s_mask[1]:.1f} "
        f"-> {row['speedup_fwd']:.2f}x / {row['speedup_fwdbwd']:.2f}x faster than SDPA")
    return row


def memory_worker(B, H, L, E):
    """In a fresh process: peak RSS growth of one padded forward+backward (gradients included)."""
    q, k, v, dout = inputs(B, H, L, E, torch.float32)
    lengths, _ = padded_case(B, L)
    small = [t[..., :64, :].detach().clone().requires_grad_(t.requires_grad) for t in (q, k, v)]
    torch.autograd.grad(eff(*small), small, dout[..., :64, :])  # one-time initialisation
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = proc_kib("VmRSS")
    out = eff(q, k, v, key_lengths=lengths, query_lengths=lengths)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    peak = (proc_kib("VmHWM") - before) * 1024
    needed = sum(t.numel() * t.element_size() for t in (out, *grads))  # output + 3 gradients
    print(json.dumps(dict(peak_bytes=peak, output_and_grads_bytes=needed)))


def memory(shape, lengths_L, log):
    B, H, _, E = shape
    rows = []
    for L in lengths_L:
        res = subprocess.run([sys.executable, __file__, "--memory-worker", f"{B},{H},{L},{E}"],
                             capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        score_bytes = B * H * L * L * 4  # one float32 (B, H, L, S) score tensor
        row = dict(shape=[B, H, L, E], peak_mib=r["peak_bytes"] / 2**20,
                   output_and_grads_mib=r["output_and_grads_bytes"] / 2**20,
                   extra_mib=(r["peak_bytes"] - r["output_and_grads_bytes"]) / 2**20,
                   one_score_tensor_mib=score_bytes / 2**20)
        log(f"memory {row['shape']}: peak {row['peak_mib']:.1f} MiB = output+grads "
            f"{row['output_and_grads_mib']:.1f} + extra {row['extra_mib']:.1f} "
            f"(one L x S score tensor would be {row['one_score_tensor_mib']:.0f} MiB)")
        rows.append(row)
    return rows


def head_dims(B, H, L, dims, iters, log):
    """All head dims timed round-robin, each on its own inputs."""
    data = {E: inputs(B, H, L, E, torch.float32) for E in dims}

    def fwd(E):
        def run():
            with torch.no_grad():
                eff(*data[E][:3])
        return run

    def both(E):
        q, k, v, dout = data[E]
        return lambda: torch.autograd.grad(eff(q, k, v), (q, k, v), dout)

    t_fwd = medians_ms({E: fwd(E) for E in dims}, iters)
    t_all = medians_ms({E: both(E) for E in dims}, iters)
    rows = []
    for E in dims:
        rows.append(dict(shape=[B, H, L, E], fwd_ms=t_fwd[E], fwdbwd_ms=t_all[E],
                         fwd_gflops=flops(B, H, L, L, E) / t_fwd[E] / 1e6,
                         fwdbwd_gflops=flops(B, H, L, L, E, backward=True) / t_all[E] / 1e6))
    ref = next((r for r in rows if r["shape"][3] == 64), rows[0])
    for r in rows:
        r["fwd_rate_vs_64"] = r["fwd_gflops"] / ref["fwd_gflops"]
        r["fwdbwd_rate_vs_64"] = r["fwdbwd_gflops"] / ref["fwdbwd_gflops"]
        log(f"head dim {r['shape'][3]}: fwd {r['fwd_gflops']:.1f} GFLOP/s ({r['fwd_rate_vs_64']:.2f} of E=64), "
            f"fwd+bwd {r['fwdbwd_gflops']:.1f} ({r['fwdbwd_rate_vs_64']:.2f})")
    return rows


def isa_variants(shape, iters, log):
    B, H, L, E = shape
    q, k, v, dout = inputs(B, H, L, E, torch.float32)
    from effattn.backends.cpu import runnable_isas
    names = [n for n in ISA_NAMES if n in runnable_isas()]

    def variant(name):  # the op's variant argument comes from the config, backward included
        return effattn.config.override(cpu_isa=name)

    def fwd(name):
        def run():
            with variant(name), torch.no_grad():
                eff(q, k, v)
        return run

    def both(name):
        def run():
            with variant(name):
                torch.autograd.grad(eff(q, k, v), (q, k, v), dout)
        return run

    t_fwd = medians_ms({n: fwd(n) for n in names}, iters)
    t_all = medians_ms({n: both(n) for n in names}, iters)
    rows = []
    for name in names:
        rows.append(dict(isa=name, shape=list(shape), fwd_ms=t_fwd[name], fwdbwd_ms=t_all[name]))
        log(f"isa {name}: fwd {t_fwd[name]:.1f} ms, fwd+bwd {t_all[name]:.1f} ms")
    return rows


def matmul_peak_gflops(n, iters):
    """float32 torch.mm rate, the practical peak the attention GEMMs run against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    ms = medians_ms({"mm": lambda: a @ b}, iters)["mm"]
    return 2 * n ** 3 / ms / 1e6


def markdown(res):
    m = res["machine"]
    peak = m["matmul_gflops"]
    out = [f"CPU: {m['cpu']}, {m['threads']} threads, kernel variant `{m['isa']}`, float32 torch.mm "
           f"{peak:.0f} GFLOP/s | torch {m['torch']} | effattn {m['effattn']} | {m['date']} | "
           f"`{m['command']}`", ""]
    out += ["| (B, H, L, E) | dtype | effattn fwd ms | SDPA fwd ms | ratio | effattn fwd+bwd ms | "
            "SDPA fwd+bwd ms | ratio | effattn GFLOP/s fwd, fwd+bwd (of mm) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in res["headline"]:
        out.append(f"| {tuple(r['shape'])} | {r['dtype']} | {r['effattn_fwd_ms']:.1f} | {r['sdpa_fwd_ms']:.1f} | "
                   f"**{r['ratio_fwd']:.2f}** | {r['effattn_fwdbwd_ms']:.1f} | {r['sdpa_fwdbwd_ms']:.1f} | "
                   f"**{r['ratio_fwdbwd']:.2f}** | {r['effattn_fwd_gflops']:.0f} "
                   f"({r['effattn_fwd_gflops'] / peak:.0%}), {r['effattn_fwdbwd_gflops']:.0f} "
                   f"({r['effattn_fwdbwd_gflops'] / peak:.0%}) |")
    c = res["causal"]
    out += ["", "| causal, (B, H, L, E) = " + str(tuple(c["shape"])) + " float32 | fwd ms | fwd+bwd ms |",
            "|---|---|---|",
            f"| effattn, not causal | {c['effattn_fwd_ms']:.1f} | {c['effattn_fwdbwd_ms']:.1f} |",
            f"| effattn, causal | {c['effattn_causal_fwd_ms']:.1f} | {c['effattn_causal_fwdbwd_ms']:.1f} |",
            f"| speed-up from skipped tiles | **{c['speedup_fwd']:.2f}x** | **{c['speedup_fwdbwd']:.2f}x** |",
            f"| SDPA, causal | {c['sdpa_causal_fwd_ms']:.1f} | {c['sdpa_causal_fwdbwd_ms']:.1f} |"]
    p = res["padded"]
    out += ["", f"| padded, (B, H, L, E) = {tuple(p['shape'])} float32, lengths {p['lengths']} | fwd ms | "
            "fwd+bwd ms |", "|---|---|---|",
            f"| effattn, key_lengths + query_lengths | {p['effattn_lengths_fwd_ms']:.1f} | "
            f"{p['effattn_lengths_fwdbwd_ms']:.1f} |",
            f"| effattn, dense key-padding mask | {p['effattn_mask_fwd_ms']:.1f} | {p['effattn_mask_fwdbwd_ms']:.1f} |",
            f"| SDPA, dense key-padding mask | {p['sdpa_mask_fwd_ms']:.1f} | {p['sdpa_mask_fwdbwd_ms']:.1f} |",
            f"| SDPA+mask / effattn+lengths | **{p['speedup_fwd']:.2f}x** | **{p['speedup_fwdbwd']:.2f}x** |"]
    out += ["", "| padded fwd+bwd, (B, H, L, E) | peak MiB | output + grads MiB | extra MiB | "
            "one L x S score tensor MiB |", "|---|---|---|---|---|"]
    for r in res["memory"]:
        out.append(f"| {tuple(r['shape'])} | {r['peak_mib']:.1f} | {r['output_and_grads_mib']:.1f} | "
                   f"{r['extra_mib']:.1f} | {r['one_score_tensor_mib']:.0f} |")
    out += ["", "| head dim (float32, B, H, L = " + ", ".join(map(str, res["head_dim"][0]["shape"][:3])) +
            ") | fwd GFLOP/s | vs E=64 | fwd+bwd GFLOP/s | vs E=64 |", "|---|---|---|---|---|"]
    for r in res["head_dim"]:
        out.append(f"| {r['shape'][3]} | {r['fwd_gflops']:.1f} | {r['fwd_rate_vs_64']:.2f} | "
                   f"{r['fwdbwd_gflops']:.1f} | {r['fwdbwd_rate_vs_64']:.2f} |")
    out += ["", "| kernel variant, " + str(tuple(res["isa"][0]["shape"])) + " float32 | fwd ms | fwd+bwd ms |",
            "|---|---|---|"]
    for r in res["isa"]:
        out.append(f"| {r['isa']} | {r['fwd_ms']:.1f} | {r['fwdbwd_ms']:.1f} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run, not a timing")
    ap.add_argument("--iters", type=int, default=7, help="timed runs per measurement (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/cpu-speed[-quick].json)")
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(*map(int, args.memory_worker.split(",")))
        return None

    q = args.quick
    iters = 1 if q else args.iters
    log = lambda s: print(s, flush=True)  # noqa: E731
    res = dict(machine=dict(
        cpu=cpu_model(), threads=torch.get_num_threads(), isa=effattn.backends.BY_NAME["cpu"].isa()[0],
        torch=torch.__version__, effattn=effattn.__version__, python=platform.python_version(),
        date=datetime.date.today().isoformat(),
        command="python3 bench/cpu_speed.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()))
    res["machine"]["matmul_gflops"] = matmul_peak_gflops(256 if q else 2048, iters)
    log(f"{res['machine']['cpu']}, {res['machine']['threads']} threads, variant {res['machine']['isa']}, "
        f"torch {torch.__version__}, float32 matmul {res['machine']['matmul_gflops']:.0f} GFLOP/s")
    res["headline"] = headline([(2, 2, 96, 64)] if q else [(8, 8, 800, 64), (1, 8, 4096, 64)], iters, log)
    res["causal"] = causal((1, 2, 256, 64) if q else (1, 8, 4096, 64), iters, log)
    res["padded"] = padded((2, 2, 256, 64) if q else (2, 8, 4096, 64), iters, log)
    res["memory"] = memory((2, 2, 0, 64) if q else (2, 8, 0, 64), [128, 256] if q else [2048, 4096], log)
    res["head_dim"] = head_dims(1, 2 if q else 8, 128 if q else 2048,
                                [40, 64] if q else [40, 64, 72, 96, 128, 256], iters, log)
    res["isa"] = isa_variants((1, 2, 96, 64) if q else (8, 8, 800, 64), iters, log)

    path = args.out or os.path.join(HERE, "results", "cpu-speed" + ("-quick" if q else "") + ".json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(res)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(md)
    print("\n" + md)
    print(f"wrote {path} and {os.path.splitext(path)[0]}.md")
    return res


if __name__ == "__main__":
    main()
