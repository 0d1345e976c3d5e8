#!/usr/bin/env python3
"""What effattn.diagnostics costs per training step, on the CPU, on the examples' models.

For each model, one training step (forward, loss, backward, optimizer step) timed three ways,
round-robin (one step of each in turn: a shared CPU drifts), median of --iters:
  plain         the step alone;
  GradientFlow  the same inside an open ``GradientFlow(model)`` (every leaf module hooked), plus
                ``flow.step(loss)``;
  check         ``check(model, batch, loss_fn, optimizer=opt)`` with steps=1: the recorder, plus
                input gradients (so the first layer's input is recorded through time) and saving /
                restoring the model's mode and gradients.
Models (from examples/): the 15-layer GAP CNN of dead_relu_gap.py (B = 32, 32 x 32), and the LSTM
classifier of gradient_flow_through_time.py at T = 800 (B = 8, hidden 32), without and with
effattn self-attention, float32.

    python3 bench/diagnostics_overhead.py            # writes bench/results/diagnostics-overhead-cpu.json (+ .md)
    python3 bench/diagnostics_overhead.py --quick    # tiny smoke run
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

import common
from common import log

sys.path.insert(0, os.path.join(common.ROOT, "examples"))
import dead_relu_gap  # noqa: E402
import gradient_flow_through_time  # noqa: E402
from effattn.diagnostics import GradientFlow, check  # noqa: E402


def cases(quick):
    """{name: (model, batch (inputs, target), loss_fn)}."""
    gen = torch.Generator().manual_seed(0)
    patterns = torch.randn(20, 3, 8, 8, generator=gen)
    T, B = (64, 2) if quick else (800, 8)
    x, y = gradient_flow_through_time.make_batch(B, T, 8, gen)
    x = x.float()
    images = 4 if quick else 32
    out = {f"GAP CNN, B={images}": (dead_relu_gap.GapNet(20), dead_relu_gap.make_batch(images, patterns, gen),
                                    F.multilabel_soft_margin_loss)}
    for attention in (False, True):
        name = f"LSTM{' + attention' if attention else ''}, T={T}, B={B}"
        model = gradient_flow_through_time.SequenceClassifier("lstm", 8, 32, 2, 1.0, attention)
        out[name] = (model, (x, y), F.cross_entropy)
    return out


def step_functions(model, batch, loss_fn):
    """{way: a callable running one training step}; the recorder's hooks stay open for the run."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    inputs, target = batch
    flow = GradientFlow(model)

    def plain():
        opt.zero_grad()
        loss_fn(model(inputs), target).backward()
        opt.step()

    def recorded():
        flow.start()
        try:
            opt.zero_grad()
            loss = loss_fn(model(inputs), target)
            loss.backward()
            opt.step()
            flow.step(loss)
        finally:
            flow.stop()

    def checked():
        check(model, batch, loss_fn, optimizer=opt)

    return {"plain": plain, "GradientFlow": recorded, "check": checked}, flow


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=None, help="timed rounds (default 15; --quick 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=common.RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    iters = args.iters or (1 if args.quick else 15)
    rt = common.Runtime("cpu")
    m = common.meta(rt, "diagnostics_overhead.py", argv)
    log(common.stamp(m))
    rows = []
    for name, (model, batch, loss_fn) in cases(args.quick).items():
        fns, flow = step_functions(model, batch, loss_fn)
        ms = common.medians_ms(fns, iters, warmup=1)
        report = flow.report()
        rows.append(dict(model=name, layers=len(report.layers), sequences=len(report.sequences), **{
            f"{way}_ms": ms[way] for way in fns}, gradientflow_overhead=ms["GradientFlow"] / ms["plain"] - 1,
            check_overhead=ms["check"] / ms["plain"] - 1))
        log(f"{name}: " + ", ".join(f"{way} {ms[way]:.1f} ms" for way in fns))
    res = dict(meta=m, iters=iters, rows=rows)

    def tables(res, markdown=False):
        body = common.table(["model", "recorded layers", "sequences", "plain ms", "GradientFlow ms", "check ms",
                             "GradientFlow overhead", "check overhead"],
                            [[r["model"], r["layers"], r["sequences"], f"{r['plain_ms']:.1f}",
                              f"{r['GradientFlow_ms']:.1f}", f"{r['check_ms']:.1f}",
                              f"{r['gradientflow_overhead']:+.0%}", f"{r['check_overhead']:+.0%}"] for r in res["rows"]],
                            markdown=markdown)
        return [(f"one training step, median of {res['iters']} (round-robin), {m['threads']} thread(s)", body)]

    common.write_json(common.out_path(args, "diagnostics-overhead", "cpu"), res)
    md = common.out_path(args, "diagnostics-overhead", "cpu", ext="md")
    common.write_markdown(md, "diagnostics_overhead.py", m, tables(res, markdown=True))
    for title, text in tables(res):
        print(title)
        print(text)
    return res


if __name__ == "__main__":
    main()
