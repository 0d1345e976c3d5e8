"""Every option of effattn.attention, for every fused backend, against the
float64 reference: forward and gradients. The ``backend`` fixture
(conftest.backend_cases) runs the whole matrix once per CPU kernel variant
(instruction set) this machine can execute, for the Triton kernels (on the
GPU, or on the CPU under Triton's interpreter) and for the CUDA kernels (GPU
only); a backend that cannot run here is skipped with its reason. A case a
backend declares unsupported (e.g. float64 on the GPU) is skipped with the
backend's own words."""
import pytest
import torch

import effattn
from conftest import (DTYPES, assert_padding_never_read, check_against_oracle, kernel_backends, make_qkv,
                      on_device, skip_unless_served)


def test_there_is_a_cpu_kernel_to_test():
    # Guards against the whole matrix skipping silently if the build broke.
    assert "cpu" in kernel_backends("cpu"), effattn.backends()


def _call(backend, q, k, v, **kw):
    """effattn.attention on the backend's device (inputs made on the CPU)."""
    dev = backend.device
    return effattn.attention(*on_device(dev, q, k, v), backend=str(backend),
                             **{n: on_device(dev, x) for n, x in kw.items()})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,S", [(1, 1), (1, 97), (97, 1), (97, 97), (64, 128), (130, 70)])
@pytest.mark.parametrize("E", [16, 40, 72])
@pytest.mark.parametrize("causal", [False, True])
def test_sizes_dtypes(backend, dtype, L, S, E, causal):
    q, k, v = make_qkv(B=2, Hq=2, L=L, S=S, E=E, dtype=dtype)
    check_against_oracle(q, k, v, backend, is_causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_long_1025(backend, dtype, causal):
    q, k, v = make_qkv(B=1, Hq=2, L=1025, S=1025, E=64, dtype=dtype)
    check_against_oracle(q, k, v, backend, is_causal=causal)


@pytest.mark.parametrize("E", [96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_large_head_dims(backend, E, dtype):
    # float32 at 256 takes the smallest GPU tiles (twice the shared memory per element)
    q, k, v = make_qkv(B=1, Hq=2, L=70, S=90, E=E, dtype=dtype)
    check_against_oracle(q, k, v, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_dim_differs(backend, dtype):
    q, k, v = make_qkv(L=50, S=60, E=32, Ev=24, dtype=dtype)
    check_against_oracle(q, k, v, backend, is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["blhe", "strided"])
def test_strided_layouts(backend, dtype, layout):
    q, k, v = make_qkv(B=2, Hq=4, L=65, S=33, E=24, dtype=dtype, layout=layout)
    check_against_oracle(q, k, v, backend, is_causal=True)


@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (6, 1), (8, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gqa(backend, Hq, Hkv, dtype):
    q, k, v = make_qkv(B=2, Hq=Hq, Hkv=Hkv, L=77, S=67, E=32, dtype=dtype)
    check_against_oracle(q, k, v, backend, enable_gqa=True, is_causal=True)


def _mask(kind, B, H, L, S, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    if kind == "bool":
        return torch.rand(B, H, L, S, generator=g) > 0.3
    if kind == "bool_key_padding":  # (B, 1, 1, S): broadcast over heads and queries
        return torch.arange(S).view(1, 1, 1, S) < torch.tensor([S, S // 2][:B]).view(B, 1, 1, 1)
    if kind == "float":
        return torch.randn(B, H, L, S, generator=g).to(dtype)
    if kind == "float32":
        return torch.randn(L, S, generator=g)
    if kind == "float_neg_inf":  # additive mask with -inf holes and a fully masked row
        m = torch.randn(1, H, L, S, generator=g).to(dtype)
        m = m.masked_fill(torch.rand(1, H, L, S, generator=g) > 0.6, float("-inf"))
        m[..., 3, :] = float("-inf")
        return m
    if kind == "row_broadcast":  # (L, 1): last dim has stride 0 when expanded
        return (torch.arange(L) % 3 != 0).view(L, 1)
    raise ValueError(kind)


MASKS = ["bool", "bool_key_padding", "float", "float32", "float_neg_inf", "row_broadcast"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MASKS)
def test_masks(backend, dtype, kind):
    B, H, L, S = 2, 3, 70, 90
    q, k, v = make_qkv(B=B, Hq=H, L=L, S=S, E=24, dtype=dtype)
    mask = _mask(kind, B, H, L, S, dtype)
    check_against_oracle(q, k, v, backend, attn_mask=mask)


def test_mask_with_causal_and_gqa(backend):
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, L=70, S=70, E=24)
    mask = _mask("bool", 2, 4, 70, 70, torch.float32)
    check_against_oracle(q, k, v, backend, attn_mask=mask, is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["key", "query", "both"])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths(backend, dtype, which, causal):
    B, L, S = 3, 90, 130
    q, k, v = make_qkv(B=B, Hq=2, L=L, S=S, E=32, dtype=dtype)
    kw = {}
    if which in ("key", "both"):
        kw["key_lengths"] = torch.tensor([S, 61, 1], dtype=torch.int32)
    if which in ("query", "both"):
        kw["query_lengths"] = torch.tensor([17, L, 64])
    check_against_oracle(q, k, v, backend, is_causal=causal, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("window", [(0, 0), (5, 3), (64, None), (None, 10), (100, 100), (0, None)])
@pytest.mark.parametrize("causal", [False, True])
def test_window(backend, dtype, window, causal):
    q, k, v = make_qkv(B=2, Hq=2, L=150, S=140, E=16, dtype=dtype)
    check_against_oracle(q, k, v, backend, window=window, is_causal=causal,
                         key_lengths=torch.tensor([140, 90]))


def test_everything_together(backend):
    B, Hq, Hkv, L, S = 3, 4, 2, 100, 120
    q, k, v = make_qkv(B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=40, dtype=torch.bfloat16, layout="blhe")
    mask = torch.randn(1, Hq, L, S)  # float32 mask, broadcast over batch
    check_against_oracle(q, k, v, backend, attn_mask=mask, is_causal=True, enable_gqa=True,
                         window=(30, None), key_lengths=torch.tensor([120, 50, 7]),
                         query_lengths=torch.tensor([100, 40, 0]), scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows_are_zero(backend, dtype):
    """Rows that see no key: zeros, lse = -inf, zero gradients, never NaN."""
    B, H, L, S = 3, 2, 40, 30
    q, k, v = make_qkv(B=B, Hq=H, L=L, S=S, E=16, dtype=dtype)
    mask = torch.ones(B, H, L, S, dtype=torch.bool)
    mask[0, :, 5] = False  # an all-False mask row
    kw = dict(attn_mask=mask, key_lengths=torch.tensor([30, 0, 20]),  # batch 1: no keys at all
              query_lengths=torch.tensor([40, 40, 25]),  # batch 2: rows >= 25 are padding
              window=(0, None))  # rows i > key length see nothing
    skip_unless_served(backend, q, k, v, **kw)
    q, k, v = on_device(backend.device, q, k, v)
    out, lse = _call(backend, q, k, v, return_lse=True, **kw)
    out.backward(torch.ones_like(out))
    out, lse, (dq, dk, dv) = out.cpu(), lse.cpu(), (t.grad.cpu() for t in (q, k, v))
    empty = torch.zeros(B, H, L, dtype=torch.bool)
    empty[0, :, 5] = True
    empty[0, :, 30:] = True  # window (0, None): row i needs a key j >= i, keys end at 30
    empty[1] = True
    empty[2, :, 25:] = True
    empty[2, :, 20:] = True  # window (0, None): row i needs a key j >= i, keys end at 20
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert (out[empty] == 0).all()
    assert (dq[empty] == 0).all()
    assert torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()
    assert (dk[1] == 0).all() and (dv[1] == 0).all()
    assert (dk[2, :, 20:] == 0).all() and (dv[2, :, 20:] == 0).all()
    check_against_oracle(*make_qkv(B=B, Hq=H, L=L, S=S, E=16, dtype=dtype), backend, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_return_lse_and_its_gradient(backend, dtype):
    from effattn import reference
    q, k, v = make_qkv(B=2, Hq=2, L=50, S=60, E=16, dtype=dtype)
    kw = dict(is_causal=True, key_lengths=torch.tensor([60, 20]))
    skip_unless_served(backend, q, k, v, return_lse=True, **kw)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    q, k, v = on_device(backend.device, q, k, v)
    out, lse = _call(backend, q, k, v, return_lse=True, **kw)
    out64, lse64 = reference.attention(q64, k64, v64, return_lse=True, compute_dtype=torch.float64, **kw)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lse.shape == (2, 2, 50)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(lse.double().cpu(), lse64, atol=tol, rtol=tol)
    # the LSE is differentiable too (d lse_i / d s_ij = p_ij), e.g. for merging partial attentions
    gl = torch.randn(lse.shape, generator=torch.Generator().manual_seed(2))
    (lse * gl.to(lse.dtype).to(lse.device)).sum().backward()
    (lse64 * gl.double()).sum().backward()
    for t, t64 in ((q, q64), (k, k64)):
        torch.testing.assert_close(t.grad.double().cpu(), t64.grad, atol=10 * tol, rtol=10 * tol)
    assert v64.grad is None and (v.grad == 0).all()  # the LSE does not depend on v


@pytest.mark.parametrize("shape", [(20, 16), (3, 20, 16), (2, 3, 4, 20, 16)])
def test_batch_ranks(backend, shape):
    """2-D, 3-D and 5-D inputs, as SDPA takes them; lengths follow the batch dims."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g).requires_grad_() for _ in range(3))
    kw = {}
    if len(shape) == 3:
        kw["key_lengths"] = torch.tensor([20, 5, 11])
    if len(shape) == 5:
        kw["key_lengths"] = torch.tensor([[20, 5, 11], [1, 2, 3]])
    out = check_against_oracle(q, k, v, backend, is_causal=True, **kw)
    assert out.shape == shape


def test_key_value_batch_broadcast(backend):
    q = torch.randn(3, 2, 30, 16, requires_grad=True)
    k = torch.randn(1, 2, 40, 16, requires_grad=True)
    v = torch.randn(1, 2, 40, 16, requires_grad=True)
    check_against_oracle(q, k, v, backend)


@pytest.mark.parametrize("Hq,Hkv,L,S", [(2, 2, 0, 10), (2, 2, 10, 0), (0, 2, 10, 10), (0, 0, 10, 10)],
                         ids=["no queries", "no keys", "no query heads", "no heads"])
def test_empty_sequences(backend, Hq, Hkv, L, S):
    """Forward and backward. The gradient of an empty out.sum() has all-zero strides
    (the ops took that for a non-contiguous last dim); nothing attends, so every
    gradient is zero."""
    q, k, v = make_qkv(B=2, Hq=Hq, Hkv=Hkv, L=L, S=S, E=16)
    kw = dict(enable_gqa=Hq != Hkv)
    skip_unless_served(backend, q, k, v, **kw)
    q, k, v = on_device(backend.device, q, k, v)
    out = effattn.attention(q, k, v, backend=str(backend), **kw)
    assert out.shape == (2, Hq, L, 16) and (out == 0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and (t.grad == 0).all()


def test_strided_inputs_are_not_copied_and_outputs_follow_layout():
    q, k, v = make_qkv(B=2, Hq=4, L=33, S=33, E=16, layout="blhe")
    spec = effattn.make_spec(q, k, v)
    assert spec.q.data_ptr() == q.data_ptr() and spec.k.data_ptr() == k.data_ptr()
    out = effattn.attention(q, k, v, backend="cpu")
    assert out.transpose(1, 2).is_contiguous()  # (B, L, H, E) memory, like q
    out.sum().backward()
    assert q.grad.transpose(1, 2).is_contiguous()


def test_broadcast_mask_is_not_expanded():
    q, k, v = make_qkv(B=2, Hq=4, L=33, S=40, E=16)
    pad = torch.arange(40).view(1, 1, 1, 40) < torch.tensor([40, 20]).view(2, 1, 1, 1)
    spec = effattn.make_spec(q, k, v, attn_mask=pad)
    assert spec.mask.data_ptr() == pad.data_ptr()
    assert spec.mask.stride()[1:3] == (0, 0)


def test_lengths_as_strided_views(backend):
    q, k, v = make_qkv(B=2, Hq=2, L=30, S=40, E=16)
    lengths = torch.tensor([40, 0, 12, 0])[::2]  # a non-contiguous int64 view
    check_against_oracle(q, k, v, backend, key_lengths=lengths)


def test_autocast_runs_in_the_autocast_dtype_like_sdpa(backend):
    import torch.nn.functional as F
    q, k, v = on_device(backend.device, *make_qkv(B=2, Hq=2, L=30, S=40, E=16, requires_grad=False))
    with torch.autocast(backend.device, dtype=torch.bfloat16):
        ours = effattn.attention(q, k, v, is_causal=True, backend=str(backend))
        theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if backend == "cpu":  # float64 is never autocast (and the GPU kernels don't take it)
            assert effattn.attention(q.double(), k.double(), v.double(), backend=str(backend)).dtype == torch.float64
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), theirs.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padding_past_the_lengths_is_never_read(backend, dtype):
    # NaN in every padded row and column of the inputs and of dO changes nothing (conftest).
    kw = dict(key_lengths=torch.tensor([150, 37, 90]), query_lengths=torch.tensor([70, 5, 33]))
    skip_unless_served(backend, *make_qkv(B=3, Hq=2, L=70, S=150, E=16, dtype=dtype), **kw)
    with_lse = not effattn.backends(*make_qkv(B=3, Hq=2, L=70, S=150, E=16, dtype=dtype), return_lse=True,
                                    **kw)[str(backend)]

    def attention(q, k, v, **kw):  # (a backend without return_lse: a stand-in lse the check compares too)
        if with_lse:
            return _call(backend, q, k, v, return_lse=True, **kw)
        return _call(backend, q, k, v, **kw), torch.zeros(())

    assert_padding_never_read(attention, backend.device, dtype, E=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_inputs_give_nan_not_zeros(backend, dtype, where):
    """A NaN in an input reaches the outputs that depend on it and never turns
    into a finite answer (that would hide the bug upstream); a NaN key stays
    out of the rows that cannot see it."""
    B, H, L, E, i = 2, 2, 150, 16, 97  # L > one tile; the NaN sits in row/key i of (batch 0, head 1)
    q, k, v = make_qkv(B=B, Hq=H, L=L, S=L, E=E, dtype=dtype, requires_grad=False)
    {"q": q, "k": k, "v": v}[where][0, 1, i, 3] = float("nan")
    skip_unless_served(backend, q, k, v)
    for causal in (False, True):
        nan_rows = _call(backend, q, k, v, is_causal=causal).isnan().any(-1).cpu()
        want = torch.zeros(B, H, L, dtype=torch.bool)
        if where == "q":
            want[0, 1, i] = True
        else:  # every row that sees key i
            want[0, 1, i if causal else 0:] = True
        if where == "v" and causal:
            # masked probabilities are exact zeros, and 0 * NaN is NaN: rows sharing a tile with
            # the poisoned value may turn NaN too (so does SDPA's math). The NaN is never lost.
            assert nan_rows[want].all(), f"causal={causal}: a row that sees the NaN is finite"
        else:
            assert torch.equal(nan_rows, want), f"causal={causal}: rows {nan_rows.nonzero().tolist()[:5]}..."
