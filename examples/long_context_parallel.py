#!/usr/bin/env python3
"""One training step of a small causal language model whose sequence is sharded across processes.

Each of the P processes (CPU, gloo; the same code runs with NCCL on GPUs) holds 1/P of the
sequence: its tokens, their global positions and their targets, in effattn's zigzag layout
(rank r holds chunks r and 2P-1-r of 2P, so causal attention costs every rank the same). The
model's only cross-token step, attention, is ``effattn.distributed.ring_attention``: the K/V
shards travel around the ring, and in the backward their gradients travel back to their owner.
Everything else (embeddings, projections, MLP, the loss) is per token. The parameters are
replicated, so after the backward their gradients are summed over the ranks (an all-reduce, as
DDP would do), and every rank takes the same optimizer step.

To show that nothing is lost, rank 0 also runs the same model on the whole sequence in one
process (``effattn.attention``) and compares the loss and every parameter gradient.

    python3 examples/long_context_parallel.py                 # 2 processes, 4096 tokens
    python3 examples/long_context_parallel.py --procs 4 --seq 8192
"""
import argparse
import datetime
import importlib
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import effattn
import effattn.distributed as cp


class Block(nn.Module):
    """Pre-norm transformer block with grouped-query causal attention."""

    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, attend):
        B, N, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, E): N is this rank's
        k, v = self.kv(h).view(B, N, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = attend(q, k, v)
        x = x + self.out(a.transpose(1, 2).reshape(B, N, -1))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab, dim, heads, kv_heads, layers, max_len):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens, positions, attend):
        x = self.tok(tokens) + self.pos(positions)  # global positions: each rank knows its own
        for block in self.blocks:
            x = block(x, attend)
        return self.head(x)


def make_data(args):
    """A sequence with long-range structure: a random prefix, then the same tokens repeated."""
    g = torch.Generator().manual_seed(0)
    period = args.seq // 4
    motif = torch.randint(0, args.vocab, (args.batch, period), generator=g)
    tokens = motif.repeat(1, args.seq // period + 1)[:, :args.seq + 1]
    return tokens[:, :-1], tokens[:, 1:]  # inputs, next-token targets


def build(args):
    torch.manual_seed(1)  # the same initial parameters on every rank
    return TinyLM(args.vocab, args.dim, args.heads, args.kv_heads, args.layers, args.seq)


def sharded_step(rank, P, args):
    """This rank's part of one training step; returns (loss, flat gradient, loss after the step)."""
    model = build(args)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    inputs, targets = make_data(args)
    positions = torch.arange(args.seq).expand(args.batch, -1)
    # this rank's shard of the sequence dim (dim 1 of (B, N) token tensors)
    inputs, targets, positions = (cp.shard(t, dim=1) for t in (inputs, targets, positions))

    def attend(q, k, v):
        return cp.ring_attention(q, k, v, is_causal=True, enable_gqa=True)

    def loss_fn():
        logits = model(inputs, positions, attend)
        # this rank's share of the mean over all B x L tokens: the ranks' losses sum to the loss
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / (args.batch * args.seq)

    loss = loss_fn()
    loss.backward()
    for p in model.parameters():  # replicated parameters: sum the ranks' gradients
        dist.all_reduce(p.grad)
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    opt.step()
    with torch.no_grad():
        after = loss_fn()
    dist.all_reduce(after)
    return total.item(), grads, after.item()


def single_process_step(args):
    """The same step on the whole sequence in one process, with effattn.attention."""
    model = build(args)
    inputs, targets = make_data(args)
    positions = torch.arange(args.seq).expand(args.batch, -1)
    logits = model(inputs, positions, lambda q, k, v: effattn.attention(q, k, v, is_causal=True, enable_gqa=True))
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


def worker(rank, P, args, store_path, results):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: loopback
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, P), rank=rank, world_size=P,
                            timeout=datetime.timedelta(seconds=120))
    try:
        t0 = time.perf_counter()
        loss, grads, after = sharded_step(rank, P, args)
        seconds = time.perf_counter() - t0
        if rank == 0:
            ref_loss, ref_grads = single_process_step(args)
            results.put(dict(loss=loss, loss_after_step=after, single_process_loss=ref_loss, seconds=seconds,
                             grad_max_abs_diff=(grads - ref_grads).abs().max().item(),
                             grad_max_abs=ref_grads.abs().max().item()))
    finally:
        dist.destroy_process_group()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096, help="tokens per sequence (a multiple of 2 x procs x 4)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=300)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # The spawned processes import this file by name to find ``worker`` (a script's own __main__
    # is handled by multiprocessing itself); a copy loaded from its path (as the tests do) is not
    # what they would import, so hand them the importable one.
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    target = worker if __name__ == "__main__" else importlib.import_module("long_context_parallel").worker
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = mp.start_processes(target, args=(args.procs, args, os.path.join(tmp, "store"), results),
                                   nprocs=args.procs, join=False, start_method="spawn")
        deadline = time.monotonic() + args.timeout
        while not procs.join(timeout=5):  # raises, with the failing rank's traceback, if one fails
            if time.monotonic() > deadline:
                for p in procs.processes:
                    p.kill()
                raise SystemExit(f"timed out after {args.timeout:.0f} s")
    res = results.get()
    print(f"{args.procs} processes x {args.seq // args.procs} tokens (sequence of {args.seq}, zigzag layout): "
          f"loss {res['loss']:.6f}, single process on the whole sequence {res['single_process_loss']:.6f}")
    print(f"parameter gradients: max |sharded - single| = {res['grad_max_abs_diff']:.2e} "
          f"(largest gradient {res['grad_max_abs']:.2e})")
    print(f"after one SGD step: loss {res['loss_after_step']:.6f}; the step took {res['seconds']:.2f} s on rank 0")
    return res


if __name__ == "__main__":
    main()
