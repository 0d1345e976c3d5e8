"""Compiles the Triton kernels ahead of time for a GPU target, without a GPU
(Triton ships ptxas), and reports what ptxas gives each config: registers,
spill stack and shared memory. With --dump DIR it also writes the PTX, TTGIR
and SASS of the first one.

It answers, before any device time is spent: does a kernel change leave the
verified variant's code unchanged (compare the SASS), does a new variant
compile for sm_90, and which autotune candidates spill or would not fit a
smaller GPU's shared memory (sm_80: 163 KB, sm_86/89: 99 KB per block). It
says nothing about speed: the autotuner measures that on the GPU.

    python bench/dev/triton_aot.py [--kernels fwd,dkdv,dq] [--arch 90] [--head-dims 64,128,256]
        [--configs all|BM,BN,W,S;... | --fit BYTES] [--tma 0|1] [--dump DIR] [--md FILE]
    python bench/dev/triton_aot.py --variants [--kernels ...] [--arch 80] [--fit BYTES]
        [--only "NAME[@HEAD_DIM];..."] [--md FILE]
"""
import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from effattn.triton import configs as cfgs
from effattn.triton.backward import bwd_dkdv_kernel, bwd_dq_kernel
from effattn.triton.forward import attn_fwd_kernel
from effattn.triton.ops import _pad  # the ops' head-dim padding rule

KERNELS = {"fwd": attn_fwd_kernel, "dkdv": bwd_dkdv_kernel, "dq": bwd_dq_kernel}
FLOAT_POINTERS = {"LSE", "LSE2", "DELTA", "STATS_OUT"}  # float32 rows; other upper-case pointers are by name below
INT_POINTERS = {"KEY_LENGTHS", "QUERY_LENGTHS"}
FLOAT_SCALARS = {"qk_scale", "scale"}


def compile_kernel(kind, arch, head_dim, block, tma=False, dtype="bf16", **flags):
    """flags override the constexprs (MASK_KIND, HAS_KEY_LENGTHS, PRECISION, HEAD_DIM_PAD, ...)
    and mask_dtype the float mask's element type."""
    kernel = KERNELS[kind]
    bm, bn, warps, stages = block
    mask_dtype = flags.pop("mask_dtype", dtype)
    head_dim_v = flags.pop("HEAD_DIM_V", head_dim)
    constexprs = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=_pad(head_dim), HEAD_DIM_V=head_dim_v,
                      HEAD_DIM_V_PAD=_pad(head_dim_v),
                      BLOCK_M=bm, BLOCK_N=bn, HAS_KEY_LENGTHS=False, HAS_QUERY_LENGTHS=False,
                      MASK_KIND=0, UPCAST=False, PRECISION="tf32", USE_TMA=bool(tma), STATS=False)
    constexprs.update(flags)
    constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
    signature = {}
    for p in kernel.params:
        name = p.name
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in FLOAT_POINTERS:
            signature[name] = "*fp32"
        elif name in INT_POINTERS:
            signature[name] = "*i64"
        elif name == "MASK":
            signature[name] = "*" + mask_dtype if constexprs.get("MASK_KIND") == 2 else "*u8"
        elif name == "DQ" and kind == "dq":
            signature[name] = "*" + dtype
        elif name.isupper() and not name.endswith("BUCKET") and name not in (
                "H", "HKV", "GROUP", "L", "S", "KEYS_PER_SPLIT"):
            signature[name] = "*" + dtype
        elif name in FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    # What Triton's launcher would specialise for the usual call: 16-byte aligned pointers and
    # strides that are multiples of 16 elements (e.g. contiguous (B, H, L, E) with E = 64, 128, 256)
    # get tt.divisibility = 16, which vectorised loads, cp.async and TMA depend on.
    aligned = [["tt.divisibility", 16]]
    attrs = {(i,): aligned for i, p in enumerate(kernel.params)
             if signature[p.name].startswith("*") or p.name.startswith("stride")}
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 64),
                          options=dict(num_warps=warps, num_stages=stages))


def _cuobjdump(flag, cubin):
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def resources(compiled):
    """(registers, spill stack bytes, shared bytes) from the cubin and metadata."""
    m = re.search(r"REG:(\d+) STACK:(\d+)", _cuobjdump("-res-usage", compiled.asm["cubin"]))
    return int(m.group(1)), int(m.group(2)), int(compiled.metadata.shared)


# One feature at a time, against the plain bf16 call: (name, dtype, head dim, constexpr overrides).
# Every variant the ops can launch is one of these or a combination of them. The padded head dims
# (HEAD_DIM_PAD, HEAD_DIM_V_PAD) follow from HEAD_DIM and HEAD_DIM_V by the ops' rule.
VARIANTS = [
    ("plain bf16", "bf16", 128, {}),
    ("fp16", "fp16", 128, {}),
    ("fp32, tf32", "fp32", 128, {}),
    ("fp32, ieee", "fp32", 128, dict(PRECISION="ieee")),
    ("bool mask", "bf16", 128, dict(MASK_KIND=1)),
    ("float mask (bf16)", "bf16", 128, dict(MASK_KIND=2)),
    ("float mask (fp32)", "bf16", 128, dict(MASK_KIND=2, mask_dtype="fp32")),
    ("key and query lengths", "bf16", 128, dict(HAS_KEY_LENGTHS=True, HAS_QUERY_LENGTHS=True)),
    ("head dim 72, padded to 128", "bf16", 72, {}),
    ("value dim 64, head dim 128", "bf16", 128, dict(HEAD_DIM_V=64)),
    ("everything, fp16 at 40", "fp16", 40, dict(MASK_KIND=2, HAS_KEY_LENGTHS=True, HAS_QUERY_LENGTHS=True)),
    ("fp32 ieee, mask, lengths", "fp32", 128,
     dict(PRECISION="ieee", MASK_KIND=2, HAS_KEY_LENGTHS=True, HAS_QUERY_LENGTHS=True)),
    ("attention stats (forward only)", "bf16", 128, dict(STATS=True)),
    ("attention stats, fp32 ieee, mask, lengths", "fp32", 128,
     dict(STATS=True, PRECISION="ieee", MASK_KIND=2, HAS_KEY_LENGTHS=True, HAS_QUERY_LENGTHS=True)),
]


def variants(arch, kinds, fit, only=None):
    """Compiles each kernel's variants with the config configs.py picks first for the GPU
    (fit: its shared memory per block): what a GPU would build for those calls."""
    lines = [f"| kernel | variant | BLOCK_M, BLOCK_N, warps, stages | sm_{arch} registers | spill stack (B) | "
             "shared (KB) |", "|---|---|---|---|---|---|"]
    print(lines[0], flush=True)
    elem = {"bf16": 2, "fp16": 2, "fp32": 4}
    for kind in kinds:
        for name, dtype, e, flags in VARIANTS:
            if only and name not in only:
                continue
            if "STATS" in flags and kind != "fwd":  # a forward-only constexpr
                continue
            if only and only.get(name):  # a head dim given with the name, shown in the row
                e, name = only[name], f"{name}@{only[name]}"
            d_pad = max(_pad(e), _pad(flags.get("HEAD_DIM_V", e)))
            block = cfgs.configs(kind, d_pad, elem[dtype], fit, masked=flags.get("MASK_KIND", 0) != 0)[0]
            try:
                regs, stack, shared = resources(compile_kernel(kind, arch, e, block, dtype=dtype, **flags))
                row = f"{regs} | {stack} | {shared / 1024:.0f}" + ("" if shared <= fit else " (DOES NOT FIT)")
            except Exception as exc:
                row = f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]} | - | -"
            lines.append(f"| {kind} | {name} | {', '.join(map(str, block))} | {row} |")
            print(lines[-1], flush=True)
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", default="fwd")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--head-dims", default="128")
    ap.add_argument("--configs", default="all", help='"all" (the autotune lists) or "BM,BN,W,S;..."')
    ap.add_argument("--fit", type=int, help="shared-memory limit in bytes (e.g. 101376 for sm_86): compile "
                    "what configs.py picks for it, the short-query config too, and check each fits")
    ap.add_argument("--tma", type=int, default=0, choices=[0, 1])
    ap.add_argument("--dump")
    ap.add_argument("--md", help="append the table to this markdown file")
    ap.add_argument("--variants", action="store_true", help="each feature flag once (masks, lengths, "
                    "dtypes, padded head dims) with the first config for the --fit shared memory (Hopper's "
                    "by default)")
    ap.add_argument("--only", help='with --variants: "NAME[@HEAD_DIM];..." (e.g. "float mask (fp32)@256")')
    a = ap.parse_args()
    if a.variants:
        only = None
        if a.only:
            only = {}
            for item in a.only.split(";"):
                name, _, dim = item.partition("@")
                only[name] = int(dim) if dim else None
        lines = variants(a.arch, a.kernels.split(","), a.fit or cfgs.HOPPER_SMEM, only)
        if a.md:
            with open(a.md, "a") as f:
                f.write(f"\nTriton {triton.__version__}, target sm_{a.arch}, feature variants\n\n"
                        + "\n".join(lines) + "\n")
        return
    lines = [f"| kernel | E | BLOCK_M, BLOCK_N, warps, stages | sm_{a.arch} registers | spill stack (B) | "
             "shared (KB) | in the autotune list for E |",
             "|---|---|---|---|---|---|---|"]
    print(lines[0])
    for kind in a.kernels.split(","):
        table = {"fwd": cfgs.FWD, "dkdv": cfgs.DKDV, "dq": cfgs.DQ}[kind]
        for e in (int(x) for x in a.head_dims.split(",")):
            listed = cfgs.configs(kind, e, 2, a.fit or cfgs.HOPPER_SMEM)
            if a.fit:
                blocks = listed + ([cfgs.short(e, 2, False, a.fit)] if kind != "dkdv" else [])
            elif a.configs == "all":
                blocks = table
            else:
                blocks = [tuple(int(x) for x in c.split(",")) for c in a.configs.split(";")]
            for block in blocks:
                try:
                    k = compile_kernel(kind, a.arch, e, block, a.tma)
                    regs, stack, shared = resources(k)
                    row = f"{regs} | {stack} | {shared / 1024:.0f}"
                    if a.fit:
                        row += " (fits)" if shared <= a.fit else " (DOES NOT FIT)"
                except Exception as exc:  # e.g. out of shared memory for this target
                    row = f"compile failed: {type(exc).__name__} | - | -"
                    k = None
                line = f"| {kind} | {e} | {', '.join(map(str, block))} | {row} | {'yes' if block in listed else 'no'} |"
                lines.append(line)
                print(line, flush=True)
                if a.dump and k is not None:
                    os.makedirs(a.dump, exist_ok=True)
                    for ext in ("ptx", "ttgir"):
                        with open(os.path.join(a.dump, f"{kind}.{ext}"), "w") as f:
                            f.write(k.asm[ext])
                    with open(os.path.join(a.dump, f"{kind}.sass"), "w") as f:
                        f.write(_cuobjdump("-sass", k.asm["cubin"]))
                    a.dump = None
    if a.md:
        with open(a.md, "a") as f:
            f.write(f"\nTriton {triton.__version__}, target sm_{a.arch}, bf16, tma={a.tma}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
