"""Compiles the Triton forward kernel ahead of time for a GPU target, without a
GPU (Triton ships ptxas), and prints its resource use; with --dump DIR it also
writes the PTX and SASS. Used to check that a kernel change leaves the
verified variant's code unchanged, and that a new variant compiles, before
device time is spent on it.

    python bench/dev/triton_aot.py [--arch 90] [--head-dim 128] [--tma 0|1] [--dump DIR]
"""
import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from effattn.triton.forward import attn_fwd_kernel

POINTERS = ("Q", "K", "V", "O", "LSE", "MASK", "KEY_LENGTHS", "QUERY_LENGTHS")


def compile_fwd(arch, head_dim, tma=False, block_m=128, block_n=64, num_warps=4, num_stages=3, dtype="bf16"):
    constexprs = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim, HEAD_DIM_V=head_dim, HEAD_DIM_V_PAD=head_dim,
                      BLOCK_M=block_m, BLOCK_N=block_n, HAS_KEY_LENGTHS=False, HAS_QUERY_LENGTHS=False,
                      MASK_KIND=0, UPCAST=False, PRECISION="tf32", USE_TMA=bool(tma))
    constexprs = {k: v for k, v in constexprs.items() if k in attn_fwd_kernel.arg_names}  # older versions
    signature = {}
    for p in attn_fwd_kernel.params:
        if p.name in constexprs:
            signature[p.name] = "constexpr"
        elif p.name in POINTERS:
            signature[p.name] = {"LSE": "*fp32", "MASK": "*u8", "KEY_LENGTHS": "*i64",
                                 "QUERY_LENGTHS": "*i64"}.get(p.name, "*" + dtype)
        elif p.name == "qk_scale":
            signature[p.name] = "fp32"
        else:
            signature[p.name] = "i32"
    src = ASTSource(attn_fwd_kernel, signature, constexprs)
    target = GPUTarget("cuda", arch, 64)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    return triton.compile(src, target=target, options=options)


def _cuobjdump(flag, cubin):
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def resources(cubin):
    """Registers, stack (spills) and static shared memory from the cubin."""
    res = _cuobjdump("-res-usage", cubin)
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    return f"registers {m.group(1)}, stack {m.group(2)} B" if m else res.strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tma", type=int, default=0, choices=[0, 1])
    ap.add_argument("--block", default="128,64,4,3", help="BLOCK_M,BLOCK_N,num_warps,num_stages")
    ap.add_argument("--dump")
    a = ap.parse_args()
    bm, bn, w, s = (int(x) for x in a.block.split(","))
    k = compile_fwd(a.arch, a.head_dim, a.tma, bm, bn, w, s)
    print(f"sm_{a.arch} E={a.head_dim} tma={a.tma} block={a.block}: {resources(k.asm['cubin'])}, "
          f"shared {k.metadata.shared} B")
    if a.dump:
        os.makedirs(a.dump, exist_ok=True)
        for ext in ("ptx", "ttgir"):
            with open(os.path.join(a.dump, f"fwd.{ext}"), "w") as f:
                f.write(k.asm[ext])
        with open(os.path.join(a.dump, "fwd.sass"), "w") as f:
            f.write(_cuobjdump("-sass", k.asm["cubin"]))


if __name__ == "__main__":
    main()
