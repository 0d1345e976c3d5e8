"""Quick diagnostic of the CUDA kernels on a GPU: max errors of out, lse and the
gradients against the float64 reference math (on the GPU), per config; with
--small, a few tiny calls only (for compute-sanitizer). EFFATTN_CUDA_BWD_TILES=small
runs the backward's 99 KB tiles on a GPU that would pick the large ones; --sm90
requires the Hopper kernels (effattn.config.cuda_sm90{,_bwd} = "require"; a build with EFFATTN_UNVERIFIED=1) and drops the
configs they can't serve."""
import sys

import torch

import effattn  # noqa: F401  (loads the ops)
from effattn import reference

torch.manual_seed(0)


def run(B, H, L, S, E, dtype=torch.bfloat16, causal=False, Hkv=None, grads=True, kl=None, ql=None, window=(-1, -1),
        layout="bhle", mask=None):
    Hkv = Hkv or H

    def mk(h, n, d):
        if layout == "strided":
            t = torch.randn(B, h, n, d + 5, device="cuda", dtype=dtype)[..., 2:d + 2]
        else:
            t = torch.randn(B, h, n, d, device="cuda", dtype=dtype)
        return t.requires_grad_(grads)

    q, k, v = mk(H, L, E), mk(Hkv, S, E), mk(Hkv, S, E)
    scale = E ** -0.5
    m4 = mask.expand(B, H, L, S) if mask is not None else None  # the op takes the broadcast view
    out, lse = torch.ops.effattn.fwd(q, k, v, m4, kl, ql, scale, causal, window[0], window[1])
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    kw = dict(is_causal=causal, enable_gqa=Hkv != H, key_lengths=kl, query_lengths=ql,
              window=tuple(None if w < 0 else w for w in window), return_lse=True, attn_mask=mask)
    ro, rl = reference.attention(q64, k64, v64, compute_dtype=torch.float64, **kw)
    fin = torch.isfinite(rl)
    res = dict(out=(out.double() - ro).abs().max().item(),
               lse=(lse.double() - rl)[fin].abs().max().item() if fin.any() else 0.0,
               lse_inf_ok=bool(torch.equal(torch.isfinite(lse), fin)))
    if grads:
        g = torch.randn_like(out)
        out.backward(g)
        ro.backward(g.double())
        for n, a, r in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
            res[n] = (a.grad.double() - r.grad).abs().max().item() / max(1.0, r.grad.abs().max().item())
    torch.cuda.synchronize()
    return res


CONFIGS = [
    dict(B=1, H=1, L=128, S=128, E=64),
    dict(B=1, H=1, L=128, S=128, E=128),
    dict(B=2, H=2, L=97, S=201, E=64),
    dict(B=2, H=2, L=300, S=300, E=128, causal=True),
    dict(B=2, H=4, Hkv=2, L=150, S=170, E=64, causal=True),
    dict(B=2, H=2, L=200, S=180, E=40, layout="strided"),
    dict(B=2, H=2, L=130, S=140, E=256),
    dict(B=2, H=2, L=130, S=140, E=192),
    dict(B=2, H=4, Hkv=2, L=211, S=300, E=160, causal=True),
    dict(B=1, H=2, L=300, S=260, E=64, window=(16, 0)),
    dict(B=1, H=2, L=100, S=150, E=32, dtype=torch.float16),
]

if __name__ == "__main__":
    small = "--small" in sys.argv
    cfgs = CONFIGS[2:6] if small else CONFIGS
    if small:
        cfgs = [dict(c, L=min(c["L"], 70), S=min(c["S"], 90)) for c in cfgs]
        kl = torch.tensor([50, 3], device="cuda")
        cfgs.append(dict(B=2, H=2, L=70, S=90, E=64, kl=kl, ql=torch.tensor([70, 0], device="cuda")))
        cfgs.append(dict(B=2, H=2, L=70, S=90, E=64, mask=torch.rand(2, 1, 70, 90, device="cuda") > 0.5))
        cfgs.append(dict(B=1, H=1, L=40, S=50, E=256))  # column-split backward
        cfgs.append(dict(B=1, H=2, L=40, S=70, E=192, causal=True))
    if "--sm90" in sys.argv:  # the Hopper kernels, required (an error where they can't run)
        effattn.config.cuda_sm90 = effattn.config.cuda_sm90_bwd = "require"
        cfgs = [c for c in cfgs if c.get("layout") != "strided"]  # TMA can't describe those rows
        cfgs.append(dict(B=1, H=2, L=130, S=400, E=128))  # forward: 4 key blocks (the ring wraps); backward: 3 query steps
    for c in cfgs:
        try:
            r = run(**c)
            print({k: v for k, v in c.items() if k not in ("kl", "ql", "mask")}, {k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        except Exception as e:  # keep going: the log is the point
            print(c.get("E"), "FAILED", type(e).__name__, str(e)[:300], flush=True)
