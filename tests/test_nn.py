"""effattn.nn: MultiheadAttention against torch.nn.MultiheadAttention (state_dict
loaded from it, float64 torch as the oracle), AttentionPooling against plain
masked-softmax math; padding invariance, errors, torch.compile."""
import math

import pytest
import torch

import effattn
from conftest import assert_bound, largest_allocation

E, H = 32, 4


# ---------------------------------------------------------------------------
# MultiheadAttention
# ---------------------------------------------------------------------------

def _pair(dtype=torch.float32, **ctor):
    """(torch module, effattn module with the torch module's state_dict), both eval."""
    ref = torch.nn.MultiheadAttention(E, H, **ctor).eval()
    ours = effattn.nn.MultiheadAttention(E, H, **ctor).eval()
    ours.load_state_dict(ref.state_dict())
    return ref.to(dtype), ours.to(dtype)


def _inputs(B, L, S, kdim=E, vdim=E, batch_first=True, batched=True):
    q, k, v = torch.randn(B, L, E), torch.randn(B, S, kdim), torch.randn(B, S, vdim)
    if not batched:
        return q[0], k[0], v[0]
    return (q, k, v) if batch_first else tuple(t.transpose(0, 1) for t in (q, k, v))


def _masks(case, B, L, S):
    """Forward kwargs (torch's conventions). Key 0 is never masked, so no row is
    empty (torch gives NaN there, effattn zeros)."""
    kw = {}
    if "kpm_bool" in case:
        kpm = torch.rand(B, S) < 0.3
        kpm[:, 0] = False
        kw["key_padding_mask"] = kpm
    if "kpm_float" in case:
        kw["key_padding_mask"] = torch.randn(B, S)
    if "mask2d_bool" in case:
        m = torch.rand(L, S) < 0.3
        m[:, 0] = False
        kw["attn_mask"] = m
    if "mask2d_float" in case:
        kw["attn_mask"] = torch.randn(L, S)
    if "mask3d_float" in case:
        kw["attn_mask"] = torch.randn(B * H, L, S)
    if "mask3d_bool" in case:
        m = torch.rand(B * H, L, S) < 0.3
        m[..., 0] = False
        kw["attn_mask"] = m
    if "causal" in case:  # torch needs the mask as well (the "hint")
        kw["attn_mask"] = torch.ones(L, S, dtype=torch.bool).triu(1)
        kw["is_causal"] = True
    return kw


MHA_CASES = {
    # name: (constructor kwargs, mask case, batched)
    "plain": (dict(batch_first=True), "", True),
    "seq_first": (dict(batch_first=False), "", True),
    "kpm_bool": (dict(batch_first=True), "kpm_bool", True),
    "kpm_float_seq_first": (dict(batch_first=False), "kpm_float", True),
    "mask2d_bool": (dict(batch_first=True), "mask2d_bool", True),
    "mask2d_float+kpm_bool": (dict(batch_first=True), "mask2d_float kpm_bool", True),
    "mask3d_float": (dict(batch_first=False), "mask3d_float", True),
    "mask3d_bool+kpm_float": (dict(batch_first=True), "mask3d_bool kpm_float", True),
    "causal": (dict(batch_first=True), "causal", True),
    "causal+kpm_bool": (dict(batch_first=False), "causal kpm_bool", True),
    "kdim_vdim": (dict(batch_first=True, kdim=24, vdim=40), "kpm_bool mask2d_float", True),
    "no_bias": (dict(batch_first=True, bias=False), "kpm_bool", True),
    "bias_kv+zero_attn": (dict(batch_first=True, add_bias_kv=True, add_zero_attn=True), "kpm_bool mask3d_float", True),
    "unbatched": (dict(batch_first=True), "mask2d_bool", False),
}


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask")  # torch's, on mixed masks
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(MHA_CASES))
def test_mha_matches_torch(case, dtype):
    """Same outputs and gradients as torch.nn.MultiheadAttention with the same
    state_dict: error vs torch in float64 <= 2 x torch's own error + a floor."""
    ctor, mask_case, batched = MHA_CASES[case]
    B, L, S = (3, 13, 17) if batched else (1, 13, 17)
    ref, ours = _pair(dtype, **ctor)
    ref64 = torch.nn.MultiheadAttention(E, H, **ctor).eval().double()
    ref64.load_state_dict(ref.state_dict())
    x = _inputs(B, L, S, ctor.get("kdim", E), ctor.get("vdim", E), ctor["batch_first"], batched)
    kw = _masks(mask_case, B, L, S)
    if not batched:
        kw = {n: (m[0] if n == "key_padding_mask" else m) for n, m in kw.items()}

    def run(mod, dt):
        xs = [t.to(dt).requires_grad_() for t in x]
        kws = {n: (m.to(dt) if isinstance(m, torch.Tensor) and m.is_floating_point() else m) for n, m in kw.items()}
        out, weights = mod(*xs, need_weights=False, **kws)
        out.backward(torch.ones_like(out) / out.shape[-1])
        return out, weights, xs

    out64, _, xs64 = run(ref64, torch.float64)
    out_pt, _, xs_pt = run(ref, dtype)
    out, weights, xs = run(ours, dtype)
    assert weights is None and out.dtype == dtype and out.shape == out64.shape
    assert_bound("out", out, out_pt, out64, dtype)
    for name, a, b, c in zip("qkv", xs, xs_pt, xs64):
        assert_bound(f"d{name}", a.grad, b.grad, c.grad, dtype)
    grads64 = dict((n, p.grad) for n, p in ref64.named_parameters())
    grads_pt = dict((n, p.grad) for n, p in ref.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert_bound(name, p.grad, grads_pt[name], grads64[name], dtype)


def test_mha_state_dict_names_match_torch():
    for ctor in (dict(), dict(kdim=8, vdim=12), dict(add_bias_kv=True, bias=False)):
        ref = torch.nn.MultiheadAttention(E, H, **ctor)
        assert list(effattn.nn.MultiheadAttention(E, H, **ctor).state_dict()) == list(ref.state_dict())


def test_mha_extras_key_lengths_causal_window():
    """key_lengths == the equivalent key_padding_mask; is_causal needs no mask;
    window == the equivalent band mask."""
    _, ours = _pair(batch_first=True)
    B, L = 3, 20
    q, k, v = _inputs(B, L, L)
    lengths = torch.tensor([20, 7, 1])
    pad = torch.arange(L) >= lengths.view(B, 1)
    i, j = torch.arange(L).view(L, 1), torch.arange(L).view(1, L)
    with torch.no_grad():
        torch.testing.assert_close(ours(q, k, v, key_lengths=lengths)[0], ours(q, k, v, key_padding_mask=pad)[0])
        torch.testing.assert_close(ours(q, k, v, is_causal=True)[0], ours(q, k, v, attn_mask=j > i)[0])
        band = (j < i - 3) | (j > i + 2)
        torch.testing.assert_close(ours(q, k, v, window=(3, 2))[0], ours(q, k, v, attn_mask=band)[0])


def test_mha_padding_mask_allocates_no_seq_by_seq_matrix():
    B, L = 2, 1000
    _, ours = _pair(batch_first=True)
    ours.train()
    q = torch.randn(B, L, E, requires_grad=True)
    pad = torch.arange(L) >= torch.tensor([L, 300]).view(B, 1)

    def step():
        out, _ = ours(q, q, q, key_padding_mask=pad)
        out.sum().backward()

    assert largest_allocation(step) < L * L * 4 // 4


@pytest.mark.parametrize("call, exc, match", [
    (lambda m, q: m(q, q, q, need_weights=True), NotImplementedError, r"does not materialise.*need_weights=False"),
    (lambda m, q: m(q[0, 0], q[0, 0], q[0, 0]), ValueError, r"query must be 3-D .*got shape \(32,\)"),
    (lambda m, q: m(q[..., :8], q, q), ValueError, r"query\.size\(-1\) = 8 must equal embed_dim = 32"),
    (lambda m, q: m(q, q[:, :, :8], q), ValueError, r"key\.size\(-1\) = 8 must equal kdim = 32"),
    (lambda m, q: m(q, q[:1], q[:1]), ValueError, r"key\.size\(0\) = 1 must equal query\.size\(0\) = 2"),
    (lambda m, q: m(q, q, q[:, :3]), ValueError, r"value\.size\(1\) = 3 must equal key\.size\(1\) = 5"),
    (lambda m, q: m(q, q, q, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \(2, 5\)"),
    (lambda m, q: m(q, q, q, attn_mask=torch.zeros(5, 4)), ValueError,
     r"attn_mask must have shape \(L, S\) = \(5, 5\) or \(batch \* num_heads, L, S\) = \(8, 5, 5\), got \(5, 4\)"),
    (lambda m, q: m(q, q, q, attn_mask=torch.zeros(5, 5, dtype=torch.int64)), ValueError,
     r"attn_mask must be bool or floating point"),
])
def test_mha_errors(call, exc, match):
    _, ours = _pair(batch_first=True)
    with pytest.raises(exc, match=match):
        call(ours, torch.randn(2, 5, E))


def test_mha_dropout_train_raises_eval_ignores():
    m = effattn.nn.MultiheadAttention(E, H, dropout=0.1, batch_first=True)
    q = torch.randn(2, 5, E)
    with pytest.raises(NotImplementedError, match=r"dropout is not supported \(dropout=0.1\).*\.eval\(\)"):
        m(q, q, q)
    ref = torch.nn.MultiheadAttention(E, H, dropout=0.1, batch_first=True).eval()
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(m.eval()(q, q, q)[0], ref(q, q, q, need_weights=False)[0])


def test_mha_extra_keys_refuse_positional_options():
    m = effattn.nn.MultiheadAttention(E, H, add_zero_attn=True, batch_first=True)
    q = torch.randn(2, 5, E)
    with pytest.raises(ValueError, match=r"add_bias_kv / add_zero_attn .* cannot be combined"):
        m(q, q, q, is_causal=True)


# ---------------------------------------------------------------------------
# AttentionPooling
# ---------------------------------------------------------------------------

def _pooling_oracle(pool, x, lengths):
    """The pooling written out in float64, one sequence at a time, on its valid frames only."""
    pool64 = {n: p.detach().double() for n, p in pool.named_parameters()}
    Hh, Q = pool.num_heads, pool.num_queries

    def lin(name, t):
        return t @ pool64[f"{name}.weight"].T + pool64.get(f"{name}.bias", 0)

    rows = []
    for b, n in enumerate(lengths.tolist()):
        xb = x[b, :n].detach().double()
        q = lin("q_proj", xb.mean(0)) if pool.query_kind == "mean" else pool64["query"]
        keys = lin("key_proj", xb) if pool.key_proj is not None else xb
        values = lin("value_proj", xb) if pool.value_proj is not None else xb
        q, keys, values = (t.reshape(-1, Hh, t.shape[-1] // Hh).transpose(0, 1) for t in (q.reshape(Q, -1), keys, values))
        w = torch.softmax(q @ keys.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)  # (H, Q, n)
        out = (w @ values).transpose(0, 1).reshape(Q, -1)  # (Q, value_dim)
        rows.append(out.reshape(-1) if pool.combine == "concat" else out.mean(0))
    return torch.stack(rows)


POOL_CASES = {
    "learned": dict(),
    "mean": dict(query="mean"),
    "heads_queries_concat": dict(num_heads=2, num_queries=3, query="mean", value_proj=True, value_dim=8),
    "heads_queries_mean": dict(num_heads=4, num_queries=2, combine="mean", attn_dim=8),
    "no_key_proj": dict(key_proj=False, num_heads=2),
}


def _pool_inputs(B=4, N=11, D=16, dtype=torch.float32):
    x = torch.randn(B, N, D, dtype=dtype)
    lengths = torch.tensor([11, 5, 1, 8])[:B]
    return x, lengths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(POOL_CASES))
def test_pooling_matches_oracle(case, dtype):
    pool = effattn.nn.AttentionPooling(16, **POOL_CASES[case]).to(dtype)
    x, lengths = _pool_inputs(dtype=dtype)
    out = pool(x, lengths)
    assert out.shape == (4, pool.out_dim) and out.dtype == dtype
    expected = _pooling_oracle(pool, x, lengths)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(out.double(), expected, **tol)


@pytest.mark.parametrize("case", list(POOL_CASES))
def test_pooling_ignores_padding_exactly(case):
    """Padded frames change nothing (bit for bit), get exactly zero gradient and
    zero weight; the weights of valid frames are the softmax over them alone."""
    pool = effattn.nn.AttentionPooling(16, **POOL_CASES[case])
    x, lengths = _pool_inputs()
    pad = (torch.arange(x.shape[1]) >= lengths.view(-1, 1)).unsqueeze(-1)
    x_junk = torch.where(pad, 1e3 * torch.randn_like(x), x)  # large values: any leak would show
    x.requires_grad_()
    x_junk.requires_grad_()
    out, w = pool(x, lengths, return_weights=True)
    out_junk, w_junk = pool(x_junk, lengths, return_weights=True)
    assert torch.equal(out, out_junk)
    out_junk.sum().backward()
    assert torch.count_nonzero(x_junk.grad * pad) == 0 and torch.count_nonzero(x_junk.grad) > 0
    padw = pad.squeeze(-1).view(x.shape[0], 1, 1, -1)
    assert torch.count_nonzero(w * padw) == 0
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))  # the lse excluded the padding
    assert torch.equal(w, w_junk)


def test_pooling_every_parameter_gets_a_gradient():
    pool = effattn.nn.AttentionPooling(16, 2, num_queries=2, query="mean", value_proj=True)
    x, lengths = _pool_inputs()
    pool(x, lengths).square().sum().backward()
    for name, p in pool.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_pooling_length_zero_gives_zeros():
    pool = effattn.nn.AttentionPooling(16, query="mean")
    x, _ = _pool_inputs(B=2)
    out = pool(x, torch.tensor([0, 3]))
    assert torch.equal(out[0], torch.zeros_like(out[0])) and out[1].abs().sum() > 0


@pytest.mark.parametrize("call, match", [
    (lambda p, x, n: p(x[0], n), r"x must be a \(batch, frames, embed_dim\) tensor, got shape \(11, 16\)"),
    (lambda p, x, n: p(x[..., :8], n), r"x\.size\(2\) = 8 must equal embed_dim = 16"),
    (lambda p, x, n: p(x, n[:2]), r"lengths must have shape \(4,\) \(the batch size\), got \(2,\)"),
    (lambda p, x, n: p(x, n.float()), r"lengths must be an integer tensor of shape \(4,\), got torch.float32"),
    (lambda p, x, n: p(x, n + 20), r"key_lengths must be <= key\.size\(-2\) = 11"),
])
def test_pooling_errors(call, match):
    pool = effattn.nn.AttentionPooling(16)
    x, lengths = _pool_inputs()
    with pytest.raises(ValueError, match=match):
        call(pool, x, lengths)


@pytest.mark.parametrize("kwargs, match", [
    (dict(query="max"), r"query must be 'learned' or 'mean'"),
    (dict(combine="sum"), r"combine must be 'concat' or 'mean'"),
    (dict(num_heads=3), r"attn_dim = 16 must be divisible by num_heads = 3"),
    (dict(key_proj=False, attn_dim=8), r"without key_proj .* attn_dim must be embed_dim = 16"),
    (dict(value_dim=8), r"value_dim needs value_proj=True"),
])
def test_pooling_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        effattn.nn.AttentionPooling(16, **kwargs)


# ---------------------------------------------------------------------------
# torch.compile (both modules): forward and backward equal to eager
# ---------------------------------------------------------------------------

def _compile_matches_eager(module, *inputs, **kwargs):
    def loss_of(fn):
        module.zero_grad()
        xs = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
        out = fn(*xs, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        loss = out.square().sum()
        loss.backward()
        return loss, [t.grad for t in xs if t.is_floating_point()] + [p.grad.clone() for p in module.parameters()]

    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    loss_c, grads_c = loss_of(compiled)
    loss_e, grads_e = loss_of(module)
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


def test_mha_compiles_fullgraph():
    _, ours = _pair(batch_first=False)
    q, k, v = _inputs(2, 9, 9, batch_first=False)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 4:] = True
    _compile_matches_eager(ours, q, k, v, key_padding_mask=pad, is_causal=True)


def test_pooling_compiles_fullgraph():
    pool = effattn.nn.AttentionPooling(16, 2, num_queries=2, query="mean", value_proj=True)
    x, lengths = _pool_inputs()
    _compile_matches_eager(pool, x, lengths)
