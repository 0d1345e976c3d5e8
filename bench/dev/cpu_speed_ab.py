#!/usr/bin/env python3
"""float32 speed of the cpu backend in two checkouts (two builds of the extension), A/B.

    python3 bench/dev/cpu_speed_ab.py BEFORE_ROOT AFTER_ROOT [--rounds 4] [--iters 5] [--md FILE]

One process cannot load two builds, so each measurement is a child process of one checkout;
the children alternate (A B A B ...) so that both see the same drift of a shared machine, and
each also times SDPA's CPU kernel on the same inputs, so a row is the median over rounds of
effattn's time and of effattn / SDPA. The shapes are cpu_speed.py's float32 headline rows
(forward, forward+backward, causal and not). It answers "did this kernel change cost speed",
to a few percent; bench/cpu_speed.py is the table users read.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

SHAPES = [(8, 8, 800, 64, False), (8, 8, 800, 64, True), (1, 8, 4096, 64, False), (1, 8, 4096, 64, True)]


def child(iters, modes):
    import torch
    import torch.nn.functional as F

    import effattn  # first: the checkout on PYTHONPATH (common puts this script's checkout on sys.path)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from common import medians_ms
    rows = {}
    for B, H, L, E, causal in SHAPES:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, L, E, generator=g).requires_grad_() for _ in range(3))
        do = torch.randn(B, H, L, E, generator=g)

        def eff_fwd():
            with torch.no_grad():
                effattn.attention(q, k, v, is_causal=causal, backend="cpu")

        def sdpa_fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        def eff_fb():
            torch.autograd.grad(effattn.attention(q, k, v, is_causal=causal, backend="cpu"), (q, k, v), do)

        def sdpa_fb():
            torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=causal), (q, k, v), do)

        fns = {name: fn for name, fn in dict(eff_fwd=eff_fwd, sdpa_fwd=sdpa_fwd, eff_fb=eff_fb, sdpa_fb=sdpa_fb).items()
               if name.split("_")[1] in modes}
        rows[f"{B},{H},{L},{E}{' causal' if causal else ''}"] = medians_ms(fns, iters)
    print(json.dumps(dict(effattn=effattn.__file__, rows=rows)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--md", default=None)
    ap.add_argument("--modes", default="fwd,fb", help="fwd (forward, no grad), fb (forward+backward)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.iters, args.modes.split(","))
    runs = {"before": [], "after": []}
    for r in range(args.rounds):
        for label in ("before", "after"):
            env = dict(os.environ, PYTHONPATH=os.path.abspath(getattr(args, label)))
            out = subprocess.run([sys.executable, os.path.abspath(__file__), args.before, args.after,
                                  "--child", "--iters", str(args.iters), "--modes", args.modes],
                                 env=env, capture_output=True, text=True, check=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            print(f"round {r} {label}: {res['effattn']}", file=sys.stderr, flush=True)
            runs[label].append(res["rows"])
    lines = ["| shape (float32) | mode | before ms | after ms | after / before | before / SDPA | after / SDPA |",
             "|---|---|---|---|---|---|---|"]
    for shape in runs["before"][0]:
        for mode in args.modes.split(","):
            med = {lab: statistics.median(r[shape][f"eff_{mode}"] for r in runs[lab]) for lab in runs}
            rel = {lab: statistics.median(r[shape][f"eff_{mode}"] / r[shape][f"sdpa_{mode}"] for r in runs[lab])
                   for lab in runs}
            lines.append(f"| {shape} | {'forward' if mode == 'fwd' else 'fwd+bwd'} | {med['before']:.2f} | "
                         f"{med['after']:.2f} | {med['after'] / med['before']:.3f} | {rel['before']:.3f} | "
                         f"{rel['after']:.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
