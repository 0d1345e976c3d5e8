#!/usr/bin/env python3
"""A VGG-style network ending in conv + ReLU -> global average pooling, whose outputs die.

The scenario (shared/scenarios/gap_dead_output.txt): convolutions, then a last ConvReLU with one
channel per class, global average pooling and no FC layer, trained with
F.multilabel_soft_margin_loss; "the output of the network become all zeros after only 2 or 3
iterations, so do the gradients". Here at CPU size (32 x 32 images, 8-64 channels, 20 classes) on
synthetic multi-label data: each image holds 1-3 of 20 class patterns at random places in noise.

``effattn.diagnostics.check`` records the training (SGD, momentum 0.9, as in the scenario) and
names the layer that dies. Why it dies: most labels are negative, and the loss pushes their
scores down; a score is the mean of a ReLU'd class map, so it can only reach 0, where every unit
of the map is off; the ReLU then passes no gradient back and the class maps never come back (a
dead network's loss is ln 2 = 0.693 per class, forever). The fix the scenario asks for, without
an FC layer: no ReLU on the class maps (the scores can then go negative). The network's own
``bn=True`` option (BatchNorm before every ReLU) is run too, with and without that fix: on its
own it only delays the death here (BatchNorm's learned shift can push a class map below zero
just the same).

    python3 examples/dead_relu_gap.py               # 20-40 s on the two shared cores
    python3 examples/dead_relu_gap.py --steps 40
"""
import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from effattn.diagnostics import check

LAST_RELU = "gap.1.relu"  # the ReLU on the class maps


class ConvReLU(nn.Module):
    """The scenario's block: 3x3 conv (same size) [-> BatchNorm] [-> ReLU(inplace)]."""

    def __init__(self, in_ch, out_ch, relu=True, bn=False):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001) if bn else None
        self.relu = nn.ReLU(inplace=True) if relu else None

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.relu is not None:
            x = self.relu(x)
        return x


class GapNet(nn.Module):
    """The scenario's WSDR at CPU size: conv stages -> gap (ConvReLU, ConvReLU to one map per
    class, global average pooling) -> scores; no FC layer. ``class_relu=False`` is the fix."""

    def __init__(self, classes=20, widths=(8, 16, 32, 64), bn=False, class_relu=True):
        super().__init__()
        c1, c2, c3, c4 = widths
        self.conv1 = nn.Sequential(ConvReLU(3, c1, bn=bn), nn.MaxPool2d(2))
        self.conv2 = nn.Sequential(ConvReLU(c1, c2, bn=bn), nn.MaxPool2d(2))
        self.conv3 = nn.Sequential(ConvReLU(c2, c3, bn=bn), nn.MaxPool2d(2))
        self.gap = nn.Sequential(ConvReLU(c3, c4, bn=bn), ConvReLU(c4, classes, relu=class_relu, bn=bn),
                                 nn.AdaptiveAvgPool2d(1))

    def forward(self, images):
        return self.gap(self.conv3(self.conv2(self.conv1(images)))).flatten(1)  # (B, classes)


VARIANTS = {  # name: GapNet options
    "scenario's network": dict(class_relu=True, bn=False),
    "bn=True (BatchNorm before each ReLU)": dict(class_relu=True, bn=True),
    "fix: no ReLU on the class maps": dict(class_relu=False, bn=False),
    "fix + bn=True": dict(class_relu=False, bn=True),
}


def make_batch(batch, patterns, gen, size=32):
    """Images (B, 3, size, size): noise plus 1-3 class patterns each; multi-hot labels (B, C)."""
    classes, _, p, _ = patterns.shape
    images = 0.5 * torch.randn(batch, 3, size, size, generator=gen)
    labels = torch.zeros(batch, classes)
    for b in range(batch):
        present = torch.randperm(classes, generator=gen)[:int(torch.randint(1, 4, (1,), generator=gen))]
        for c in present.tolist():
            i, j = torch.randint(0, size - p + 1, (2,), generator=gen).tolist()
            images[b, :, i:i + p, j:j + p] += patterns[c]
            labels[b, c] = 1.0
    return images, labels


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (small convolutions: 1 is fastest)")
    return p.parse_args(argv)


def run(args):
    gen = torch.Generator().manual_seed(args.seed)
    patterns = torch.randn(args.classes, 3, 8, 8, generator=gen)
    positives = 2 / args.classes  # 1-3 labels of `classes` on average
    base_rate_loss = -(positives * math.log(positives) + (1 - positives) * math.log(1 - positives))
    print(f"{args.batch} images 32x32 per step, {args.classes} classes, 1-3 per image; SGD lr {args.lr} momentum "
          f"0.9, {args.steps} steps; loss of a dead network ln 2 = {math.log(2):.4f}, of predicting the label "
          f"frequency {base_rate_loss:.4f}")
    results = {}
    for name, options in VARIANTS.items():
        torch.manual_seed(args.seed)
        model = GapNet(args.classes, **options)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        data = torch.Generator().manual_seed(args.seed + 1)  # the same batches for every variant
        t0 = time.perf_counter()
        report = check(model, lambda step: make_batch(args.batch, patterns, data), F.multilabel_soft_margin_loss,
                       steps=args.steps, optimizer=opt)
        class_maps = report.layers[LAST_RELU if options["class_relu"] else "gap.1.bn" if options["bn"]
                                   else "gap.1.conv"]
        results[name] = dict(report=report, losses=report.losses, seconds=time.perf_counter() - t0,
                             class_map_zero=class_maps.zero_act, class_map_grad_zero=report.layers["gap.1.conv"].zero_grad)
        if name == "scenario's network":
            print(f"\n--- check() of the scenario's network ---\n{report}\n")

    k = min(10, args.steps)
    shown = [s for s in (1, 2, 3, 4, 5, 6, 10, 20) if s <= args.steps] + [args.steps]
    print(f"{'variant':38s} {f'loss, first/last {k} steps':>26s}   exactly-zero class-map outputs at steps "
          + ", ".join(map(str, shown)))
    for name, r in results.items():
        zeros = ", ".join(f"{r['class_map_zero'][s - 1]:.0%}" for s in shown)
        print(f"{name:38s} {sum(r['losses'][:k]) / k:11.4f} -> {sum(r['losses'][-k:]) / k:.4f}   {zeros}   "
              f"({r['seconds']:.1f} s)")
    print("\nwhat check() says at the last step:")
    for name, r in results.items():
        print(f"  {name}: {r['report'].summary.splitlines()[0]}")
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
