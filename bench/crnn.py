#!/usr/bin/env python3
"""The CRNN scenario: seconds per 10 training iterations with each kind of attention.

    python3 bench/crnn.py                       # CUDA: B=32, T=800, hidden 256, bf16 autocast (fp16 below 8.0), 8 GiB cap
    python3 bench/crnn.py --device cpu          # a smaller model (see --help), each variant in a fresh process
    python3 bench/crnn.py --quick               # tiny smoke run

The model of shared/scenarios/crnn_long_sequence.txt: a convolutional feature extractor over a
text-line image (B, 1, 32, 4T) -> (B, T, hidden) columns -> bidirectional LSTM (RNN1) ->
self-attention -> bidirectional LSTM (RNN2) -> per-column classes -> CTC loss. Attention
variants (the same model otherwise):
  none     RNN1 -> RNN2, no attention (what the report trained in 0.2 s per 10 iterations);
  effattn  x + W_o effattn.attention(W_q x, W_k x, W_v x), 8 heads of 2*hidden/8;
  naive    the same with softmax(q k^T / sqrt(E)) v written out (the report's Approach 2.1:
           autograd keeps the (B, H, T, T) scores and probabilities);
  loop     the report's Approach 1: RNN2 replaced by a GRU stepped over time in Python, each
           step attending over RNN1's whole output (bmm, softmax, bmm, Linear(cat), tanh); the
           report measured it at 2.4 s per 10 iterations against 0.2 s.
Goal: effattn adds at most 20% to the no-attention time, and fits where naive does not.

Timing: --warmup iterations, then --iters timed ones (CUDA synchronised), scaled to 10
iterations; on the CPU all variants' models live in one process and are timed round-robin (one
iteration of each in turn: a shared CPU drifts). Memory: CUDA max_memory_allocated of a training
iteration (under the --cap-gib cap: torch.cuda.set_per_process_memory_fraction); CPU: each
variant runs one iteration (after a warm-up) in a fresh process and reports its peak RSS growth. Then (CUDA, or --fit-seqs): one training iteration per variant at
longer T under the cap, to show where each stops fitting. The convolutions over the (B, 1, 32, 4T)
image and the LSTMs grow with T too, so the "none" row is the model's own limit: the question is
whether an attention variant fits wherever the model without attention does.

Writes bench/results/crnn-<device>.json (+ .md, + .png).
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import common
from common import GiB, MiB, log

VARIANTS = ["none", "effattn", "naive", "loop"]


class SelfAttention(nn.Module):
    """x + W_o attention(W_q x, W_k x, W_v x), heads of dim d / heads."""

    def __init__(self, d, heads, kind):
        super().__init__()
        self.qkv, self.out, self.heads, self.kind = nn.Linear(d, 3 * d), nn.Linear(d, d), heads, kind

    def forward(self, x):  # (B, T, d)
        B, T, d = x.shape
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        if self.kind == "effattn":
            a = common.effattn.attention(q, k, v)
        else:
            a = common.naive_attention(q, k, v)
        return x + self.out(a.transpose(1, 2).reshape(B, T, d))


class LoopAttentionGRU(nn.Module):
    """The report's AttnLSTM (its GRU version): step a GRU over time; at each step attend the
    hidden state over the whole context and mix: tanh(W [h; softmax(C h) C])."""

    def __init__(self, d):
        super().__init__()
        self.rnn = nn.GRU(d, d)
        self.linear = nn.Linear(2 * d, d, bias=False)

    def forward(self, xs, context):  # xs (T, B, d), context (B, T, d)
        h = xs.new_zeros(1, xs.shape[1], xs.shape[2])
        outs = []
        for x in xs:
            res, h = self.rnn(x.unsqueeze(0), h)
            r = res.squeeze(0)
            attn = F.softmax(context.bmm(r.unsqueeze(2)).squeeze(2), dim=1)  # (B, T)
            weighted = attn.unsqueeze(1).bmm(context).squeeze(1)  # (B, d)
            outs.append(torch.tanh(self.linear(torch.cat((r, weighted), 1))))
        return torch.stack(outs, 0)


class CRNN(nn.Module):
    def __init__(self, attention, hidden=256, heads=8, classes=80, channels=(64, 128)):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(  # (B, 1, 32, 4T) -> (B, hidden, 8, T)
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c2, hidden, 3, padding=1), nn.ReLU(inplace=True))
        d = 2 * hidden
        self.rnn1 = nn.LSTM(hidden, hidden, bidirectional=True, batch_first=True)
        self.attention = attention
        if attention == "loop":
            self.rnn2 = LoopAttentionGRU(d)
        else:
            self.attn = SelfAttention(d, heads, attention) if attention != "none" else None
            self.rnn2 = nn.LSTM(d, hidden, bidirectional=True, batch_first=True)
        self.head = nn.Linear(d, classes + 1)  # + the CTC blank

    def forward(self, images):  # -> (T, B, classes + 1) log-probabilities
        cols = self.features(images).mean(dim=2).transpose(1, 2)  # (B, T, hidden)
        h, _ = self.rnn1(cols)
        if self.attention == "loop":
            y = self.rnn2(h.transpose(0, 1), context=h).transpose(0, 1)
        else:
            if self.attn is not None:
                h = self.attn(h)
            y, _ = self.rnn2(h)
        return F.log_softmax(self.head(y).float(), dim=-1).transpose(0, 1)


def make_batch(rt, B, T, classes, seed=0):
    g = torch.Generator(device=rt.device).manual_seed(seed)
    images = torch.randn(B, 1, 32, 4 * T, generator=g, device=rt.device)
    n = max(1, T // 8)
    targets = torch.randint(1, classes + 1, (B, n), generator=g, device=rt.device)
    return images, targets, torch.full((B,), T, dtype=torch.long), torch.full((B,), n, dtype=torch.long)


def amp_dtype(rt):
    """bf16 autocast from compute capability 8.0; float16 below (no bf16 tensor cores there)."""
    return torch.bfloat16 if not rt.cuda or rt.fake or torch.cuda.get_device_capability() >= (8, 0) else torch.float16


# Which effattn path each GPU generation takes (effattn/backends: the declarations behind auto).
GPU_PATHS = [
    ("Hopper, Ada, Ampere (compute capability 8.0-9.0)", "triton (or cuda: effattn's kernels)"),
    ("Turing (7.5: T4, RTX 20xx), Volta (7.0: V100)", "sdpa_efficient (PyTorch's memory-efficient kernel; "
                                                    "float16 or float32, bfloat16 needs 8.0); on Turing, cuda's "
                                                    "Turing tiles in an opt-in build (never run on a GPU)"),
    ("Pascal, Maxwell (6.x, 5.x: GTX 10xx, 9xx)", "sdpa_efficient, on a torch <= 2.14 cu126 build (CUDA 12.6: "
                                                  "the last that targets them)"),
]


def attention_path(rt, args):
    """The backend (and its kernel variant) auto picks for the model's attention call on this device."""
    dtype = amp_dtype(rt) if rt.cuda and not rt.fake and args.amp else torch.float32
    E = 2 * args.hidden // args.heads
    q = torch.zeros(args.batch, args.heads, args.seq, E, device=rt.device, dtype=dtype, requires_grad=True)
    spec = common.effattn.make_spec(q, q, q)
    chosen = common.effattn.backends.select(spec)
    variant = chosen.variant(spec)
    return chosen.name + (f" ({variant})" if variant else "")


class Trainer:
    def __init__(self, rt, variant, args, T):
        torch.manual_seed(0)
        self.rt, self.args = rt, args
        self.model = CRNN(variant, args.hidden, args.heads, args.classes, args.channels).to(rt.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.batch = make_batch(rt, args.batch, T, args.classes)
        self.autocast = rt.cuda and not rt.fake and args.amp

    def step(self):
        images, targets, in_len, tgt_len = self.batch
        with torch.autocast("cuda", dtype=amp_dtype(self.rt), enabled=self.autocast):
            logp = self.model(images)
        loss = F.ctc_loss(logp, targets, in_len, tgt_len, zero_infinity=True)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


def measure(rt, variant, args, T, iters, warmup):
    """dict(s_per_10, peak_bytes, status) of one variant at sequence length T."""
    res = dict(variant=variant, T=T, B=args.batch)
    try:
        tr = Trainer(rt, variant, args, T)
        for _ in range(warmup):
            tr.step()
        rt.sync()
        rt.reset_peak()
        base = rt.allocated() if rt.rss else 0
        t0 = time.perf_counter()
        loss = None
        for _ in range(iters):
            loss = tr.step()
        rt.sync()
        dt = time.perf_counter() - t0
        res.update(status="ok", s_per_10=10 * dt / max(iters, 1), iters=iters,
                   peak_bytes=rt.peak() - base, loss=loss.item() if loss is not None else None)
        if rt.rss and rt.cap_bytes is not None and res["peak_bytes"] > rt.cap_bytes:
            res["status"] = "OOM"
    except Exception as exc:  # noqa: BLE001
        res["status"] = common.classify_error(exc)
    tr = None
    rt.cleanup()
    return res


def round_robin(rt, variants, args, T, iters, warmup):
    """CPU timing: every variant's model in this process, one iteration of each in turn (a
    shared CPU drifts over minutes; this way each variant sees the same conditions).
    {variant: (s per 10 iterations (median), status)}."""
    trainers, out = {}, {}
    for v in variants:
        try:
            trainers[v] = Trainer(rt, v, args, T)
        except Exception as exc:  # noqa: BLE001
            out[v] = (None, common.classify_error(exc))
    times = {v: [] for v in trainers}
    for i in range(warmup + iters):
        for v, tr in list(trainers.items()):
            try:
                t0 = time.perf_counter()
                tr.step()
                if i >= warmup:
                    times[v].append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001
                out[v] = (None, common.classify_error(exc))
                del trainers[v]
        log(f"  round {i + 1}/{warmup + iters}" + (" (warm-up)" if i < warmup else "") + ": "
            + ", ".join(f"{v} {times[v][-1]:.2f} s" for v in trainers if i >= warmup and times[v]))
    for v in trainers:
        out[v] = (10 * statistics.median(times[v]), "ok")
    return out


def worker(spec, args):
    """CPU: one variant in a fresh process (its peak RSS is its own)."""
    rt = common.Runtime("cpu")
    r = measure(rt, spec["variant"], args, spec["T"], spec["iters"], spec["warmup"])
    print(json.dumps(r))


def measure_subprocess(variant, argv, T, iters, warmup):
    spec = dict(variant=variant, T=T, iters=iters, warmup=warmup)
    p = subprocess.run([sys.executable, __file__, *argv, "--worker", json.dumps(spec)], capture_output=True, text=True)
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        return dict(variant=variant, T=T, status="OOM" if p.returncode in (-9, 137) else
                    "error: " + (p.stderr.strip().splitlines() or ["?"])[-1][:200])
    return json.loads(lines[-1])


def tables(res, markdown=False):
    none = next((r for r in res["timing"] if r["variant"] == "none" and r["status"] == "ok"), None)
    rows = []
    for r in res["timing"]:
        if r["status"] != "ok":
            rows.append([r["variant"], common.short(r["status"]), "", "", ""])
            continue
        rows.append([r["variant"], f"{r['s_per_10']:.3f}",
                     f"{r['s_per_10'] / none['s_per_10']:.2f}x" if none else "-",
                     f"{(r['s_per_10'] / none['s_per_10'] - 1) * 100:+.0f}%" if none else "-",
                     f"{r['peak_bytes'] / MiB:,.0f}" if r.get("peak_bytes") is not None
                     else common.short(r.get("memory_status", "-"))])
    a = res["config"]
    out = [(f"CRNN B={a['batch']} T={a['seq']} hidden={a['hidden']} heads={a['heads']} "
            f"(attention E={2 * a['hidden'] // a['heads']}){' autocast' if res['amp'] else ' float32'}"
            + (f", effattn via {res['attention_backend']}" if res.get("attention_backend") else "")
            + (f", cap {res['cap_bytes'] / GiB:g} GiB" if res.get("cap_bytes") else "")
            + ": one training iteration (forward, CTC loss, backward, Adam)",
            common.table(["attention", "s / 10 iterations", "vs none", "added", "peak MiB"], rows, markdown))]
    if res.get("fit"):
        Ts = sorted({r["T"] for r in res["fit"]})
        frows = []
        for v in res["variants"]:
            by = {r["T"]: r for r in res["fit"] if r["variant"] == v}
            frows.append([v] + [("fits, " + f"{by[T]['peak_bytes'] / MiB:,.0f} MiB") if T in by and by[T]["status"] == "ok"
                                else common.short(by[T]["status"]) if T in by else "-" for T in Ts])
        out.append((f"does one training iteration fit (B={a['batch']}"
                    + (f", cap {res['cap_bytes'] / GiB:g} GiB" if res.get("cap_bytes") else "") + ")?",
                    common.table(["attention"] + [f"T={T}" for T in Ts], frows, markdown)))
    return out


def draw(res):
    def fig(plt):
        rows = [r for r in res["timing"] if r["status"] == "ok"]
        f, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        axes[0].bar([r["variant"] for r in rows], [r["s_per_10"] for r in rows],
                    color=["tab:green" if r["variant"] == "effattn" else "tab:gray" for r in rows])
        axes[0].set_ylabel("s per 10 training iterations")
        axes[0].set_title(f"T={res['config']['seq']}, B={res['config']['batch']}", fontsize=9)
        for v in res["variants"]:
            pts = [(r["T"], r["peak_bytes"] / MiB) for r in res.get("fit", []) if r["variant"] == v and r["status"] == "ok"]
            if pts:
                axes[1].plot(*zip(*pts), marker="o", label=v)
        if res.get("cap_bytes"):
            axes[1].axhline(res["cap_bytes"] / MiB, color="k", linestyle="--", label="cap")
        axes[1].set_xscale("log", base=2)
        axes[1].set_xlabel("T (sequence length)")
        axes[1].set_ylabel("peak MiB, one iteration")
        axes[1].legend(fontsize=7)
        f.suptitle(f"CRNN training: {res['meta']['device_name']}", fontsize=10)
    return fig


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(ap)
    ap.add_argument("--batch", type=int, default=None, help="default 32 (CUDA), 4 (CPU)")
    ap.add_argument("--seq", type=int, default=None, help="T, columns per line (default 800)")
    ap.add_argument("--hidden", type=int, default=None, help="LSTM hidden size per direction (default 256 CUDA, 128 CPU)")
    ap.add_argument("--heads", type=int, default=None, help="default 8 (CUDA: head dim 64), 4 (CPU: 64)")
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--channels", default=None, help="conv channels c1,c2 (default 64,128 CUDA, 16,32 CPU)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 10 CUDA, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--cap-gib", type=float, default=None, help="CUDA memory cap (default 8; 0 = none)")
    ap.add_argument("--fit-seqs", default=None, help="T values for the fit check (default CUDA 800,1600,3200,6400)")
    ap.add_argument("--no-amp", dest="amp", action="store_false", help="CUDA: float32 instead of autocast")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    q_ = args.quick
    args.batch = args.batch or (2 if q_ else 32 if cuda else 4)
    args.seq = args.seq or (64 if q_ else 800)
    args.hidden = args.hidden or (16 if q_ else 256 if cuda else 128)
    args.heads = args.heads or (8 if q_ or cuda else 4)
    args.channels = tuple(int(c) for c in (args.channels or ("4,8" if q_ else "64,128" if cuda else "16,32")).split(","))
    args.iters = args.iters or (1 if q_ else 10 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if q_ or not cuda else 3)
    if args.worker:
        worker(json.loads(args.worker), args)
        return None
    rt = common.Runtime(args.device)
    cap = (args.cap_gib if args.cap_gib is not None else (8.0 if rt.cuda and not q_ else 0)) * GiB
    if cap:
        rt.set_cap(cap)
    methods = common.select_methods([common.Method(v, None, v) for v in VARIANTS], args.methods)
    variants = [x.name for x in methods]
    m = common.meta(rt, "crnn.py", argv)
    log(common.stamp(m))
    a = args
    log(f"CRNN B={a.batch} T={a.seq} hidden={a.hidden} heads={a.heads} channels={a.channels}; variants "
        + ", ".join(variants) + (f"; cap {cap / GiB:g} GiB" if cap else ""))
    path_here = attention_path(rt, a) if not rt.fake else "-"
    log(f"effattn's attention here: {path_here}")
    for gpus, path in GPU_PATHS:
        log(f"  {gpus}: {path}")
    in_process = rt.cuda or q_
    prog = common.Progress(len(variants), args.max_seconds)
    timing = []
    rr = None
    if not in_process:  # CPU: times round-robin in this process, memory from a fresh process each
        log(f"timing: {a.warmup} warm-up + {a.iters} timed iterations of each variant, round-robin")
        rr = round_robin(rt, variants, a, a.seq, a.iters, a.warmup)
        log("memory: one iteration (after one warm-up) per variant, each in a fresh process")
    for v in variants:
        if rr is not None:  # CPU: the round-robin time; the memory from a fresh process if time is left
            s10, st = rr[v]
            r = dict(variant=v, T=a.seq, B=a.batch, status=st, s_per_10=s10, iters=a.iters,
                     timing="round-robin, in one process")
            if st == "ok" and not prog.over_budget():
                mem = measure_subprocess(v, argv, a.seq, 1, 1)
                r["peak_bytes"] = mem.get("peak_bytes")
                if mem["status"] != "ok":
                    r["memory_status"] = mem["status"]
            elif st == "ok":
                r["memory_status"] = f"skipped: --max-seconds {a.max_seconds:g}"
        elif prog.over_budget():
            r = dict(variant=v, T=a.seq, status=f"skipped: --max-seconds {a.max_seconds:g}")
        else:
            r = measure(rt, v, a, a.seq, a.iters, a.warmup)
        timing.append(r)
        prog.step(f"{v}: " + (f"{r['s_per_10']:.3f} s / 10 iterations, peak "
                              + (f"{r['peak_bytes'] / MiB:,.0f} MiB" if r.get("peak_bytes") is not None
                                 else r.get("memory_status", "?"))
                              if r["status"] == "ok" else r["status"]))

    fit = []
    seqs = [int(s) for s in args.fit_seqs.split(",")] if args.fit_seqs else (
        [96] if q_ else [800, 1600, 3200, 6400] if rt.cuda else [])
    if seqs:
        log("fit check: one training iteration per variant and T" + (f" under {cap / GiB:g} GiB" if cap else ""))
        for v in variants:
            failed = False
            for T in seqs:
                if failed or prog.over_budget():
                    r = dict(variant=v, T=T, status="OOM at a shorter T" if failed else
                             f"skipped: --max-seconds {a.max_seconds:g}")
                elif in_process:
                    r = measure(rt, v, a, T, 1, 0)
                else:
                    r = measure_subprocess(v, argv, T, 1, 0)
                fit.append(r)
                failed = failed or r["status"] == "OOM"
                log(f"  {v:8s} T={T:<6d}: " + (f"fits, peak {r['peak_bytes'] / MiB:,.0f} MiB, {r['s_per_10'] / 10:.2f} s"
                                               if r["status"] == "ok" else r["status"]))

    none = next((r for r in timing if r["variant"] == "none" and r["status"] == "ok"), None)
    eff = next((r for r in timing if r["variant"] == "effattn" and r["status"] == "ok"), None)
    goals = {}
    if none and eff:
        goals["effattn_added_fraction"] = eff["s_per_10"] / none["s_per_10"] - 1
        goals["effattn_within_20_percent"] = goals["effattn_added_fraction"] <= 0.20
    res = dict(meta=m, config=dict(batch=a.batch, seq=a.seq, hidden=a.hidden, heads=a.heads, classes=a.classes,
                                   channels=list(a.channels), iters=a.iters, warmup=a.warmup),
               amp=bool(rt.cuda and not rt.fake and a.amp), cap_bytes=cap or None, variants=variants,
               attention_backend=path_here, gpu_paths=GPU_PATHS,
               measure=("torch.cuda.max_memory_allocated" if rt.cuda and not rt.fake else
                        "peak RSS growth, fresh process per variant" if not in_process else "process RSS (smoke run)"),
               timing=timing, fit=fit, goals=goals, runtime_s=prog.elapsed())
    path = common.out_path(args, "crnn", rt.kind)
    common.write_results(path, "bench/crnn.py", m, res, tables, draw)
    if goals:
        log(f"effattn adds {goals['effattn_added_fraction'] * 100:+.0f}% to the no-attention iteration "
            f"(goal: at most +20%: {'met' if goals['effattn_within_20_percent'] else 'NOT met'})")
    log(f"total {prog.elapsed():.1f} s")
    return res


if __name__ == "__main__":
    main()
