#!/usr/bin/env python3
"""float32 accuracy of effattn's CPU kernel against PyTorch's CPU SDPA kernel, both measured
against float64 math on the same random rows (issues 28 and 29).

    python3 bench/dev/cpu_accuracy_sweep.py                     # the full sweep (>= 10^5 rows)
    python3 bench/dev/cpu_accuracy_sweep.py --before DIR        # also effattn built in DIR (e.g. a
                                                                # worktree at the unfixed commit)
    python3 bench/dev/cpu_accuracy_sweep.py --quick             # a few configs (smoke run)

Each config (B, Hq, Hkv, L, S, E, causal) draws q, k, v and the output gradient from N(0, 1)
with a fixed seed and runs, in float32, effattn.attention(backend="cpu") and
torch.nn.functional.scaled_dot_product_attention (on the CPU it picks its flash kernel,
torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, also under enable_gqa; the
LSE is that op's logsumexp, with k and v repeated over the group), forward and backward, and
the float64 math (effattn.reference, the tests' oracle) on the same inputs.

Errors, per row: out, lse and dq have a row per (batch, query head, query); dk and dv per
(batch, key head, key). A row's error is the largest |float32 - float64| over its elements,
divided (out, dq, dk, dv) by the RMS of that config's float64 tensor, so that configs of
different magnitudes (dK grows with the number of queries) pool fairly; the LSE's error is
absolute (nat units). Reported per quantity over all rows: the max and the 99.9th
percentile, effattn's and SDPA's, and their ratio (the goal: <= 1.5).

Writes bench/results/cpu-accuracy.{json,md} (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

QUANTITIES = ("out", "lse", "dq", "dk", "dv")

# (B, Hq, Hkv, L, S, E, causal). Head dims 32-256 (odd ones too), S up to 4096, MHA and GQA/MQA
# with group sizes 2, 6, 8, causal and not.  Query rows: sum of B * Hq * L.
FULL = [
    # MHA
    (4, 6, 6, 200, 200, 64, True), (4, 6, 6, 256, 256, 64, False),
    (2, 8, 8, 333, 333, 32, True), (2, 8, 8, 300, 517, 32, False),
    (2, 6, 6, 512, 512, 59, True), (2, 6, 6, 257, 700, 80, False),
    (2, 4, 4, 640, 640, 96, True), (1, 8, 8, 384, 1024, 128, False),
    (1, 4, 4, 1024, 1024, 128, True), (1, 4, 4, 300, 2048, 40, False),
    (1, 2, 2, 2048, 2048, 64, True), (1, 2, 2, 256, 4096, 64, False),
    (1, 2, 2, 4096, 4096, 32, True), (1, 2, 2, 512, 4096, 128, False),
    (2, 4, 4, 256, 256, 192, True), (2, 4, 4, 200, 640, 256, False),
    (1, 2, 2, 1024, 1024, 256, True), (1, 2, 2, 128, 4096, 256, False),
    # GQA / MQA: groups 2, 6, 8
    (2, 6, 1, 255, 256, 59, True), (2, 6, 1, 256, 256, 64, False),
    (2, 8, 4, 400, 400, 64, True), (2, 8, 4, 300, 1000, 48, False),
    (1, 12, 2, 512, 512, 128, True), (1, 12, 2, 256, 2048, 96, False),
    (1, 8, 1, 1024, 1024, 64, True), (1, 8, 1, 200, 4096, 32, False),
    (1, 16, 2, 600, 600, 80, True), (1, 16, 8, 256, 1536, 128, False),
    (1, 6, 1, 2048, 2048, 64, True), (1, 8, 1, 256, 4096, 64, False),
    (1, 4, 2, 256, 256, 256, True), (1, 6, 1, 128, 1024, 256, False),
    (1, 8, 1, 2048, 2048, 32, True), (1, 16, 2, 400, 400, 192, False),
    (1, 2, 1, 4096, 4096, 64, True), (2, 12, 2, 256, 256, 32, True),
]
QUICK = [(2, 6, 1, 255, 256, 59, True), (2, 4, 4, 200, 300, 64, False)]


def config_name(cfg):
    B, Hq, Hkv, L, S, E, causal = cfg
    return f"B{B} Hq{Hq} Hkv{Hkv} L{L} S{S} E{E}" + (" causal" if causal else "")


def inputs(cfg, seed):
    B, Hq, Hkv, L, S, E, causal = cfg
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, L, E, generator=g), torch.randn(B, Hkv, S, E, generator=g),
            torch.randn(B, Hkv, S, E, generator=g), torch.randn(B, Hq, L, E, generator=g))


def _grads(out, leaves, dout):
    return torch.autograd.grad(out, leaves, dout)


def run_effattn(cfg, seed):
    import effattn
    B, Hq, Hkv, L, S, E, causal = cfg
    q, k, v, dout = inputs(cfg, seed)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out, lse = effattn.attention(*leaves, is_causal=causal, enable_gqa=Hq != Hkv, return_lse=True,
                                 backend="cpu")
    dq, dk, dv = _grads(out, leaves, dout)
    return dict(out=out.detach(), lse=lse.detach(), dq=dq, dk=dk, dv=dv)


def run_sdpa(cfg, seed):
    B, Hq, Hkv, L, S, E, causal = cfg
    q, k, v, dout = inputs(cfg, seed)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, is_causal=causal, enable_gqa=Hq != Hkv)
    dq, dk, dv = _grads(out, leaves, dout)
    g = Hq // Hkv
    with torch.no_grad():
        lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), 0.0, causal)[1]
    return dict(out=out.detach(), lse=lse, dq=dq, dk=dk, dv=dv)


def run_float64(cfg, seed):
    """The float64 math, one (batch, key head) and its query heads at a time (memory)."""
    from effattn import reference
    B, Hq, Hkv, L, S, E, causal = cfg
    g = Hq // Hkv
    q, k, v, dout = (t.double() for t in inputs(cfg, seed))
    res = dict(out=torch.empty_like(q), lse=torch.empty(B, Hq, L, dtype=torch.float64),
               dq=torch.empty_like(q), dk=torch.empty_like(k), dv=torch.empty_like(v))
    for b in range(B):
        for h in range(Hkv):
            qs = slice(h * g, (h + 1) * g)
            leaves = [t.requires_grad_() for t in (q[b:b + 1, qs].clone(), k[b:b + 1, h:h + 1].clone(),
                                                   v[b:b + 1, h:h + 1].clone())]
            out, lse = reference.attention(*leaves, is_causal=causal, enable_gqa=g != 1, return_lse=True,
                                           compute_dtype=torch.float64)
            dq, dk, dv = _grads(out, leaves, dout[b:b + 1, qs])
            res["out"][b, qs], res["lse"][b, qs], res["dq"][b, qs] = out[0].detach(), lse[0].detach(), dq[0]
            res["dk"][b, h], res["dv"][b, h] = dk[0, 0], dv[0, 0]
    return res


def row_errors(got, ref):
    """{quantity: 1-D float64 tensor of per-row errors} (see the module docstring)."""
    errs = {}
    for name in QUANTITIES:
        d = (got[name].double() - ref[name]).abs()
        if name == "lse":
            errs[name] = d.flatten()
        else:
            rms = ref[name].pow(2).mean().sqrt().clamp_min(1e-300)
            errs[name] = (d.amax(-1) / rms).flatten()
    return errs


def summary(errs):
    """{quantity: (max, 99.9th percentile, rows)} of pooled per-row errors."""
    res = {}
    for name in QUANTITIES:
        e = torch.cat([x[name] for x in errs])
        res[name] = (e.max().item(), torch.quantile(e, 0.999).item() if e.numel() < 2 ** 24
                     else e.sort().values[int(0.999 * (e.numel() - 1))].item(), e.numel())
    return res


def sweep(configs, seed=0, effattn_outputs=None, log=print):
    """Per-row errors of effattn (this checkout, or the saved outputs of another build) and of
    SDPA, each a list over configs of {quantity: tensor}; plus per-config summaries."""
    eff, sdpa, per_config = [], [], []
    for n, cfg in enumerate(configs):
        t0 = time.time()
        ref = run_float64(cfg, seed + n)
        e = row_errors(effattn_outputs[n] if effattn_outputs else run_effattn(cfg, seed + n), ref)
        s = row_errors(run_sdpa(cfg, seed + n), ref)
        eff.append(e)
        sdpa.append(s)
        row = dict(config=config_name(cfg))
        for q in QUANTITIES:
            row[f"{q}_ratio_max"] = e[q].max().item() / s[q].max().item()
            row[f"{q}_ratio_p999"] = torch.quantile(e[q], 0.999).item() / torch.quantile(s[q], 0.999).item()
        per_config.append(row)
        log(f"[{n + 1}/{len(configs)}] {config_name(cfg)} ({time.time() - t0:.1f} s): " +
            " ".join(f"{q} {row[f'{q}_ratio_max']:.2f}" for q in QUANTITIES))
    return eff, sdpa, per_config


def split(configs, errs):
    """(MHA errors, GQA errors) from a per-config list."""
    mha = [e for c, e in zip(configs, errs) if c[1] == c[2]]
    gqa = [e for c, e in zip(configs, errs) if c[1] != c[2]]
    return mha, gqa


def compare(configs, eff, sdpa):
    """{group: {quantity: dict(max, p999, sdpa_max, sdpa_p999, ratio_max, ratio_p999, rows)}}."""
    groups = {"all": (eff, sdpa)}
    (em, eg), (sm, sg) = split(configs, eff), split(configs, sdpa)
    if em:
        groups["mha"] = (em, sm)
    if eg:
        groups["gqa"] = (eg, sg)
    res = {}
    for gname, (e, s) in groups.items():
        se, ss = summary(e), summary(s)
        res[gname] = {q: dict(max=se[q][0], p999=se[q][1], sdpa_max=ss[q][0], sdpa_p999=ss[q][1],
                              ratio_max=se[q][0] / ss[q][0], ratio_p999=se[q][1] / ss[q][1], rows=se[q][2])
                      for q in QUANTITIES}
    return res


def _dump_outputs(configs, seed, path):
    """Child-process mode: effattn's outputs (from the build on sys.path) saved to path."""
    import effattn
    print(f"effattn from {effattn.__file__}", flush=True)
    torch.save([run_effattn(cfg, seed + n) for n, cfg in enumerate(configs)], path)


def outputs_of_build(root, configs, seed, log):
    """effattn's outputs from the build in another checkout (run in a child process: one
    process cannot load two builds of the extension)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "outs.pt")
        cfg_path = os.path.join(tmp, "configs.json")
        with open(cfg_path, "w") as f:
            json.dump(configs, f)
        env = dict(os.environ, PYTHONPATH=os.path.abspath(root))
        log(f"running effattn from {root} in a child process")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--dump", path, "--configs-json", cfg_path,
                        "--seed", str(seed)], env=env, check=True, cwd=root)
        return torch.load(path)


def git(root, *args):
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return "unknown"


def markdown(res, before, meta):
    lines = [f"# CPU float32 accuracy against float64: effattn vs SDPA's CPU kernel", "",
             f"{meta['date']}, {meta['cpu']} ({meta['isa']} variant, {meta['threads']} threads), torch "
             f"{meta['torch']}, effattn {meta['effattn_commit']}; `{meta['command']}`; "
             f"{meta['rows']} query rows in {meta['configs']} configs.", "",
             "Per-row error: max |float32 - float64| over the row, over the config's float64 RMS "
             "(lse: absolute). Ratio = effattn / SDPA (goal <= 1.5).", ""]
    for title, r in (("after", res), ("before", before)):
        if r is None:
            continue
        lines += [f"## {title}" + (" (effattn at " + meta.get("before_commit", "?") + ")" if title == "before" else ""), "",
                  "| rows | quantity | effattn max | SDPA max | ratio | effattn p99.9 | SDPA p99.9 | ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for g, qs in r.items():
            for q, d in qs.items():
                lines.append(f"| {g} ({d['rows']}) | {q} | {d['max']:.3g} | {d['sdpa_max']:.3g} | "
                             f"{d['ratio_max']:.2f} | {d['p999']:.3g} | {d['sdpa_p999']:.3g} | {d['ratio_p999']:.2f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--before", help="a checkout with another effattn build to measure too (e.g. the unfixed commit)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    ap.add_argument("--configs-json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    configs = QUICK if args.quick else FULL
    if args.configs_json:
        with open(args.configs_json) as f:
            configs = [tuple(c) for c in json.load(f)]
    if args.dump:
        _dump_outputs(configs, args.seed, args.dump)
        return None
    sys.path.insert(0, ROOT)
    import effattn
    sys.path.insert(0, os.path.dirname(HERE))
    from common import cpu_model  # (after effattn: common puts this checkout first on sys.path)
    log = lambda m: print(m, flush=True)  # noqa: E731
    log(f"effattn from {effattn.__file__}")
    t0 = time.time()
    eff, sdpa, per_config = sweep(configs, args.seed, log=log)
    res = compare(configs, eff, sdpa)
    before = None
    if args.before:
        outs = outputs_of_build(args.before, configs, args.seed, log)
        eff_b, _, per_config_b = sweep(configs, args.seed, effattn_outputs=outs, log=log)
        before = compare(configs, eff_b, sdpa)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                cpu=cpu_model(), isa=effattn.backends.BY_NAME["cpu"].isa()[0],
                threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
                effattn_commit=git(ROOT, "rev-parse", "--short", "HEAD") + (" (modified)" if git(ROOT, "status", "--porcelain", "--untracked-files=no") else ""),
                command=" ".join(["python3", "bench/dev/cpu_accuracy_sweep.py"] + list(argv if argv is not None else sys.argv[1:])),
                rows=sum(c[0] * c[1] * c[3] for c in configs), configs=len(configs), seconds=round(time.time() - t0, 1))
    if args.before:
        meta["before_commit"] = git(args.before, "rev-parse", "--short", "HEAD")
    report = dict(meta=meta, after=res, before=before, per_config=per_config,
                  per_config_before=per_config_b if args.before else None, configs=configs)
    suffix = "-quick" if args.quick else ""
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"cpu-accuracy{suffix}.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = markdown(res, before, meta)
    with open(os.path.join(args.out, f"cpu-accuracy{suffix}.md"), "w") as f:
        f.write(md)
    log(md)
    return report


if __name__ == "__main__":
    main()
