"""Shared test helpers: inputs, the float64 oracle comparison, and the list of
backends to test, generated from each backend's own declarations."""
from __future__ import annotations

import os

import pytest
import torch

import effattn
from effattn import reference
from effattn.backends import PRIORITY

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def cpu_backends():
    """Backends that say they run on CPU tensors and are usable here."""
    return [b.name for b in PRIORITY if "cpu" in b.devices and not b.unavailable_reasons()]


def kernel_backends(device="cpu"):
    """Fused (non-reference) backends for a device: the ones worth testing hard."""
    return [b.name for b in PRIORITY if device in b.devices and not b.materializes_scores
            and not b.unavailable_reasons()]


def make_qkv(B=2, Hq=3, Hkv=None, L=37, S=45, E=16, Ev=None, dtype=torch.float32, layout="bhle",
             device="cpu", requires_grad=True, seed=0):
    """Random q, k, v of shape (B, H, L, E) in the given memory layout.

    layout "bhle": contiguous; "blhe": (B, L, H, E) memory transposed to
    (B, H, L, E) (the usual projection output), "strided": a slice of a wider
    tensor with a padded row stride.
    """
    g = torch.Generator().manual_seed(seed)
    Hkv = Hkv or Hq
    Ev = Ev or E

    def one(H, N, D):
        if layout == "bhle":
            t = torch.randn(B, H, N, D, generator=g)
        elif layout == "blhe":
            t = torch.randn(B, N, H, D, generator=g).transpose(1, 2)
        elif layout == "strided":
            t = torch.randn(B, H, N, D + 5, generator=g)[..., 2:D + 2]
        else:
            raise ValueError(layout)
        return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    return one(Hq, L, E), one(Hkv, S, E), one(Hkv, S, Ev)


def _floor(dtype):
    # rounding of the output itself, plus a little for the accumulation
    return {torch.float64: 1e-10, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]


def _leaf64(t):
    return t.detach().double().requires_grad_(True)


def _mask64(kw):
    kw = dict(kw)
    m = kw.get("attn_mask")
    if m is not None and m.dtype != torch.bool:
        kw["attn_mask"] = m.double()
    return kw


def check_against_oracle(q, k, v, backend, grads=True, **kw):
    """effattn.attention(backend) vs the float64 oracle, forward and gradients.

    Bound: error <= 2 x (error of the same-precision reference math) + a
    rounding floor, as in the project's standards. Returns the outputs.
    """
    dtype = q.dtype
    q64, k64, v64 = _leaf64(q), _leaf64(k), _leaf64(v)
    out_ref = reference.attention(q64, k64, v64, compute_dtype=torch.float64, **_mask64(kw))
    qp, kp, vp = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out_pt = reference.attention(qp, kp, vp, **kw)
    out = effattn.attention(q, k, v, backend=backend, **kw)

    assert out.dtype == dtype and out.shape == out_ref.shape
    assert torch.isfinite(out).all(), "non-finite output"
    assert_bound("out", out, out_pt, out_ref, dtype)
    if not grads:
        return out
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out_ref.backward(g.double())
    out_pt.backward(g)
    out.backward(g)
    for name, t, tp, t64 in (("dq", q, qp, q64), ("dk", k, kp, k64), ("dv", v, vp, v64)):
        assert t.grad is not None and torch.isfinite(t.grad).all(), f"{name}: missing or non-finite"
        assert_bound(name, t.grad, tp.grad, t64.grad, dtype)
    return out


def assert_bound(name, got, same_precision, oracle, dtype):
    err = (got.double() - oracle).abs().max().item() if got.numel() else 0.0
    err_pt = (same_precision.double() - oracle).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, oracle.abs().max().item()) if got.numel() else 1.0
    bound = 2 * err_pt + _floor(dtype) * scale
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (same-precision math: {err_pt:.3g})"


# The CPU kernel is compiled once per instruction set and picks the widest at
# run time (csrc/cpu/kernels.h); EFFATTN_CPU_ISA selects a narrower one.
# avx2_wide is the AVX-512 variant's 16-lane source compiled for AVX2, so its
# code paths are tested on machines without AVX-512.
CPU_ISAS = ["baseline", "avx2", "avx2_wide", "avx512"]


def cpu_isa_runs_here(name):
    """(runs, reason) for a CPU kernel variant on this machine."""
    if effattn.ops.LOAD_ERROR:
        return False, effattn.ops.LOAD_ERROR
    saved = os.environ.get("EFFATTN_CPU_ISA")
    try:
        os.environ["EFFATTN_CPU_ISA"] = name
        torch.ops.effattn.cpu_isa()
        return True, ""
    except RuntimeError as exc:
        msg = str(exc).splitlines()[0]
        return False, msg[msg.find("effattn (cpu)"):]  # without the C++ source location
    finally:
        if saved is None:
            os.environ.pop("EFFATTN_CPU_ISA", None)
        else:
            os.environ["EFFATTN_CPU_ISA"] = saved


def _isa_params():
    params = []
    for name in CPU_ISAS:
        runs, reason = cpu_isa_runs_here(name)
        params.append(pytest.param(name, id=f"isa={name}",
                                   marks=() if runs else pytest.mark.skip(reason=f"{name}: {reason}")))
    return params


@pytest.fixture(params=_isa_params())
def cpu_isa(request, monkeypatch):
    """Runs a test once per CPU kernel variant this machine can execute."""
    monkeypatch.setenv("EFFATTN_CPU_ISA", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def largest_allocation(fn):
    """Largest single CPU allocation (bytes) made while fn runs, per the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # every tensor allocation ends in one of these leaf ops; others aggregate their children
    leaves = ("aten::empty", "aten::empty_strided")
    sizes = [e.cpu_memory_usage for e in prof.events() if e.name in leaves and e.cpu_memory_usage > 0]
    assert sizes, "the profiler saw no allocation at all"
    return max(sizes, default=0)
