#!/usr/bin/env python3
"""Attention pooling over padded, variable-length clips: the scenario's module next to effattn's.

The scenario (shared/scenarios/video_attention_pooling.txt): per-frame CNN
features -> GRU -> s = [GRU state, frame]; a query from the mean frame; weights
alpha = softmax(w_m . (tanh(W_s s) * tanh(W_v mean))); the clip vector sum(alpha s).
Its gradients to the GRU and projections "vanished". Two things are wrong in
it, reimplemented faithfully below as ``ScenarioPooling``: the softmax runs over
*all* N frames, padding included (padded frames take attention mass, and a
clip's output depends on how much padding its batch had), and the logits are an
unscaled sum over the attention dims.

``effattn.nn.AttentionPooling(query="mean")`` does the same job with padded
frames excluded through ``key_lengths`` and scores scaled by 1/sqrt(d).

Synthetic clips: 8 to 48 frames of noise, zero-padded (as pad_packed_sequence
gives); a few valid frames carry the pattern of the clip's class, so the model
has to find them. Both models share everything else (the GRU, a linear
classifier, the data, the seed) and train for the same number of steps.

    python3 examples/video_attention_pooling.py
    python3 examples/video_attention_pooling.py --steps 50
"""
import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import effattn
from effattn.diagnostics import check


class ScenarioPooling(nn.Module):
    """The scenario's attention, as written there (equations 1-4)."""

    def __init__(self, s_dim, frame_dim, att_dim):
        super().__init__()
        self.frame_dim = frame_dim
        self.w_s = nn.Linear(s_dim, att_dim)
        self.w_v = nn.Linear(frame_dim, att_dim)
        self.w_m = nn.Parameter(torch.randn(att_dim) / math.sqrt(att_dim))  # their LinearVector

    def forward(self, s, lengths, return_weights=False):
        frames = s[..., -self.frame_dim:]
        v = frames.sum(1) / lengths.view(-1, 1).float()  # the mean frame (padding is zero)
        m = torch.tanh(self.w_s(s)) * torch.tanh(self.w_v(v)).unsqueeze(1)  # (1)
        alpha = (self.w_m * m).sum(2).softmax(dim=1)  # (2), (3): unscaled, over all N frames
        pooled = (alpha.unsqueeze(2) * s).sum(1)  # (4)
        return (pooled, alpha) if return_weights else pooled


class VideoModel(nn.Module):
    """frames -> GRU (packed, as in the scenario) -> s = [h, frames] -> pooling -> classes."""

    def __init__(self, frame_dim, gru_dim, att_dim, classes, scenario=False):
        super().__init__()
        s_dim = gru_dim + frame_dim
        self.gru = nn.GRU(frame_dim, gru_dim, batch_first=True)
        if scenario:
            self.pool = ScenarioPooling(s_dim, frame_dim, att_dim)
        else:
            self.pool = effattn.nn.AttentionPooling(s_dim, query="mean", attn_dim=att_dim)
        self.classify = nn.Linear(s_dim, classes)

    def forward(self, frames, lengths, return_weights=False):
        packed = pack_padded_sequence(frames, lengths, batch_first=True, enforce_sorted=False)
        h, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=frames.shape[1])
        pooled = self.pool(torch.cat([h, frames], dim=2), lengths, return_weights=return_weights)
        if return_weights:
            return self.classify(pooled[0]), pooled[1]
        return self.classify(pooled)


def make_clips(batch, max_frames, frame_dim, prototypes, gen, min_frames=8, events=3):
    """(frames (B, N, D) zero-padded, lengths (B,), labels (B,))."""
    classes = prototypes.shape[0]
    lengths = torch.randint(min_frames, max_frames + 1, (batch,), generator=gen)
    labels = torch.randint(classes, (batch,), generator=gen)
    frames = torch.randn(batch, max_frames, frame_dim, generator=gen)
    for b in range(batch):  # the class pattern on a few random valid frames
        at = torch.randperm(int(lengths[b]), generator=gen)[:events]
        frames[b, at] += prototypes[labels[b]]
    frames *= (torch.arange(max_frames) < lengths.view(-1, 1)).unsqueeze(2)
    return frames, lengths, labels


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-frames", type=int, default=48)
    p.add_argument("--frame-dim", type=int, default=32)
    p.add_argument("--gru-dim", type=int, default=32)
    p.add_argument("--att-dim", type=int, default=32)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--events", type=int, default=1, help="frames per clip that carry the class pattern")
    p.add_argument("--signal", type=float, default=1.0, help="scale of the class patterns (noise is 1)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run(args, scenario, prototypes, test_set):
    """Trains one model; returns its first-step gradient norms, losses and diagnostics."""
    torch.manual_seed(args.seed)
    model = VideoModel(args.frame_dim, args.gru_dim, args.att_dim, args.classes, scenario=scenario)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)  # the same batches for both models
    frames, lengths, labels = (t[:args.batch] for t in test_set)  # the clips check() looks at
    probe = ((frames, lengths), labels)
    report_start = check(model, probe, F.cross_entropy)  # changes nothing in the model
    # effattn's pooling records its attention statistics on every training step (the same kernel
    # call): how many frames each clip's query spreads over, as exp(entropy)
    recorded = effattn.nn.record_attention_stats(model)
    losses, grad_norms, attention, t0 = [], None, [], time.perf_counter()
    for step in range(args.steps):
        frames, lengths, labels = make_clips(args.batch, args.max_frames, args.frame_dim, prototypes, gen,
                                             events=args.events)
        loss = F.cross_entropy(model(frames, lengths), labels)
        if recorded:
            attention.append(dict(model.pool.last_stats.summary(), frames=lengths.double().mean().item()))
        opt.zero_grad()
        loss.backward()
        if grad_norms is None:
            grad_norms = {n: p.grad.norm().item() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    effattn.nn.record_attention_stats(model, False)
    report_end = check(model, probe, F.cross_entropy)

    model.eval()
    frames, lengths, labels = test_set
    with torch.no_grad():
        logits, weights = model(frames, lengths, return_weights=True)
        weights = weights.reshape(len(lengths), -1, frames.shape[1])  # (B, heads*queries, N)
        padded = torch.arange(frames.shape[1]) >= lengths.view(-1, 1)
        pad_mass = (weights * padded.unsqueeze(1)).sum(-1).mean().item()
        # the same clips with 16 more frames of padding, as in a batch that holds a longer clip
        longer = model(F.pad(frames, (0, 0, 0, 16)), lengths)
    return dict(losses=losses, grad_norms=grad_norms, seconds=seconds, attention=attention,
                test_loss=F.cross_entropy(logits, labels).item(),
                test_acc=(logits.argmax(1) == labels).float().mean().item(),
                test_acc_padded=(longer.argmax(1) == labels).float().mean().item(),
                pad_mass=pad_mass, padding_change=(longer - logits).abs().max().item(),
                report_start=report_start, report_end=report_end)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    gen = torch.Generator().manual_seed(args.seed)
    prototypes = args.signal * torch.randn(args.classes, args.frame_dim, generator=gen)
    test_set = make_clips(256, args.max_frames, args.frame_dim, prototypes, gen, events=args.events)
    print(f"{args.batch} clips of 8..{args.max_frames} frames, {args.frame_dim}-dim features, "
          f"{args.classes} classes (chance loss {math.log(args.classes):.3f}); {args.steps} Adam steps each")
    results = {}
    for name, scenario in (("scenario", True), ("effattn", False)):
        results[name] = run(args, scenario, prototypes, test_set)

    print("\ngradient norm of every parameter at the first step")
    for name in ("scenario", "effattn"):
        print(f"  {name}: " + ", ".join(f"{n} {g:.2e}" for n, g in results[name]["grad_norms"].items()))

    k = max(1, min(10, args.steps // 4))
    print(f"\npooling   train loss, first/last {k} steps   test loss  test acc  attention on padding"
          f"  with 16 more padded frames: acc, max logit change  time")
    for name in ("scenario", "effattn"):
        r = results[name]
        print(f"{name:8s}  {sum(r['losses'][:k]) / k:6.3f} -> {sum(r['losses'][-k:]) / k:6.3f}"
              f"             {r['test_loss']:9.3f}  {r['test_acc']:8.3f}  {r['pad_mass']:20.3f}"
              f"  {r['test_acc_padded']:30.3f}, {r['padding_change']:16.2e}  {r['seconds']:4.1f} s")
    att = results["effattn"]["attention"]
    print(f"\neffattn's pooling while it trains (effattn.nn.record_attention_stats; mean over the batch's clips,"
          f" first/last {k} steps): entropy {sum(a['entropy'] for a in att[:k]) / k:.2f} -> "
          f"{sum(a['entropy'] for a in att[-k:]) / k:.2f} nats, effective frames "
          f"{sum(a['effective_keys'] for a in att[:k]) / k:.1f} -> {sum(a['effective_keys'] for a in att[-k:]) / k:.1f}"
          f" (of {sum(a['frames'] for a in att[:k]) / k:.1f} -> {sum(a['frames'] for a in att[-k:]) / k:.1f} valid),"
          f" largest weight "
          f"{sum(a['max_weight'] for a in att[:k]) / k:.2f} -> {sum(a['max_weight'] for a in att[-k:]) / k:.2f}")
    for name in ("scenario", "effattn"):
        print(f"\n--- {name}: effattn.diagnostics.check() on {args.batch} test clips, before training ---\n"
              f"{results[name]['report_start']}")
        print(f"\n--- {name}: the same after {args.steps} steps ---\n{results[name]['report_end']}")
    return results


if __name__ == "__main__":
    main()
