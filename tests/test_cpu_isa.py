"""The CPU kernel's per-ISA variants (csrc/cpu/kernels.h): which one runs, how
to ask for another, and that they agree. The option matrix against the oracle
(test_attention.py) runs once per variant through the backend fixture (conftest.backend_cases)."""
import pytest
import torch

import effattn
from conftest import CPU_ISAS, check_against_oracle, cpu_isa_runs_here, make_qkv


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_widest_variant_is_the_default(monkeypatch):
    monkeypatch.delenv("EFFATTN_CPU_ISA", raising=False)
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo to compare with")
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "fma", "f16c"} <= flags:
        want = 2
    elif {"avx2", "fma", "f16c"} <= flags:
        want = 1
    else:
        want = 0
    assert torch.ops.effattn.cpu_isa() == want


def test_requested_variant_is_used(monkeypatch):
    for value, name in enumerate(CPU_ISAS):
        if cpu_isa_runs_here(name)[0]:
            monkeypatch.setenv("EFFATTN_CPU_ISA", name)
            assert torch.ops.effattn.cpu_isa() == {"baseline": 0, "avx2": 1, "avx512": 2,
                                                   "avx2_wide": 3}[name]


def test_unknown_variant_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("EFFATTN_CPU_ISA", "sse9")
    q, k, v = make_qkv(L=8, S=8)
    with pytest.raises(RuntimeError, match="EFFATTN_CPU_ISA=sse9 is not one of"):
        effattn.attention(q, k, v)


def test_unsupported_variant_is_a_clear_error(monkeypatch):
    missing = [n for n in CPU_ISAS if not cpu_isa_runs_here(n)[0]]
    if not missing:
        pytest.skip("this CPU runs every variant")
    monkeypatch.setenv("EFFATTN_CPU_ISA", missing[0])
    q, k, v = make_qkv(L=8, S=8)
    with pytest.raises(RuntimeError, match="this CPU supports at most"):
        effattn.attention(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_variants_agree(monkeypatch, dtype):
    """Every runnable variant gives the oracle's answer on one awkward case
    (odd sizes, head dim 40, window, GQA, lengths), so they agree with each
    other to rounding."""
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, L=131, S=77, E=40, dtype=dtype)
    lengths = torch.tensor([77, 30])
    outs = {}
    for name in CPU_ISAS:
        if not cpu_isa_runs_here(name)[0]:
            continue
        monkeypatch.setenv("EFFATTN_CPU_ISA", name)
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        outs[name] = check_against_oracle(qq, kk, vv, "cpu", enable_gqa=True, window=(20, 5),
                                          key_lengths=lengths).detach()
    assert len(outs) >= 2, f"only {list(outs)} run here"
    first = next(iter(outs.values()))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, out in outs.items():
        torch.testing.assert_close(out, first, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("mask", [None, "float"])
def test_float32_gradients_at_large_logits(monkeypatch, isa, mask):
    # Peaked softmax (scale 2 at E = 72: logits of std ~17, |lse| ~ 100). The
    # backward must recompute the forward's scores bit for bit (Q pre-scaled the
    # same way, the same GEMM order): scores scaled after the GEMM rounded
    # differently and put dq at 3-6x PyTorch math's error (7.7e-4 against 1.3e-4).
    runs, reason = cpu_isa_runs_here(isa)
    if not runs:
        pytest.skip(f"{isa}: {reason}")
    monkeypatch.setenv("EFFATTN_CPU_ISA", isa)
    q, k, v = make_qkv(B=2, Hq=2, L=130, S=97, E=72, dtype=torch.float32, seed=5)
    kw = dict(scale=2.0)
    if mask == "float":
        kw["attn_mask"] = torch.randn(2, 1, 130, 97, generator=torch.Generator().manual_seed(3))
    check_against_oracle(q, k, v, "cpu", **kw)
