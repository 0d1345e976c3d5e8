#!/usr/bin/env python3
"""Gradient flow through time over 800 steps: a tanh RNN, an LSTM with forget-gate bias 0 and 1,
and an LSTM followed by effattn self-attention.

The scenario (shared/scenarios/rnn_gradient_flow.txt) shows, at 30 timesteps, how the gradient
reaching each input, ||dL/dx_t||, shrinks going back from the loss: by the recurrent Jacobian's
norm per step in a tanh RNN, by the forget gate (sigma(0) = 0.5 with a zero bias) in an LSTM. The
same experiment at T = 800, recorded by ``effattn.diagnostics.check`` without touching the models:
the loss (cross-entropy of a label that depends on the first step) reads the last output, and the
recorder keeps, per training step, the norm of the gradient of the recurrent layer's input at
every timestep ("rnn:input", the scenario's dL/dI_t). A fitted line through log ||g_t|| gives the
factor per step going back. With attention, the last step attends to every earlier one, so every
x_t gets a gradient through one attention hop instead of through 800 - t recurrent steps.

The models run in float64: a gradient of 1e-200 is measured instead of flushed to zero (a float32
gradient underflows below about 1e-45).

    python3 examples/gradient_flow_through_time.py              # T = 800, 15-30 s on the two shared cores
    python3 examples/gradient_flow_through_time.py --seq 200 --plot /tmp/flow.png
"""
import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import effattn
from effattn.diagnostics import check
from effattn.diagnostics.plot import time_figure

MODELS = {  # name: (recurrent layer, forget-gate bias (None: PyTorch's init), self-attention after it)
    "tanh RNN": ("rnn", None, False),
    "LSTM, forget bias 0": ("lstm", 0.0, False),
    "LSTM, forget bias 1": ("lstm", 1.0, False),
    "LSTM (bias 0) + attention": ("lstm", 0.0, True),
}


class SequenceClassifier(nn.Module):
    """x (B, T, features) -> recurrent layer -> [h + self-attention(h)] -> classes from the last step."""

    def __init__(self, cell, features, hidden, classes, forget_bias=None, attention=False, heads=2):
        super().__init__()
        rnn_type = nn.RNN if cell == "rnn" else nn.LSTM
        self.rnn = rnn_type(features, hidden, batch_first=True)
        if forget_bias is not None:  # gates are stacked (input, forget, cell, output) in the biases
            with torch.no_grad():
                self.rnn.bias_ih_l0[hidden:2 * hidden].fill_(forget_bias)
                self.rnn.bias_hh_l0[hidden:2 * hidden].zero_()
        self.attn = effattn.nn.MultiheadAttention(hidden, heads, batch_first=True) if attention else None
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        h = self.rnn(x)[0]
        if self.attn is not None:
            h = h + self.attn(h, h, h)[0]  # residual: the recurrent path stays, attention adds one
        return self.head(h[:, -1])


def make_batch(batch, seq, features, gen):
    """Noise; the label is the sign of the first step's first feature (so it needs x_1)."""
    x = torch.randn(batch, seq, features, generator=gen, dtype=torch.float64)
    return x, (x[:, 0, 0] > 0).long()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=800)
    p.add_argument("--steps", type=int, default=8, help="recorded Adam steps per model")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--features", type=int, default=8)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="bench/results/gradient-flow-through-time.png",
                   help="where the heatmap PNG goes ('' for none; needs matplotlib)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (an RNN step is a tiny matmul: 1 is fastest)")
    return p.parse_args(argv)


def run(args):
    print(f"T = {args.seq} timesteps, batch {args.batch}, hidden {args.hidden}, float64; {args.steps} recorded "
          f"Adam steps per model; g_t = ||dL/dx_t||, the loss at t = T")
    results, panels = {}, {}
    for name, (cell, forget_bias, attention) in MODELS.items():
        torch.manual_seed(args.seed)
        model = SequenceClassifier(cell, args.features, args.hidden, 2, forget_bias, attention).double()
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        gen = torch.Generator().manual_seed(args.seed + 1)  # the same batches for every model
        t0 = time.perf_counter()
        report = check(model, lambda step: make_batch(args.batch, args.seq, args.features, gen), F.cross_entropy,
                       steps=args.steps, optimizer=opt)
        seconds = time.perf_counter() - t0
        seq = report.sequences["rnn:input"]
        panels[name] = seq.norms
        results[name] = dict(ratio=seq.ratio_first_last(), factor=seq.decay_per_step(), below=seq.first_below(),
                             trend=seq.trend(), first_step_ratio=seq.ratio_first_last(0), seconds=seconds,
                             summary=report.summary, losses=report.losses)

    print(f"\n{'model':26s} {'g_1 / g_T':>10s} {'(step 1)':>10s} {'per step back':>13s} "
          f"{'g_t < 1e-3 g_T from':>20s}  trend      time")
    for name, r in results.items():
        below = "never" if r["below"] is None else f"t = {r['below'] + 1} ({args.seq - 1 - r['below']} back)"
        factor = "-" if r["factor"] is None else f"{r['factor']:.4f}"
        print(f"{name:26s} {r['ratio']:10.2e} {r['first_step_ratio']:10.2e} {factor:>13s} {below:>20s}  "
              f"{r['trend']:9s} {r['seconds']:5.1f} s")
    rnn, lstm0, lstm1, attn = (results[n] for n in MODELS)
    print(f"\nper step going back the gradient is multiplied by {rnn['factor']:.3f} in the tanh RNN, "
          f"{lstm0['factor']:.3f} in the LSTM with forget bias 0 and {lstm1['factor']:.3f} with forget bias 1 "
          f"(sigma(1) = {1 / (1 + math.exp(-1)):.3f}): geometric decay, slower with the forget bias; over "
          f"{args.seq - 1} steps that is {lstm0['ratio']:.1e} against {lstm1['ratio']:.1e}. With attention, "
          f"x_1 gets {attn['ratio']:.1e} of x_T's gradient: one attention hop instead of {args.seq - 1} "
          "recurrent steps.")
    if args.plot:
        try:
            time_figure(panels, args.plot, title=f"||dL/dx_t|| over {args.seq} timesteps (x) and training steps "
                                                 "(y), relative to t = T")
            print(f"heatmap: {args.plot}")
        except ImportError as exc:
            print(f"no heatmap: {exc}")
    return results


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
