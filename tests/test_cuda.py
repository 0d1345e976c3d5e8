"""The CUDA C++ backend (csrc/cuda) against the float64 oracle, forward and
gradients. Needs a CUDA GPU of compute capability 8.0+ (7.5 with the Turing
tiles) and an effattn built with its CUDA kernels; every test skips, saying
why, otherwise. Where the Turing tiles serve the calls (a Turing GPU, or
EFFATTN_CUDA_SM75=force), the calls they declare they cannot serve (bfloat16,
head dims past 128) skip with that reason.

Inputs are drawn on the CPU (same generator as conftest.make_qkv), moved to
the GPU in the test dtype and laid out there (a CPU -> GPU copy would make a
strided tensor contiguous). The oracle is reference.attention in float64 on
the CPU; the bound is conftest's: 2 x the error of the same-precision
reference math (run on the GPU) + a rounding floor.
"""
from __future__ import annotations

import pytest
import torch

from conftest import assert_bound, assert_padding_never_read
import effattn
from effattn import reference
from effattn.backends.cuda import SM90_HEAD_DIMS, CudaBackend, sm90_kernels_compiled
from effattn.spec import make_spec

BACKEND = CudaBackend()
_UNAVAILABLE = BACKEND.unavailable_reasons()
pytestmark = pytest.mark.skipif(bool(_UNAVAILABLE), reason="cuda backend: " + "; ".join(_UNAVAILABLE))

DTYPES = [torch.float16, torch.bfloat16]
DT_IDS = ["fp16", "bf16"]


def cuda_attention(q, k, v, return_lse=False, **kw):
    """effattn's attention through the cuda backend (declared able to serve it)."""
    spec = make_spec(q, k, v, kw.pop("attn_mask", None), 0.0, kw.pop("is_causal", False), kw.pop("scale", None),
                     kw.pop("enable_gqa", False), **kw)
    reasons = BACKEND.reasons(spec)
    if reasons and BACKEND._turing(spec) and all("on the Turing tiles" in r for r in reasons):
        pytest.skip("; ".join(reasons))  # what the Turing tiles declare they cannot serve (tests/test_cuda_sm75.py)
    assert not reasons, reasons
    out, lse = BACKEND.forward(spec)
    out = spec.to_caller_shape(out)
    return (out, spec.to_caller_shape(lse)) if return_lse else out


def make_inputs(B=2, Hq=4, Hkv=None, L=97, S=97, E=64, Ev=None, dtype=torch.bfloat16, layout="bhle", seed=0):
    """q, k, v as leaf tensors on the GPU in the given layout.

    "bhle" contiguous; "blhe" (B, L, H, E) memory seen as (B, H, L, E);
    "padded": rows of E + 8 elements (16-byte aligned, cp.async path);
    "strided": rows of E + 5 starting 2 elements in (unaligned: element loads);
    "bcast": k, v of batch 1 expanded over B (batch stride 0; grads summed).
    """
    g = torch.Generator().manual_seed(seed)
    Hkv = Hkv or Hq
    Ev = Ev or E

    def one(H, N, D, bcast=False):
        if layout == "blhe":
            t = torch.randn(B, N, H, D, generator=g).to("cuda", dtype).transpose(1, 2)
        elif layout == "padded":
            t = torch.randn(B, H, N, D + 8, generator=g).to("cuda", dtype)[..., :D]
        elif layout == "strided":
            t = torch.randn(B, H, N, D + 5, generator=g).to("cuda", dtype)[..., 2:D + 2]
        elif bcast:
            leaf = torch.randn(1, H, N, D, generator=g).to("cuda", dtype).requires_grad_(True)
            return leaf, leaf.expand(B, H, N, D)
        else:
            t = torch.randn(B, H, N, D, generator=g).to("cuda", dtype)
        t.requires_grad_(True)
        return t, t

    q, qv = one(Hq, L, E)
    k, kv = one(Hkv, S, E, bcast=layout == "bcast")
    v, vv = one(Hkv, S, Ev, bcast=layout == "bcast")
    return (q, k, v), (qv, kv, vv)


def _to(kw, device):
    return {n: (x.to(device) if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}


def check(leaves, views=None, grads=True, return_lse=False, **kw):
    """cuda backend vs the float64 CPU oracle (out, lse, dq, dk, dv)."""
    views = views or leaves
    dtype = leaves[0].dtype
    kw = _to(kw, "cuda")
    # oracle: float64 on the CPU, same ops on views of float64 leaves
    l64 = [t.detach().cpu().double().requires_grad_(True) for t in leaves]
    v64 = [l64[i].expand(views[i].shape) for i in range(3)]
    kw64 = _to(kw, "cpu")
    if kw64.get("attn_mask") is not None and kw64["attn_mask"].dtype != torch.bool:
        kw64["attn_mask"] = kw64["attn_mask"].double()
    ref = reference.attention(*v64, compute_dtype=torch.float64, return_lse=True, **kw64)
    # same-precision reference math, on the GPU
    lp = [t.detach().clone().requires_grad_(True) for t in leaves]
    vp = [lp[i].expand(views[i].shape) for i in range(3)]
    pt = reference.attention(*vp, return_lse=True, **kw)
    out, lse = cuda_attention(*views, return_lse=True, **kw)

    assert out.dtype == dtype and out.shape == ref[0].shape and out.is_cuda
    assert torch.isfinite(out).all(), "non-finite output"
    assert_bound("out", out.cpu(), pt[0].cpu(), ref[0], dtype)
    assert lse.dtype == torch.float32
    finite = torch.isfinite(ref[1])
    assert torch.equal(torch.isfinite(lse).cpu(), finite), "lse: -inf exactly where no key is visible"
    assert (lse.cpu()[~finite] == float("-inf")).all()
    assert_bound("lse", lse.cpu()[finite], pt[1].float().cpu()[finite], ref[1][finite], torch.float16)
    if not grads:
        return out
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    gl = torch.randn(lse.shape, generator=torch.Generator().manual_seed(2)) if return_lse else None
    torch.autograd.backward([ref[0]] + ([ref[1]] if return_lse else []),
                            [g.double()] + ([gl.double()] if return_lse else []))
    for o, gc in ((pt, "cuda"), ((out, lse), "cuda")):
        torch.autograd.backward([o[0]] + ([o[1]] if return_lse else []),
                                [g.to(gc, dtype)] + ([gl.to(gc)] if return_lse else []))
    for name, t, tp, t64 in zip(("dq", "dk", "dv"), leaves, lp, l64):
        assert t.grad is not None and torch.isfinite(t.grad).all(), f"{name}: missing or non-finite"
        assert_bound(name, t.grad.cpu(), tp.grad.cpu(), t64.grad, dtype)
    return out


# ---- sizes and head dims --------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("L,S", [(1, 1), (1, 97), (97, 1), (97, 97), (97, 1025), (1025, 97), (1025, 1025)])
def test_lengths(fwd_kernel, L, S, dtype):
    check(*make_inputs(B=1, Hq=2, L=L, S=S, E=64, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("E", [16, 32, 40, 64, 72, 96, 128, 160, 192, 256])
def test_head_dims(fwd_kernel, E, dtype):
    check(*make_inputs(B=2, Hq=2, L=130, S=200, E=E, dtype=dtype))


def skip_without_sm90():
    if not sm90_kernels_compiled():
        pytest.skip("this build has no Hopper kernels (they are built with EFFATTN_UNVERIFIED=1 and 9.0a in the arch list)")
    if torch.cuda.get_device_capability() != (9, 0):
        cc = "".join(map(str, torch.cuda.get_device_capability()))
        pytest.skip(f"the Hopper kernels need an sm_90 GPU, this is sm_{cc}")


@pytest.fixture(params=["sm80", "sm90"])
def fwd_kernel(request, monkeypatch):
    """The forward kernel: the sm_80 one (mma.sync) or the Hopper one (wgmma +
    TMA), required (effattn.config.cuda_sm90 = "require": a call it can't serve is an
    error, not a silent fallback) for head dims 64 and 128, the ones it has."""
    if request.param == "sm90":
        skip_without_sm90()
        monkeypatch.setattr(effattn.config, "cuda_sm90", "require")
    else:
        monkeypatch.setattr(effattn.config, "cuda_sm90", "0")
    return request.param


@pytest.fixture(params=["device", "small"])
def bwd_tiles(request, monkeypatch):
    """The backward's tile set: the device's choice (Large on an H100 or A100),
    or Small forced (the <= 99 KB tiles of sm_86/sm_89), so one GPU runs both."""
    if request.param == "small":
        monkeypatch.setattr(effattn.config, "cuda_bwd_tiles", "small")
    else:
        monkeypatch.setattr(effattn.config, "cuda_bwd_tiles", "auto")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("E,Ev", [(96, 96), (128, 128), (160, 160), (192, 192), (256, 256), (136, 256), (256, 72)])
def test_backward_tiles(bwd_tiles, E, Ev, dtype):
    # Every tile set with a column split (192, 256) or a Small variant (96 up):
    # GQA, causal, lengths and ragged sizes cross the key-tile, column-split and
    # query-step edges.
    kl = torch.tensor([300, 117])
    check(*make_inputs(B=2, Hq=4, Hkv=2, L=211, S=300, E=E, Ev=Ev, dtype=dtype), enable_gqa=True,
          is_causal=E == 192, key_lengths=kl)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_backward_tiles_window_mask(bwd_tiles, dtype):
    leaves, views = make_inputs(B=2, Hq=2, L=150, S=190, E=256, dtype=dtype)
    mask = torch.rand(2, 1, 150, 190, generator=torch.Generator().manual_seed(7)) > 0.2
    check(leaves, views, attn_mask=mask, window=(60, 20))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_value_head_dim_differs(fwd_kernel, dtype):
    check(*make_inputs(B=2, Hq=2, L=77, S=140, E=64, Ev=32, dtype=dtype))


# ---- structure: causal, window, lengths ----------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("L,S", [(200, 200), (130, 300), (300, 130), (1, 64)])
def test_causal(fwd_kernel, L, S, dtype):
    check(*make_inputs(B=2, Hq=2, L=L, S=S, E=64, dtype=dtype), is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("window", [(16, 0), (0, 0), (100, 5), (None, 40), (3, None)])
def test_window(fwd_kernel, window, dtype):
    check(*make_inputs(B=2, Hq=2, L=300, S=260, E=64, dtype=dtype), window=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_window_causal(fwd_kernel, dtype):
    check(*make_inputs(B=1, Hq=2, L=300, S=300, E=128, dtype=dtype), window=(50, None), is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_lengths_masks(fwd_kernel, dtype):
    kl = torch.tensor([200, 0, 1, 129])
    ql = torch.tensor([150, 70, 0, 200])
    check(*make_inputs(B=4, Hq=2, L=200, S=200, E=64, dtype=dtype), key_lengths=kl, query_lengths=ql)
    check(*make_inputs(B=4, Hq=2, L=200, S=200, E=128, dtype=dtype, seed=3), key_lengths=kl,
          is_causal=True)


# ---- heads and layouts -------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (6, 1), (4, 4)])
def test_gqa(fwd_kernel, Hq, Hkv, dtype):
    check(*make_inputs(B=2, Hq=Hq, Hkv=Hkv, L=150, S=170, E=64, dtype=dtype), enable_gqa=True,
          is_causal=Hq == 8)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("layout", ["blhe", "padded", "strided", "bcast"])
def test_layouts(fwd_kernel, layout, dtype, monkeypatch):
    if fwd_kernel == "sm90" and layout in ("strided", "bcast"):
        # Rows TMA cannot describe (strided), a batch stride of 0 (bcast: maybe not): the sm_80 kernel may serve.
        monkeypatch.setattr(effattn.config, "cuda_sm90", "1")
    check(*make_inputs(B=3, Hq=2, L=140, S=90, E=64 if layout != "strided" else 40, dtype=dtype,
                       layout=layout))


# ---- dense masks, lse gradient, empty rows ------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("kind", ["bool", "float32", "same", "bool_bcast"])
def test_dense_mask(fwd_kernel, kind, dtype):
    leaves, views = make_inputs(B=2, Hq=2, L=100, S=150, E=64, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    if kind == "bool":
        mask = torch.rand(2, 2, 100, 150, generator=g) > 0.3
        mask[0, 0, 7] = False  # a row that sees nothing
    elif kind == "bool_bcast":
        mask = torch.rand(1, 1, 1, 150, generator=g) > 0.5  # key padding, every dim broadcast
    else:
        mask = torch.randn(2, 1, 100, 150, generator=g)
        mask[1, 0, 3] = float("-inf")
        mask = mask.to(torch.float32 if kind == "float32" else dtype)
    check(leaves, views, attn_mask=mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("E", [64, 128])
def test_padding_keys_may_hold_nan(fwd_kernel, E, dtype):
    # Keys past key_lengths never reach the result, whatever memory they hold
    # (0 * NaN would be NaN): same output as with finite padding, bit for bit.
    (q, k, v), _ = make_inputs(B=3, Hq=2, L=70, S=300, E=E, dtype=dtype)
    kl = torch.tensor([150, 37, 300], device="cuda")
    with torch.no_grad():
        clean = cuda_attention(q, k, v, key_lengths=kl)
        for b, n in enumerate(kl.tolist()):
            k[b, :, n:] = float("nan")
            v[b, :, n:] = float("nan")
        out = cuda_attention(q, k, v, key_lengths=kl)
    assert torch.isfinite(out).all()
    assert torch.equal(out, clean)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_lse_gradient(fwd_kernel, dtype):
    check(*make_inputs(B=2, Hq=2, L=120, S=70, E=64, dtype=dtype), return_lse=True, is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_fully_masked_rows_are_zero(fwd_kernel, dtype):
    (q, k, v), _ = make_inputs(B=2, Hq=2, L=64, S=64, E=64, dtype=dtype)
    kl = torch.tensor([0, 64], device="cuda")
    out, lse = cuda_attention(q, k, v, return_lse=True, key_lengths=kl)
    assert (out[0] == 0).all() and (lse[0] == float("-inf")).all()
    out.sum().backward()
    assert (k.grad[0] == 0).all() and (v.grad[0] == 0).all() and (q.grad[0] == 0).all()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_declines_backward_under_deterministic_algorithms():
    leaves, views = make_inputs(B=1, Hq=2, L=64, S=64, E=64, dtype=torch.float16)
    prior = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert any("deterministic" in r for r in BACKEND.not_supported_reasons(make_spec(*views)))
        with torch.no_grad():  # the forward has no atomics: still served
            assert not BACKEND.not_supported_reasons(make_spec(*views))
        rep = effattn.backends(*views)
        assert rep["cuda"] and (not rep["triton"] or rep.usable()[0] != "cuda")
    finally:
        torch.use_deterministic_algorithms(prior)


def test_declares_unsupported():
    q = torch.randn(1, 1, 8, 320, device="cuda", dtype=torch.bfloat16)
    assert any("head dims up to 256" in r for r in BACKEND.not_supported_reasons(make_spec(q, q, q)))
    q = torch.randn(1, 1, 8, 64, device="cuda")
    assert any("float32" in r for r in BACKEND.not_supported_reasons(make_spec(q, q, q)))


def test_sm90_forward_long_sequences(fwd_kernel):
    # Many key blocks per query tile: the TMA ring wraps its stages several
    # times (phases flip), causal and not, both Hopper head dims, GQA.
    if fwd_kernel != "sm90":
        pytest.skip("the Hopper forward's own test")
    for E in SM90_HEAD_DIMS:
        for causal in (False, True):
            check(*make_inputs(B=1, Hq=4, Hkv=2, L=1100, S=1500, E=E, dtype=torch.bfloat16, seed=E + causal),
                  grads=False, enable_gqa=True, is_causal=causal)


def test_sm90_required_but_not_possible_is_an_error(monkeypatch):
    # "require" must not fall back silently: a row stride TMA can't use (not a
    # multiple of 16 bytes) is an error at a Hopper head dim, forward and backward.
    skip_without_sm90()
    monkeypatch.setattr(effattn.config, "cuda_sm90", "require")
    (q, k, v), _ = make_inputs(B=1, Hq=2, L=64, S=64, E=40, layout="strided")
    with pytest.raises(RuntimeError, match="not supported"), torch.no_grad():
        cuda_attention(q, k, v)
    monkeypatch.setattr(effattn.config, "cuda_sm90", "0")
    monkeypatch.setattr(effattn.config, "cuda_sm90_bwd", "require")
    (q, k, v), _ = make_inputs(B=1, Hq=2, L=64, S=64, E=120, layout="strided")
    out = cuda_attention(q, k, v)
    with pytest.raises(RuntimeError, match="not supported"):
        out.sum().backward()


@pytest.mark.parametrize("E,Ev", [(64, 128), (128, 64)])
def test_sm90_declines_panels_outside_the_tensor(E, Ev, monkeypatch):
    # At D = 128 either q/k or v has only the first 64-column panel: a TMA box
    # would lie wholly outside it, so the Hopper kernels decline (launch_templates.h,
    # panels_overlap). "1" falls back to the sm_80 kernels; "require" is an error.
    monkeypatch.setattr(effattn.config, "cuda_sm90", "1")
    monkeypatch.setattr(effattn.config, "cuda_sm90_bwd", "1")
    check(*make_inputs(B=2, Hq=2, L=77, S=140, E=E, Ev=Ev, dtype=torch.bfloat16))
    skip_without_sm90()
    (q, k, v), _ = make_inputs(B=1, Hq=2, L=64, S=64, E=E, Ev=Ev)
    monkeypatch.setattr(effattn.config, "cuda_sm90", "require")
    with pytest.raises(RuntimeError, match="not supported"), torch.no_grad():
        cuda_attention(q, k, v)
    monkeypatch.setattr(effattn.config, "cuda_sm90", "1")
    monkeypatch.setattr(effattn.config, "cuda_sm90_bwd", "require")
    with pytest.raises(RuntimeError, match="not supported"):
        cuda_attention(q, k, v).sum().backward()


# ---- the Hopper backward (its kernel head dims 64 and 128) ------------------------------

SM90_BWD_CASES = {
    "plain": (dict(B=2, Hq=2, L=130, S=200), {}),
    "causal_gqa": (dict(B=2, Hq=4, Hkv=2, L=211, S=300), dict(enable_gqa=True, is_causal=True)),
    "lengths": (dict(B=4, Hq=2, L=200, S=260),
                dict(key_lengths=torch.tensor([260, 0, 1, 129]), query_lengths=torch.tensor([150, 70, 0, 200]))),
    "window": (dict(B=1, Hq=2, L=300, S=260), dict(window=(40, 7))),
    "mask": (dict(B=2, Hq=2, L=100, S=150),
             dict(attn_mask=torch.rand(2, 1, 100, 150, generator=torch.Generator().manual_seed(5)) > 0.3)),
    "float_mask": (dict(B=2, Hq=2, L=100, S=150),
                   dict(attn_mask=torch.randn(2, 2, 100, 150, generator=torch.Generator().manual_seed(6)))),
    "blhe": (dict(B=3, Hq=2, L=140, S=90, layout="blhe"), {}),
    "head_dim_padded": (dict(B=2, Hq=2, L=97, S=97, E=-8), {}),  # E = D - 8: zero-filled columns
    "value_dim_smaller": (dict(B=2, Hq=2, L=77, S=140, Ev=-32), {}),
    "long": (dict(B=1, Hq=2, L=700, S=900), dict(is_causal=True)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", SM90_HEAD_DIMS)
@pytest.mark.parametrize("case", list(SM90_BWD_CASES))
def test_sm90_backward(fwd_kernel, case, D, dtype, monkeypatch):
    # Both forwards feed it (out and lse are the backward's inputs); the Hopper
    # backward is required: a call it can't serve is an error, not a fallback.
    skip_without_sm90()
    monkeypatch.setattr(effattn.config, "cuda_sm90_bwd", "require")
    shape, kw = SM90_BWD_CASES[case]
    shape = dict(shape, E=D + min(shape.get("E", 0), 0))  # negative: relative to D
    if "Ev" in shape:
        shape["Ev"] = D + shape["Ev"]
    check(*make_inputs(**shape, dtype=dtype), return_lse=case == "causal_gqa", **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", SM90_HEAD_DIMS)
def test_sm90_backward_padding_may_hold_nan(fwd_kernel, D, dtype, monkeypatch):
    # The shared matrix's padding test (conftest) at the Hopper backward's head dims,
    # after either forward: NaN past the lengths (in q, k, v and dO) changes nothing.
    skip_without_sm90()
    monkeypatch.setattr(effattn.config, "cuda_sm90_bwd", "require")
    assert_padding_never_read(lambda q, k, v, **kw: cuda_attention(q, k, v, return_lse=True, **kw), "cuda", dtype,
                              E=D, S=300, key_lengths=(150, 37, 300))


def test_raw_ops_reject_tensors_on_another_device():
    # Each would reach the CUDA kernels as a host pointer (an illegal address, which
    # poisons the CUDA context) without the check in csrc/host_params.h.
    (q, k, v), _ = make_inputs(L=16, S=16, dtype=torch.float16)  # (float16: also the Turing tiles' run)
    lengths = torch.tensor([16, 5])
    with pytest.raises(RuntimeError, match=r"key_lengths is on cpu but query is on cuda:0"):
        torch.ops.effattn.fwd(q, k, v, None, lengths, None, 0.125, None, None, 0)
    with pytest.raises(RuntimeError, match=r"value is on cpu but query is on cuda:0"):
        torch.ops.effattn.fwd(q, k, v.detach().cpu(), None, None, None, 0.125, None, None, 0)
    out, lse = torch.ops.effattn.fwd(q, k, v, None, None, None, 0.125, None, None, 0)
    with pytest.raises(RuntimeError, match=r"lse is on cpu but query is on cuda:0"):
        torch.ops.effattn.bwd(torch.ones_like(out), None, q, k, v, out, lse.cpu(), None, None, None, 0.125,
                              None, None, 0)
    torch.cuda.synchronize()  # the context is still usable
