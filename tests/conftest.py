"""Shared test helpers: inputs, the float64 oracle comparison, and the list of
backends to test, generated from each backend's own declarations."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

# Without a GPU, the Triton kernels run on CPU tensors under Triton's
# interpreter. This must be decided before effattn (and Triton) are imported.
if not torch.cuda.is_available() and os.environ.get("EFFATTN_TEST_TRITON_INTERPRET", "1") == "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import effattn  # noqa: E402
from effattn import reference
from effattn.backends import PRIORITY

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def cpu_backends():
    """Backends that say they run on CPU tensors and are usable here (not the
    interpreted Triton kernels: too slow for the large CPU-only checks)."""
    return [b.name for b in PRIORITY if "cpu" in b.devices and not b.unavailable_reasons()
            and b.name != "triton"]


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


def _is_mask_object(m):
    """SDPA's causal mask objects (torch.nn.attention.bias): no data, no device."""
    from torch.nn.attention.bias import CausalBias
    return isinstance(m, CausalBias)


def _mask64(kw):
    kw = dict(kw)
    m = kw.get("attn_mask")
    if m is not None and m.dtype != torch.bool and not _is_mask_object(m):
        kw["attn_mask"] = m.double()
    return kw


def oracle_stats(q, k, v, **kw):
    """(entropy, max_weight) per query row, in the caller's shape, of the float64 materialised
    softmax of the same (rounded) inputs: the oracle of effattn.diagnostics.attention_stats."""
    spec = effattn.make_spec(*(t.detach().double() for t in (q, k, v)), return_stats=True, **_mask64(kw))
    stats = reference.reference_forward(spec, torch.float64)[2]
    return spec.to_caller_shape(stats[0]), spec.to_caller_shape(stats[1])


def on_device(device, *tensors):
    """Copies of CPU test tensors on the backend's device: leaves keep
    requires_grad, other tensors (masks, lengths) are moved as they are."""
    out = []
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != device and not _is_mask_object(t):
            leaf = t.is_leaf and t.requires_grad
            t = t.detach().to(device).requires_grad_(leaf) if leaf else t.to(device)
        out.append(t)
    return out if len(out) != 1 else out[0]


def check_against_oracle(q, k, v, backend, grads=True, floor=True, **kw):
    """effattn.attention(backend) vs the float64 oracle, forward and gradients.

    Inputs are made on the CPU; when ``backend`` (a BackendCase) runs on
    another device, the call runs there on copies and the oracle on the CPU.
    Bound: error <= 2 x (error of the same-precision reference math) + a
    rounding floor, as in the project's standards (floor=False: without it, where the
    math's own error is well above rounding). Returns the outputs (on the CPU).
    """
    dtype = q.dtype
    device = getattr(backend, "device", "cpu")
    skip_unless_served(backend, q, k, v, **kw)
    q64, k64, v64 = _leaf64(q), _leaf64(k), _leaf64(v)
    out_ref = reference.attention(q64, k64, v64, compute_dtype=torch.float64, **_mask64(kw))
    qp, kp, vp = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out_pt = reference.attention(qp, kp, vp, **kw)
    qd, kd, vd = on_device(device, q, k, v)
    kwd = {name: on_device(device, val) for name, val in kw.items()}
    out = effattn.attention(qd, kd, vd, backend=str(backend), **kwd).cpu()

    assert out.dtype == dtype and out.shape == out_ref.shape
    assert torch.isfinite(out).all(), "non-finite output"
    assert_bound("out", out, out_pt, out_ref, dtype, floor)
    if not grads:
        return out
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out_ref.backward(g.double())
    out_pt.backward(g)
    effattn.attention(qd, kd, vd, backend=str(backend), **kwd).backward(g.to(device))
    for name, t, tp, t64 in (("dq", qd, qp, q64), ("dk", kd, kp, k64), ("dv", vd, vp, v64)):
        assert t.grad is not None and torch.isfinite(t.grad).all(), f"{name}: missing or non-finite"
        assert_bound(name, t.grad.cpu(), tp.grad, t64.grad, dtype, floor)
    return out


def assert_padding_never_read(attention, device, dtype, E, B=3, H=2, L=70, S=150,
                              key_lengths=(150, 37, 90), query_lengths=(70, 5, 33)):
    """Keys past key_lengths and queries past query_lengths are padding: whatever
    memory holds there (NaN here, in q, k, v and the output's gradient) changes
    nothing: out, lse and every gradient equal those of a run with finite
    padding. attention(q, k, v, key_lengths=, query_lengths=) -> (out, lse),
    called with tensors on ``device``."""
    runs = []
    for poison in (False, True):
        q, k, v = make_qkv(B=B, Hq=H, L=L, S=S, E=E, dtype=dtype, requires_grad=False)
        grad_out = torch.randn(B, H, L, E, generator=torch.Generator().manual_seed(4)).to(dtype)
        if poison:
            for b, (kl, ql) in enumerate(zip(key_lengths, query_lengths)):
                k[b, :, kl:] = v[b, :, kl:] = float("nan")
                q[b, :, ql:] = grad_out[b, :, ql:] = float("nan")
        q, k, v, grad_out, kl_t, ql_t = on_device(device, q, k, v, grad_out, torch.tensor(key_lengths),
                                                  torch.tensor(query_lengths))
        for t in (q, k, v):
            t.requires_grad_(True)
        out, lse = attention(q, k, v, key_lengths=kl_t, query_lengths=ql_t)
        out.backward(grad_out)
        runs.append([t.detach().cpu() for t in (out, lse, q.grad, k.grad, v.grad)])
    for name, clean, poisoned in zip(("out", "lse", "dq", "dk", "dv"), *runs):
        assert not poisoned.isnan().any(), f"{name}: the padding's NaN leaked in"
        # the same up to the order of float atomic additions (the CUDA backward's dQ)
        torch.testing.assert_close(poisoned, clean, msg=lambda m: f"{name}: {m}")


def run_checked(cmd, **kwargs):
    """subprocess.run that fails the test with the command's output."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                    f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def run_script(path, *args, timeout=900):
    """stdout of a Python script (a path relative to tests/) run in a child process
    without TRITON_INTERPRET: the scripts set up the Triton they need themselves."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), path)
    return run_checked([sys.executable, script, *args], env=env, timeout=timeout).stdout


def assert_bound(name, got, same_precision, oracle, dtype, floor=True):
    err = (got.double() - oracle).abs().max().item() if got.numel() else 0.0
    err_pt = (same_precision.double() - oracle).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, oracle.abs().max().item()) if got.numel() else 1.0
    floor = _floor(dtype) if floor else 0.0
    if name != "out" and dtype == torch.float32:
        # A float32 gradient sums O(L) terms, each carrying dP - delta, a difference
        # whose rounding depends on the summation order (a tensor-core MMA's for dP,
        # a row sum's for delta). Where the math is exactly 0 (S = 1: P = 1, dS = 0)
        # PyTorch's math can match its own orders and get 0; a kernel cannot.
        floor *= 4
    bound = 2 * err_pt + floor * scale
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (same-precision math: {err_pt:.3g})"


# The CPU kernel is compiled once per instruction set and picks the widest at
# run time (csrc/cpu/kernels.h); effattn.config.cpu_isa selects a narrower one.
# avx2_wide is the AVX-512 variant's 16-lane source compiled for AVX2 (a build
# with EFFATTN_UNVERIFIED=1, as CI's), so its code paths are tested on
# machines without AVX-512.
CPU_ISAS = ["baseline", "avx2", "avx2_wide", "avx512"]


def cpu_isa_runs_here(name):
    """(runs, reason) for a CPU kernel variant on this machine."""
    if effattn.ops.LOAD_ERROR:
        return False, effattn.ops.LOAD_ERROR
    from effattn.backends import cpu
    if name in cpu.runnable_isas():
        return True, ""
    if name == "avx2_wide" and "avx2" in cpu.runnable_isas():
        return False, "a test-only variant, not in this build (EFFATTN_UNVERIFIED=1 builds it)"
    return False, f"this CPU runs {', '.join(cpu.runnable_isas())}"


def cpu_variant():
    """The CPU ops' `variant` argument (an Isa value) for the configured ISA, for raw op calls."""
    return effattn.backends.BY_NAME["cpu"].isa()[1]


class BackendCase(str):
    """A backend name (pass it as ``backend=``) with the device its test
    tensors go to and, for the CPU kernel, the instruction-set variant."""

    def __new__(cls, name, device, isa=None):
        self = super().__new__(cls, name)
        self.device, self.isa = device, isa
        return self

    @property
    def id(self):
        return f"{self}-{self.isa}" if self.isa else f"{self}-{self.device}"


def _gpu_reason():
    return "no CUDA GPU here" if not torch.cuda.is_available() else ""


def backend_cases():
    """Every fused (non-reference) backend, on the device it is tested on
    here, as pytest params: the CPU kernel once per instruction-set variant,
    Triton on the GPU (or on the CPU under the interpreter), CUDA on the GPU.
    Each one that cannot run here is a skip that says why, never a pass."""
    params = []
    for b in PRIORITY:
        if b.materializes_scores:
            continue
        if b.name == "cpu":
            for isa in CPU_ISAS:
                runs, reason = cpu_isa_runs_here(isa)
                params.append(pytest.param(BackendCase("cpu", "cpu", isa), id=f"cpu-{isa}",
                                           marks=() if runs else pytest.mark.skip(reason=f"{isa}: {reason}")))
            continue
        device = "cuda" if torch.cuda.is_available() and "cuda" in b.devices else (
            "cpu" if "cpu" in b.devices else "cuda")
        reasons = b.unavailable_reasons() or ([_gpu_reason()] if device == "cuda" and _gpu_reason() else [])
        params.append(pytest.param(BackendCase(b.name, device), id=f"{b.name}-{device}",
                                   marks=pytest.mark.skip(reason=f"{b.name}: {'; '.join(reasons)}")
                                   if reasons else ()))
    return params


@pytest.fixture(params=backend_cases())
def backend(request, monkeypatch):
    """The backend under test (a BackendCase); float32 runs exact (not TF32)."""
    case = request.param
    if case.isa:
        monkeypatch.setattr(effattn.config, "cpu_isa", case.isa)
    if case == "triton":
        from effattn.backends import triton as triton_backend
        saved = triton_backend.get_float32_precision()
        triton_backend.set_float32_precision("ieee")
        request.addfinalizer(lambda: triton_backend.set_float32_precision(saved))
    return case


def skip_unless_served(backend, q, k, v, **kw):
    """Skips, in the backend's own words, a call it declares it cannot serve
    (the test matrix is generated from these declarations)."""
    device = getattr(backend, "device", "cpu")
    reasons = effattn.backends(*on_device(device, q, k, v),
                               **{n: on_device(device, x) for n, x in kw.items()})[str(backend)]
    if reasons:
        pytest.skip(f"{backend} declares: {'; '.join(reasons)}")


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
