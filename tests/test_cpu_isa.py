"""The CPU kernel's per-ISA variants (csrc/cpu/kernels.h): which one runs, how
to ask for another, and that they agree. The option matrix against the oracle
(test_attention.py) runs once per variant through the backend fixture (conftest.backend_cases)."""
import os
import subprocess
import sys

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
    monkeypatch.setattr(effattn.config, "cpu_isa", "auto")
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo to compare with")
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "fma", "f16c"} <= flags:
        want = "avx512"
    elif {"avx2", "fma", "f16c"} <= flags:
        want = "avx2"
    else:
        want = "baseline"
    q, k, v = make_qkv(L=8, S=8)
    assert effattn.backends(q, k, v).variants["cpu"] == want
    assert "cpu: ok (" + want + ")" in str(effattn.backends(q, k, v))


def test_requested_variant_is_used(monkeypatch):
    """The variant the config names is the one the op runs: a variant the build lacks
    or the CPU cannot run, passed to the op directly, is refused by the op itself."""
    from effattn.backends.cpu import ISAS
    q, k, v = make_qkv(L=8, S=8, requires_grad=False)
    for name in CPU_ISAS:
        monkeypatch.setattr(effattn.config, "cpu_isa", name)
        if cpu_isa_runs_here(name)[0]:
            assert effattn.backends(q, k, v).variants["cpu"] == name
            assert effattn.backends.BY_NAME["cpu"].isa() == (name, ISAS.index(name))
            effattn.attention(q, k, v)
        else:
            with pytest.raises(RuntimeError, match="does not run on this CPU"):
                torch.ops.effattn.fwd(q, k, v, None, None, None, 0.25, None, None, ISAS.index(name))


def test_unknown_variant_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(effattn.config, "cpu_isa", "sse9")
    q, k, v = make_qkv(L=8, S=8)
    with pytest.raises(ValueError, match=r"effattn.config.cpu_isa \(environment EFFATTN_CPU_ISA\) = 'sse9' is not one of"):
        effattn.attention(q, k, v)


def test_unsupported_variant_is_a_clear_error(monkeypatch):
    missing = [n for n in CPU_ISAS if not cpu_isa_runs_here(n)[0]]
    if not missing:
        pytest.skip("this CPU runs every variant")
    monkeypatch.setattr(effattn.config, "cpu_isa", missing[0])
    q, k, v = make_qkv(L=8, S=8)
    with pytest.raises(ValueError, match="that variant does not run here"):
        effattn.attention(q, k, v)
    # and effattn.backends says so rather than failing
    assert "does not run here" in effattn.backends(q, k, v).variants["cpu"]


def test_environment_variable_is_the_default():
    """EFFATTN_CPU_ISA, read once at import, is the config's default (a fresh process)."""
    code = "import effattn; print(effattn.config.cpu_isa)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "EFFATTN_CPU_ISA": "baseline"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "baseline"


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
        monkeypatch.setattr(effattn.config, "cpu_isa", name)
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
    monkeypatch.setattr(effattn.config, "cpu_isa", isa)
    q, k, v = make_qkv(B=2, Hq=2, L=130, S=97, E=72, dtype=torch.float32, seed=5)
    kw = dict(scale=2.0)
    if mask == "float":
        kw["attn_mask"] = torch.randn(2, 1, 130, 97, generator=torch.Generator().manual_seed(3))
    check_against_oracle(q, k, v, "cpu", **kw)
