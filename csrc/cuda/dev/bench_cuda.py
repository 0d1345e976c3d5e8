"""effattn's CUDA kernels next to PyTorch SDPA (flash, cuDNN) on one GPU.

bf16, H = 16, B * L = 16k tokens, head dims 64 and 128, L in {4096, 8192},
causal and not. FLOPs: 4 * B * H * L * S * E for the forward, halved for
causal; the backward counts 2.5x the forward (fwd+bwd = 3.5x). Times are
triton.testing.do_bench medians (ms). Outputs are validated against SDPA
before timing.

    python3 csrc/cuda/dev/bench_cuda.py --json out.json --md out.md
"""
import argparse
import datetime
import json
import os
import platform
import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

import effattn  # noqa: F401


def effattn_fwd(q, k, v, causal):
    return torch.ops.effattn.fwd(q, k, v, None, None, None, q.shape[-1] ** -0.5, causal, -1, -1)[0]


def sdpa_with(backend):
    def f(q, k, v, causal):
        with sdpa_kernel(backend):
            return sdpa(q, k, v, is_causal=causal)
    return f


IMPLS = {"effattn-cuda": effattn_fwd,
         # the Hopper kernels (wgmma + TMA), required: an error rather than the sm_80 ones
         "effattn-cuda-sm90": effattn_fwd,
         "sdpa-flash": sdpa_with(SDPBackend.FLASH_ATTENTION),
         "sdpa-cudnn": sdpa_with(SDPBackend.CUDNN_ATTENTION)}
# effattn.config options set while an impl runs, forward and backward (the variant the ops get).
ENVS = {"effattn-cuda-sm90": {"cuda_sm90": "require", "cuda_sm90_bwd": "require"}}


def environment(values):
    return effattn.config.override(**values)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--md")
    ap.add_argument("--head-dims", default="128,64")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--label", default="", help="a name for this build, prefixed to impl")
    args = ap.parse_args()
    impls = {n: IMPLS[n] for n in args.impls.split(",")}
    rows = []
    for E in (int(e) for e in args.head_dims.split(",")):
        for L in (4096, 8192):
            for causal in (False, True):
                B, H = 16384 // L, 16
                q, k, v = (torch.randn(B, H, L, E, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                dout = torch.randn(B, H, L, E, device="cuda", dtype=torch.bfloat16)
                flops = 4 * B * H * L * L * E / (2 if causal else 1)
                ref = sdpa_with(SDPBackend.FLASH_ATTENTION)(q, k, v, causal)
                for name, f in impls.items():
                    row = dict(impl=args.label + name, E=E, L=L, B=B, H=H, causal=causal)
                    with environment(ENVS.get(name, {})):
                        try:
                            out = f(q, k, v, causal)
                            row["max_abs_diff_vs_flash"] = (out.float() - ref.float()).abs().max().item()
                            with torch.no_grad():
                                ms = triton.testing.do_bench(lambda: f(q, k, v, causal), return_mode="median")
                            row["fwd_ms"], row["fwd_tflops"] = ms, flops / ms * 1e-9
                            if args.fwd_only:
                                rows.append(row)
                                print(row, flush=True)
                                continue

                            def fb():
                                f(q, k, v, causal).backward(dout)
                            ms = triton.testing.do_bench(fb, grad_to_none=[q, k, v], return_mode="median")
                            row["fwdbwd_ms"], row["fwdbwd_tflops"] = ms, 3.5 * flops / ms * 1e-9
                        except Exception as e:  # a peer that cannot run here is reported, not fatal
                            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    rows.append(row)
                    print(row, flush=True)
                del q, k, v, dout, ref
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), date=datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z",
                command=" ".join(["python3 csrc/cuda/dev/bench_cuda.py"] + sys.argv[1:]), dtype="bfloat16", tokens=16384, heads=16,
                commit=os.environ.get("EFFATTN_COMMIT", ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    lines = [f"device {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}, "
             f"commit {meta['commit'] or 'unknown'}",
             f"command: `{meta['command']}` (bf16, B*L = 16k tokens, H = 16; TFLOP/s, do_bench median)", "",
             "| E | L | causal | impl | fwd TFLOP/s | fwd+bwd TFLOP/s | max abs diff vs flash |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['E']} | {r['L']} | {r['causal']} | {r['impl']} | {r.get('fwd_tflops', float('nan')):.0f} | "
                     f"{r.get('fwdbwd_tflops', float('nan')):.0f} | {r.get('max_abs_diff_vs_flash', float('nan')):.3g} |"
                     + (f" {r['error']}" if "error" in r else ""))
    text = "\n".join(lines)
    print(text)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
