"""Development benchmark for the GPU kernels (Triton, and CUDA once built):
effattn against SDPA's flash / efficient / cuDNN backends (and FlexAttention
with --flex) in one process, on issue 3's grid: 16k tokens per batch,
hidden 2048 (H = 2048 / E), L = S in {1k .. 16k}, causal or not; plus key
padding (half the batch at half length) and a large-shape accuracy check.

FLOPs (written here, as everywhere in bench/): forward 4*B*H*L*S*E, halved
for causal; backward 2.5x forward; forward+backward 3.5x.

Usage: python3 bench/dev/triton_gpu.py --out DIR [--dtypes bf16,fp16] [--dims 64,128]
         [--lengths 1024,...] [--methods effattn,flash,efficient,cudnn] [--flex] [--max-seconds N]
Methods: effattn (auto), effattn+tma (effattn.config.triton_tma = "1"), flash, efficient, cudnn, math, flex.
Writes DIR/triton-gpu.json and prints a table. bench/speed.py is the user-facing sweep.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import effattn  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def flops_fwd(B, H, L, S, E, causal):
    f = 4 * B * H * L * S * E
    return f / 2 if causal else f


def make_call(method, q, k, v, causal, lengths=None, dense_mask=None, backend=None):
    if method == "effattn+tma":  # the opt-in tensor-descriptor loads of the Triton forward
        plain = make_call("effattn", q, k, v, causal, lengths, dense_mask, backend)

        def with_tma():
            with effattn.config.override(triton_tma="1"):
                return plain()
        return with_tma
    if method.startswith("effattn"):
        kw = dict(is_causal=causal)
        if lengths is not None:
            kw.update(key_lengths=lengths)
            if method == "effattn+qlen":  # padded query rows skipped too (their output is 0)
                kw.update(query_lengths=lengths)
        if backend:
            kw["backend"] = backend
        return lambda: effattn.attention(q, k, v, **kw)
    if method == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = make_call.flex = getattr(make_call, "flex", None) or torch.compile(flex_attention)
        B, H, L, S = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        if lengths is not None:
            def mod(b, h, i, j):
                return j < lengths[b]
        elif causal:
            def mod(b, h, i, j):
                return j <= i
        else:
            mod = None
        bm = create_block_mask(mod, B, None, L, S, device=q.device) if mod else None
        return lambda: flex(q, k, v, block_mask=bm)
    be = SDPA[method]

    def run():
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask,
                                                  is_causal=causal and dense_mask is None)
    return run


def bench(fn, backward):
    if backward:
        out = fn()
        g = torch.randn_like(out)
        ins = [t for t in bench.inputs if t.requires_grad]

        def step():
            for t in ins:
                t.grad = None
            fn().backward(g)
        fn2 = step
    else:
        fn2 = fn
    fn2()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn2, warmup=25, rep=100, return_mode="median")


def accuracy(dtype):
    """Large-shape error vs float32 math, effattn and flash side by side (fwd + grads)."""
    B, H, L, E = 2, 8, 4096, 128
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, E, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(B, H, L, E, device="cuda", dtype=dtype)
    res = {}
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(q32, k32, v32, is_causal=True)
    ref.backward(g.float())
    refs = [ref.detach()] + [t.grad for t in (q32, k32, v32)]
    for name, fn in (("effattn", lambda: effattn.attention(q, k, v, is_causal=True)),
                     ("flash", make_call("flash", q, k, v, True))):
        for t in (q, k, v):
            t.grad = None
        out = fn()
        out.backward(g)
        got = [out.detach()] + [t.grad for t in (q, k, v)]
        res[name] = {n: ((a.float() - b).norm() / b.norm()).item()
                     for n, a, b in zip(("out", "dq", "dk", "dv"), got, refs)}
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--dtypes", default="bf16")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--methods", default="effattn,flash,efficient,cudnn")
    ap.add_argument("--effattn-backends", default="")
    ap.add_argument("--flex", action="store_true")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--max-seconds", type=float, default=400)
    args = ap.parse_args()
    t0 = time.time()
    methods = args.methods.split(",") + (["flex"] if args.flex else [])
    methods = [m for m in methods]
    for extra in filter(None, args.effattn_backends.split(",")):
        methods.insert(1, f"effattn:{extra}")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=sys.version.split()[0], date=datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z",
                command=" ".join(sys.argv),
                commit=os.environ.get("EFFATTN_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                      cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown")
    rows = []
    result = dict(meta=meta, rows=rows)
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        result.setdefault("accuracy", {})[dname] = accuracy(dtype)
        print("accuracy", dname, result["accuracy"][dname], flush=True)
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        for E in map(int, args.dims.split(",")):
            H = 2048 // E
            for causal in (False, True):
                for L in map(int, args.lengths.split(",")):
                    if time.time() - t0 > args.max_seconds:
                        print("time budget reached; stopping", flush=True)
                        break
                    B = max(1, args.tokens // L)
                    q, k, v = (torch.randn(B, H, L, E, device="cuda", dtype=dtype, requires_grad=True)
                               for _ in range(3))
                    bench.inputs = (q, k, v)
                    f = flops_fwd(B, H, L, L, E, causal)
                    for m in methods:
                        row = dict(dtype=dname, E=E, H=H, B=B, L=L, causal=causal, method=m)
                        for mode, mult, bwd in (("fwd", 1.0, False), ("fwd_bwd", 3.5, True)):
                            try:
                                be = m.split(":")[1] if ":" in m else None
                                ms = bench(make_call(m.split(":")[0], q, k, v, causal, backend=be), bwd)
                                row[mode + "_ms"] = ms
                                row[mode + "_tflops"] = mult * f / ms / 1e9
                            except Exception as exc:  # unsupported / OOM: recorded, not fatal
                                row[mode + "_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                    del q, k, v
                    torch.cuda.empty_cache()
    # ---- key padding: half the batch at half length ----
    for dname in args.dtypes.split(",")[:1]:
        dtype = DTYPES[dname]
        for E in map(int, args.dims.split(",")):
            if time.time() - t0 > args.max_seconds:
                break
            H, L, B = 2048 // E, 4096, 4
            q, k, v = (torch.randn(B, H, L, E, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
            bench.inputs = (q, k, v)
            lengths = torch.tensor([L, L // 2] * (B // 2), device="cuda")
            # SDPA gets the equivalent dense key-padding mask (B, 1, 1, S)
            dense = (torch.arange(L, device="cuda").view(1, L) < lengths.view(B, 1)).view(B, 1, 1, L)
            useful = sum(flops_fwd(1, H, L, int(n), E, False) for n in lengths.tolist())
            for m in ["effattn", "effattn+qlen"] + [x for x in ("efficient", "cudnn", "flex") if x in methods]:
                row = dict(dtype=dname, E=E, H=H, B=B, L=L, causal=False, method=m, padded=True)
                for mode, mult, bwd in (("fwd", 1.0, False), ("fwd_bwd", 3.5, True)):
                    try:
                        ours = m.startswith("effattn") or m == "flex"
                        fn = make_call(m, q, k, v, False, lengths=lengths if ours else None,
                                       dense_mask=None if ours else dense)
                        ms = bench(fn, bwd)
                        row[mode + "_ms"] = ms
                        row[mode + "_useful_tflops"] = mult * useful / ms / 1e9
                    except Exception as exc:
                        row[mode + "_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
    # the configs the autotuner picked, per kernel and key: "chosen by measurement"
    from effattn.triton import configs as tcfg
    result["autotuned"] = {f"{kind}/d{d_pad}/{elem}B": {str(k): str(v) for k, v in tuner.cache.items()}
                           for (kind, _, d_pad, elem), tuner in tcfg._AUTOTUNED.items()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "triton-gpu.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    # ---- table (printed, and written as markdown next to the JSON) ----
    lines = [f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}, "
             f"commit {meta['commit']}", "", f"`{meta['command']}`", "",
             "| dtype | E | causal | L | B | method | fwd TFLOP/s | fwd+bwd TFLOP/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fw = r.get("fwd_tflops", r.get("fwd_useful_tflops"))
        fb = r.get("fwd_bwd_tflops", r.get("fwd_bwd_useful_tflops"))
        tag = "padded" if r.get("padded") else ("yes" if r["causal"] else "no")
        cell = lambda x, mode: f"{x:.1f}" if x is not None else r.get(mode + "_error", "-")[:40]  # noqa: E731
        lines.append(f"| {r['dtype']} | {r['E']} | {tag} | {r['L']} | {r['B']} | {r['method']} | "
                     f"{cell(fw, 'fwd')} | {cell(fb, 'fwd_bwd')} |")
    lines += ["", "Padded rows: TFLOP/s of useful work (queries x valid keys); SDPA gets the dense "
              "(B, 1, 1, S) mask, effattn key_lengths (+qlen: query_lengths too)."]
    for name, acc in result["accuracy"].items():
        lines.append(f"Accuracy {name} (B=2, H=8, L=4096, E=128, causal; relative L2 error vs float32 math): "
                     + "; ".join(f"{m}: " + ", ".join(f"{k} {v:.2e}" for k, v in d.items()) for m, d in acc.items()))
    with open(os.path.join(args.out, "triton-gpu.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))

if __name__ == "__main__":
    main()
