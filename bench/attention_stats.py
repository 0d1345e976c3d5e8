#!/usr/bin/env python3
"""What effattn.diagnostics.attention_stats costs on the CPU: the forward with the stats against
the plain forward, same inputs, same process, timed round-robin.

For each shape (cpu_speed.py's headline shapes, float32 and bfloat16, causal and not), four
calls, median of --iters after a warm-up:
  forward          effattn.attention(q, k, v) under no_grad (the cpu kernel);
  forward+stats    attention_stats(q, k, v, return_output=True) under no_grad: the same kernel
                   with the stats accumulator (csrc/cpu/attention_fwd.h, kStats);
  stats (ref)      the reference's stats from the materialised softmax, at the smaller shape only
                   (it allocates B*H*L*S);
and the peak RSS growth of one stats call (with its output), measured in a fresh process (VmHWM:
it sees the kernel's own buffers too, which torch's profiler does not), against one (L, S)
float32 matrix and the reference's growth. The issue's bound: forward+stats <= 1.3x forward.

    python3 bench/attention_stats.py          # writes bench/results/attention-stats-cpu.json (+ .md)
    python3 bench/attention_stats.py --quick  # tiny smoke run
"""
import argparse
import json
import subprocess
import sys

import torch

import common
from common import log
from effattn.diagnostics import attention_stats

SHAPES = [(8, 8, 800, 64), (1, 8, 4096, 64)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def memory_worker(backend, B, H, L, E, causal):
    """In a fresh process: peak RSS growth (bytes) of one attention_stats call with its output."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, E, generator=g) for _ in range(3))
    with torch.no_grad():
        attention_stats(q[..., :64, :], k[..., :64, :], v[..., :64, :], backend=backend)  # initialisation
        common.reset_rss_peak()
        before = common.proc_kib("VmRSS")
        attention_stats(q, k, v, is_causal=causal, backend=backend, return_output=True)
        print(json.dumps(dict(peak_bytes=(common.proc_kib("VmHWM") - before) * 1024)))


def peak_growth(backend, B, H, L, E, causal):
    res = subprocess.run([sys.executable, __file__, "--memory-worker", f"{backend},{B},{H},{L},{E},{int(causal)}"],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=None, help="timed rounds (default 9; --quick 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=common.RESULTS)
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_worker:
        backend, *sizes = args.memory_worker.split(",")
        B, H, L, E, causal = map(int, sizes)
        return memory_worker(backend, B, H, L, E, bool(causal))
    if args.threads:
        torch.set_num_threads(args.threads)
    iters = args.iters or (1 if args.quick else 9)
    rt = common.Runtime("cpu")
    m = common.meta(rt, "attention_stats.py", argv)
    m["cpu_model"] = common.cpu_model()
    log(common.stamp(m))
    shapes = [(1, 2, 64, 16)] if args.quick else SHAPES
    rows = []
    for B, H, L, E in shapes:
        for dname, dtype in DTYPES.items():
            for causal in (False, True):
                g = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(B, H, L, E, generator=g).to(dtype) for _ in range(3))

                @torch.no_grad()
                def forward():
                    effattn_attention(q, k, v, is_causal=causal, backend="cpu")

                @torch.no_grad()
                def with_stats():
                    attention_stats(q, k, v, is_causal=causal, backend="cpu", return_output=True)

                fns = {"forward": forward, "forward+stats": with_stats}
                if B * H * L * L * 4 <= 2 ** 30:  # the reference materialises (B, H, L, S)
                    fns["stats (reference)"] = torch.no_grad()(
                        lambda: attention_stats(q, k, v, is_causal=causal, backend="reference"))
                ms = common.medians_ms(fns, iters, warmup=1)
                row = dict(B=B, H=H, L=L, E=E, dtype=dname, causal=causal, **{f"{n}_ms": t for n, t in ms.items()},
                           ratio=ms["forward+stats"] / ms["forward"],
                           score_matrix_bytes=L * L * 4, output_bytes=B * H * L * E * q.element_size())
                if dname == "float32":  # (the worker's inputs are float32)
                    row["peak_growth_bytes"] = peak_growth("cpu", B, H, L, E, causal)
                    if "stats (reference)" in fns:
                        row["reference_peak_growth_bytes"] = peak_growth("reference", B, H, L, E, causal)
                rows.append(row)
                log(f"({B}, {H}, {L}, {E}) {dname} causal={causal}: " + ", ".join(
                    f"{n} {t:.2f} ms" for n, t in ms.items()) + f"; stats / forward {row['ratio']:.3f}")
    res = dict(meta=m, iters=iters, rows=rows)

    def tables(res, markdown=False):
        body = common.table(
            ["(B, H, L, E)", "dtype", "causal", "forward ms", "forward+stats ms", "stats / forward",
             "reference stats ms", "output (MiB)", "peak RSS growth (MiB)", "reference's (MiB)",
             "one (L, S) float32 (MiB)"],
            [[f"({r['B']}, {r['H']}, {r['L']}, {r['E']})", r["dtype"], "yes" if r["causal"] else "no",
              common.fmt_ms(r["forward_ms"]), common.fmt_ms(r["forward+stats_ms"]), f"{r['ratio']:.3f}",
              common.fmt_ms(r["stats (reference)_ms"]) if "stats (reference)_ms" in r else "-",
              f"{r['output_bytes'] / 2**20:.1f}",
              f"{r['peak_growth_bytes'] / 2**20:.1f}" if "peak_growth_bytes" in r else "-",
              f"{r['reference_peak_growth_bytes'] / 2**20:.0f}" if "reference_peak_growth_bytes" in r else "-",
              f"{r['score_matrix_bytes'] / 2**20:.1f}"]
             for r in res["rows"]], markdown=markdown)
        return [(f"no_grad calls on the cpu backend, median of {res['iters']} (round-robin), "
                 f"{m['threads']} thread(s), {m['cpu_model']}", body)]

    common.write_json(common.out_path(args, "attention-stats", "cpu"), res)
    common.write_markdown(common.out_path(args, "attention-stats", "cpu", ext="md"), "attention_stats.py", m,
                          tables(res, markdown=True))
    for title, text in tables(res):
        print(title)
        print(text)
    return res


effattn_attention = common.effattn.attention

if __name__ == "__main__":
    main()
