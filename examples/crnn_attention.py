#!/usr/bin/env python3
"""A CRNN with self-attention between its two RNNs, on ~800-step sequences.

The scenario (shared/scenarios/crnn_long_sequence.txt): convolutions -> RNN1 ->
RNN2 over ~800 image columns; attention between RNN1 and RNN2 was either a
per-step loop (12x slower) or a batched softmax(QK^T) that ran out of memory,
even windowed. Here it is one drop-in module, ``effattn.nn.MultiheadAttention``,
and a window is a flag (``--window``).

The synthetic task needs attention: each sequence holds random symbols and one
marked span (an eighth of its length, anywhere) that repeats one symbol, the
"word"; the label of *every* column is that word. RNN1 runs left to right, so
the columns before the span can only learn the word by attending to it. Chance
is ln(vocab).

It trains, then compares one training step against the naive math (the same
parameters; attention written as softmax(QK^T / sqrt(d)) V, which keeps the
(B, H, L, L) scores and probabilities for the backward): time per iteration, and
peak RSS growth of one step, each measured in a fresh process.

    python3 examples/crnn_attention.py                 # 800 steps per sequence, ~1 minute on one core
    python3 examples/crnn_attention.py --steps 20 --seq 200
    python3 examples/crnn_attention.py --window 40     # local attention: 40 columns either side
"""
import argparse
import json
import math
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import effattn


class NaiveMultiheadAttention(nn.MultiheadAttention):
    """The same parameters as torch's/effattn's module; attention as explicit math."""

    def forward(self, query, key, value, window=None):
        B, L, E = query.shape
        H = self.num_heads
        q, k, v = (F.linear(t, w, b).view(B, L, H, -1).transpose(1, 2)
                   for t, w, b in zip((query, key, value), self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3)))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, L, L)
        if window is not None:
            i = torch.arange(L).view(L, 1)
            j = torch.arange(L).view(1, L)
            scores = scores.masked_fill((j < i - window[0]) | (j > i + window[1]), float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
        return self.out_proj(out.transpose(1, 2).reshape(B, L, E)), None


class CRNN(nn.Module):
    """convolutions -> RNN1 -> self-attention (residual) -> RNN2 -> per-column classes."""

    def __init__(self, in_channels, hidden, classes, heads=2, naive=False, window=None):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv1d(in_channels, hidden, 5, padding=2), nn.ReLU(),
                                   nn.Conv1d(hidden, hidden, 5, padding=2), nn.ReLU())
        self.rnn1 = nn.GRU(hidden, hidden, batch_first=True)
        attention_module = NaiveMultiheadAttention if naive else effattn.nn.MultiheadAttention
        self.attn = attention_module(hidden, heads, batch_first=True)
        self.rnn2 = nn.GRU(hidden, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)
        self.window = window

    def forward(self, columns):  # (B, in_channels, L) -> (B, L, classes)
        h, _ = self.rnn1(self.convs(columns).transpose(1, 2))
        a, _ = self.attn(h, h, h, window=self.window)
        y, _ = self.rnn2(h + a)
        return self.fc(y)


def make_batch(batch, seq, vocab, gen):
    """Columns: one-hot symbols plus a marker channel that is 1 on the span."""
    symbols = torch.randint(vocab, (batch, seq), generator=gen)
    span = max(1, seq // 8)
    start = torch.randint(seq - span + 1, (batch, 1), generator=gen)
    word = torch.randint(vocab, (batch, 1), generator=gen)
    col = torch.arange(seq).view(1, seq)
    marked = (col >= start) & (col < start + span)
    symbols = torch.where(marked, word, symbols)
    x = torch.cat([F.one_hot(symbols, vocab).float(), marked.unsqueeze(-1).float()], dim=-1)
    return x.transpose(1, 2), word.expand(batch, seq)


def build(args, naive=False):
    torch.manual_seed(args.seed)  # the same initial parameters for both variants
    return CRNN(args.vocab + 1, args.hidden, args.vocab, args.heads, naive=naive,
                window=(args.window, args.window) if args.window else None)


def train_step(model, opt, x, target):
    loss = F.cross_entropy(model(x).flatten(0, 1), target.flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def measure_one_step(args, naive):
    """(seconds per training step, peak RSS growth in bytes of one step), in this process."""
    model = build(args, naive)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(1)
    x, target = make_batch(args.batch, args.seq, args.vocab, gen)
    train_step(model, opt, *make_batch(args.batch, 16, args.vocab, gen))  # one-time initialisation
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark (Linux >= 4.0)
        f.write("5")
    before = _proc_kib("VmRSS")
    t0 = time.perf_counter()
    train_step(model, opt, x, target)
    first = time.perf_counter() - t0
    peak = (_proc_kib("VmHWM") - before) * 1024
    t0 = time.perf_counter()
    for _ in range(args.time_iters):
        train_step(model, opt, x, target)
    per_iter = (time.perf_counter() - t0 + first) / (args.time_iters + 1)
    return per_iter, peak


def _proc_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _measure_in_fresh_process(argv, naive):
    cmd = [sys.executable, __file__, *argv, "--worker", "naive" if naive else "effattn"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100, help="training steps")
    p.add_argument("--seq", type=int, default=800, help="sequence length (columns)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4)
    p.add_argument("--window", type=int, default=0, help="local attention: columns either side (0: global)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-iters", type=int, default=3, help="extra steps timed per variant in the comparison")
    p.add_argument("--no-compare", action="store_true", help="skip the comparison with the naive math")
    p.add_argument("--worker", choices=["effattn", "naive"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:  # child process of the comparison: one JSON line
        per_iter, peak = measure_one_step(args, naive=args.worker == "naive")
        print(json.dumps(dict(per_iter_s=per_iter, peak_bytes=peak)))
        return None

    model = build(args)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"CRNN + effattn.nn.MultiheadAttention | B={args.batch} L={args.seq} hidden={args.hidden} "
          f"heads={args.heads} window={args.window or 'global'} | chance loss ln({args.vocab}) = "
          f"{math.log(args.vocab):.3f} | torch threads: {torch.get_num_threads()}")
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        losses.append(train_step(model, opt, *make_batch(args.batch, args.seq, args.vocab, gen)))
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.3f}")
    train_s = time.perf_counter() - t0
    k = max(1, min(10, args.steps // 4))
    print(f"trained {args.steps} steps in {train_s:.1f} s ({1e3 * train_s / args.steps:.0f} ms/step); "
          f"mean loss of the first {k} steps {sum(losses[:k]) / k:.3f}, of the last {k} {sum(losses[-k:]) / k:.3f}")
    grad_norms = {n: p.grad.norm().item() for n, p in model.named_parameters()}
    result = dict(losses=losses, train_s=train_s, grad_norms=grad_norms)

    if not args.no_compare:
        worker_argv = [a for a in argv if a != "--no-compare"]
        B, H, L = args.batch, args.heads, args.seq
        print(f"\none training step, fresh process each | one (B, H, L, L) float32 tensor: "
              f"{B * H * L * L * 4 / 2**20:.1f} MiB")
        print("attention  ms/step  peak RSS growth MiB")
        for naive in (False, True):
            m = _measure_in_fresh_process(worker_argv, naive)
            result["naive" if naive else "effattn"] = m
            print(f"{'naive' if naive else 'effattn':9s}  {1e3 * m['per_iter_s']:7.0f}  {m['peak_bytes'] / 2**20:19.1f}")
    return result


if __name__ == "__main__":
    main()
