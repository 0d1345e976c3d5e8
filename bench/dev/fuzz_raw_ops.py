"""Bad-input sweep of the raw ops: takes valid effattn::fwd / effattn::bwd calls
(and, with --triton, effattn::triton_fwd / triton_bwd) and changes one argument
at a time (each dim -1 / +1 / 0, rank, dtype, a strided or transposed or
expanded view, the meta device, out-of-range lengths, windows and scales).

Every call must either return or raise RuntimeError/ValueError. Calls run in
chunks in child processes, so a crash (a segfault from an out-of-bounds read)
names its chunk instead of ending the sweep. Prints each case and what it
raised; a case that returns is listed with RETURNED (many are valid: q's length
and v's head dim are free, a batch of stride 0 is a legal view).

    python3 bench/dev/fuzz_raw_ops.py [--triton]      (about a minute; Triton: TRITON_INTERPRET=1)

Found (fixed in csrc/host_params.h): a wrongly sized lse or grad_lse was read
out of bounds (a segfault at size 0, silently wrong otherwise), and tensors on
another device than query were not rejected (a host pointer in a CUDA kernel).
"""
import subprocess
import sys

import torch

CHUNK = 50


def base_call(dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 16, generator=g).to(dtype)
    k = torch.randn(2, 2, 11, 16, generator=g).to(dtype)
    v = torch.randn(2, 2, 11, 16, generator=g).to(dtype)
    return dict(q=q, k=k, v=v, mask=None, key_lengths=None, query_lengths=None, scale=0.25,
                window_left=None, window_right=None, variant=0)  # variant 0: the CPU's baseline ISA


def mutations(name, t):
    """(description, tensor) for every one-argument change of ``t``."""
    out = []
    for d in range(t.dim()):
        for size in (t.shape[d] - 1, t.shape[d] + 1, 0):
            if size >= 0:
                shape = list(t.shape)
                shape[d] = size
                out.append((f"{name} dim{d}={size}", torch.zeros(shape, dtype=t.dtype)))
    out.append((f"{name} rank+1", t.unsqueeze(0)))
    if t.dim() > 1:
        out.append((f"{name} rank-1", t.flatten(0, 1)))
    for dt in (torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.bool):
        if dt != t.dtype:
            out.append((f"{name} {dt}", t.to(dt)))
    if t.dim() >= 2:
        out.append((f"{name} last-dim stride 2", torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)[..., ::2]))
        out.append((f"{name} transposed", t.transpose(-1, -2)))
        out.append((f"{name} batch stride 0", t[:1].expand(t.shape)))
    out.append((f"{name} meta", torch.empty(t.shape, dtype=t.dtype, device="meta")))
    return out


def cases():
    """(op, description, args) in a fixed order."""
    for dtype in (torch.float32, torch.bfloat16):
        fwd = base_call(dtype)
        B, H, L, S = 2, 4, 9, 11
        optional = dict(mask=torch.zeros(B, H, L, S, dtype=torch.bool), key_lengths=torch.tensor([11, 3]),
                        query_lengths=torch.tensor([9, 2]))
        for name in ("q", "k", "v"):
            for desc, t in mutations(name, fwd[name]):
                yield "fwd", f"{dtype} {desc}", dict(fwd, **{name: t})
        for name, good in optional.items():
            for desc, t in mutations(name, good):
                yield "fwd", f"{dtype} {desc}", dict(fwd, **{name: t})
        for name, values in (("key_lengths", ([12, 3], [-1, 3], [2**40, 1])), ("query_lengths", ([10, 0], [-5, 1]))):
            for val in values:
                yield "fwd", f"{dtype} {name}={val}", dict(fwd, **{name: torch.tensor(val)})
        for left, right in ((-2, 0), (0, -7), (2**40, 0), (0, 2**62), (-2**62, None), (None, -2**40)):
            yield "fwd", f"{dtype} window ({left}, {right})", dict(fwd, window_left=left, window_right=right)
        for scale in (float("nan"), float("inf"), 0.0, -1.0, 1e30):
            yield "fwd", f"{dtype} scale {scale}", dict(fwd, scale=scale)

        out, lse = torch.ops.effattn.fwd(*fwd.values())
        bwd = dict(grad_out=torch.randn(out.shape).to(dtype), grad_lse=None, q=fwd["q"], k=fwd["k"], v=fwd["v"],
                   out=out, lse=lse, mask=None, key_lengths=None, query_lengths=None, scale=0.25,
                   window_left=None, window_right=None, variant=0)
        for name in ("grad_out", "q", "k", "v", "out", "lse"):
            for desc, t in mutations(name, bwd[name]):
                yield "bwd", f"{dtype} {desc}", dict(bwd, **{name: t})
        for desc, t in mutations("grad_lse", lse):
            yield "bwd", f"{dtype} {desc}", dict(bwd, grad_lse=t)
        for name, good in optional.items():
            for desc, t in mutations(name, good):
                yield "bwd", f"{dtype} {desc}", dict(bwd, **{name: t})


def call(op, args, triton):
    # both op families take the same arguments (effattn/ops.py)
    return getattr(torch.ops.effattn, ("triton_" if triton else "") + op)(*args.values())


def run_chunk(lo, hi, triton):
    returned = raised = 0
    for i, (op, desc, args) in enumerate(cases()):
        if not lo <= i < hi:
            continue
        print(i, op, desc, flush=True)
        try:
            call(op, args, triton)
            returned += 1
            print("   RETURNED", flush=True)
        except (RuntimeError, ValueError) as e:
            raised += 1
            print("   raised:", str(e).split("\n")[0][-160:], flush=True)
        except Exception as e:  # noqa: BLE001 (anything else is a finding)
            print("   OTHER EXCEPTION:", type(e).__name__, str(e)[:200], flush=True)
    print(f"chunk {lo}-{hi}: {returned} returned, {raised} raised", flush=True)


def main():
    triton = "--triton" in sys.argv
    import effattn  # noqa: F401 (registers the ops)
    if triton:
        import effattn.triton.ops  # noqa: F401
    if "--chunk" in sys.argv:
        i = sys.argv.index("--chunk")
        run_chunk(int(sys.argv[i + 1]), int(sys.argv[i + 2]), triton)
        return
    n = sum(1 for _ in cases())
    print(f"{n} cases", flush=True)
    crashed = []
    for lo in range(0, n, CHUNK):
        cmd = [sys.executable, __file__, "--chunk", str(lo), str(lo + CHUNK)] + (["--triton"] if triton else [])
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        sys.stdout.write(r.stdout)
        if r.returncode != 0:
            crashed.append(lo)
            print(f"CRASH: the child for cases {lo}.. exited with {r.returncode}; stderr: {r.stderr[-400:]}")
    print("crashed chunks:", crashed or "none")
    sys.exit(1 if crashed else 0)


if __name__ == "__main__":
    main()
