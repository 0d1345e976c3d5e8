"""effattn.attention against torch.nn.functional.scaled_dot_product_attention
itself, on random inputs, for every combination of the arguments they share
(attn_mask with is_causal excepted: SDPA refuses it)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import effattn
from conftest import cpu_backends, skip_unless_served

BACKENDS = cpu_backends()

MASKS = [None, "bool", "float", "bool_bcast", "float_2d"]
RANKS = [3, 4, 5]


def _inputs(rank, gqa, ev, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    L, S, E = 23, 31, 16
    batch = {3: (3,), 4: (2, 4), 5: (2, 2, 4)}[rank]  # last entry = heads for rank >= 4
    kv_batch = batch[:-1] + ((2,) if gqa and rank >= 4 else batch[-1:])
    if rank == 3 and gqa:  # SDPA's 3-D GQA: dim -3 is heads
        kv_batch = (1,)
    q = torch.randn(*batch, L, E, generator=g, dtype=dtype)
    k = torch.randn(*kv_batch, S, E, generator=g, dtype=dtype)
    v = torch.randn(*kv_batch, S, ev, generator=g, dtype=dtype)
    return q, k, v


def _mask(kind, q, S, dtype, seed):
    g = torch.Generator().manual_seed(seed + 100)
    L = q.shape[-2]
    if kind is None:
        return None
    if kind == "bool":
        m = torch.rand(*q.shape[:-1], S, generator=g) > 0.25
        m[..., 0] = True  # SDPA's efficient kernels and ours agree on empty rows, but keep rows live
        return m
    if kind == "float":
        return torch.randn(*q.shape[:-1], S, generator=g, dtype=dtype)
    if kind == "bool_bcast":  # key padding: broadcast over everything but the last dim
        return (torch.arange(S) < S - 7).view(*([1] * (q.dim() - 1)), S)
    if kind == "float_2d":
        return torch.randn(L, S, generator=g, dtype=dtype)
    raise ValueError(kind)


CASES = [c for c in itertools.product(RANKS, MASKS, [False, True], [None, 0.37], [False, True], [16, 8])
         if not (c[1] is not None and c[2])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rank,mask,causal,scale,gqa,ev", CASES)
def test_matches_sdpa(backend, dtype, rank, mask, causal, scale, gqa, ev):
    seed = hash((rank, mask, causal, scale, gqa, ev)) % 1000
    q, k, v = _inputs(rank, gqa, ev, dtype, seed)
    m = _mask(mask, q, k.shape[-2], dtype, seed)
    kw = dict(attn_mask=m, is_causal=causal, scale=scale, enable_gqa=gqa)
    skip_unless_served(backend, q, k, v, **kw)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    ins_ref = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(*ins_ref, **kw)
    out = effattn.attention(*ins, backend=backend, **kw)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    for name, a, b in zip("qkv", ins, ins_ref):
        torch.testing.assert_close(a.grad, b.grad, **tol, msg=lambda s: f"d{name}: {s}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_sdpa_bf16(backend):
    q, k, v = _inputs(4, True, 16, torch.bfloat16, 0)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True)
    ours = effattn.attention(q, k, v, is_causal=True, enable_gqa=True, backend=backend)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    err_ours = (ours.double() - ref).abs().max()
    err_theirs = (theirs.double() - ref).abs().max()
    assert err_ours <= 2 * err_theirs + 1e-2
