"""effattn.diagnostics.attention_stats: per query row the entropy, largest weight and effective
number of keys of the attention weights, from the fused kernels (a declared feature, STATS),
against the float64 materialised softmax, for every option; rows that see no key give zeros;
no (L, S) allocation; the output that comes with them is effattn.attention's."""
import math

import pytest
import torch
import torch.nn.attention.bias as sdpa_bias

import effattn
from conftest import largest_allocation, make_qkv, on_device, oracle_stats, skip_unless_served
from effattn import spec as S
from effattn.backends import BY_NAME
from effattn.diagnostics import AttentionStats, attention_stats

# Relative error of the float32 kernels against the float64 softmax of the same inputs (the
# issue's bound), with an absolute floor for the rounding of near-zero entropies (a row whose
# weight is all on one key: float32 sums of ~1 + 1e-7 carry an error of ~1e-7).
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-5, torch.float16: 1e-5}
ATOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-6, torch.float16: 1e-6}


def _cases(L, S_):
    kl, ql = torch.tensor([S_, max(S_ // 3, 1)]), torch.tensor([max(L - 2, 1), L])
    return {
        "plain": dict(),
        "causal": dict(is_causal=True),
        "causal_lower_right": dict(attn_mask=sdpa_bias.causal_lower_right(L, S_)),
        "window": dict(window=(5, 3)),
        "lengths": dict(key_lengths=kl, query_lengths=ql),
        "no_keys_for_one_batch": dict(key_lengths=torch.tensor([0, S_])),
        "bool_mask_empty_rows": dict(attn_mask=torch.rand(2, 1, L, S_) > 0.7),
        "float_mask_broadcast": dict(attn_mask=torch.randn(L, S_)),
        "gqa": dict(enable_gqa=True),
        "causal_window_lengths_mask": dict(is_causal=True, window=(40, None), key_lengths=kl,
                                           attn_mask=torch.randn(2, 1, 1, S_)),
    }


def _check(backend, q, k, v, **kw):
    skip_unless_served(backend, q, k, v, return_stats=True, **kw)
    device = getattr(backend, "device", "cpu")
    qd, kd, vd = on_device(device, q, k, v)
    stats = attention_stats(qd, kd, vd, backend=str(backend),
                            **{n: on_device(device, x) for n, x in kw.items()})
    assert isinstance(stats, AttentionStats)
    entropy_ref, max_ref = oracle_stats(q, k, v, **kw)
    dtype = q.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name, got, want in (("entropy", stats.entropy, entropy_ref), ("max_weight", stats.max_weight, max_ref)):
        got = got.cpu()
        assert got.dtype == acc and got.shape == want.shape, (name, got.dtype, got.shape, want.shape)
        assert torch.isfinite(got).all(), f"{name}: non-finite"
        torch.testing.assert_close(got.double(), want, rtol=RTOL[dtype], atol=ATOL[dtype], msg=name)
    effective = stats.effective_keys.cpu().double()
    seen = max_ref > 0
    torch.testing.assert_close(effective[seen], entropy_ref[seen].exp(), rtol=2 * RTOL[dtype], atol=ATOL[dtype])
    assert (effective[~seen] == 0).all() and (stats.entropy.cpu()[~seen] == 0).all()
    return stats


@pytest.mark.parametrize("case", list(_cases(37, 45)))
def test_stats_match_the_materialised_softmax(backend, case):
    B, Hq = 2, 4
    L, S_ = 37, 45
    q, k, v = make_qkv(B=B, Hq=Hq, Hkv=2 if case == "gqa" else Hq, L=L, S=S_, E=16, requires_grad=False)
    _check(backend, q, k, v, **_cases(L, S_)[case])


@pytest.mark.parametrize("L,S_,E,Ev", [(1, 1, 40, 40), (97, 1025, 72, 40), (130, 97, 40, 72), (1025, 130, 16, 16)])
def test_stats_at_awkward_sizes(backend, L, S_, E, Ev):
    if backend == "triton" and L * S_ > 100_000:
        pytest.skip("the interpreter takes minutes at this size; the plain sizes cover the kernel's paths")
    q, k, v = make_qkv(B=1, Hq=2, L=L, S=S_, E=E, Ev=Ev, requires_grad=False)
    _check(backend, q, k, v, is_causal=True, key_lengths=torch.tensor([max(S_ - 3, 1)]))
    _check(backend, q, k, v)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_stats_in_every_dtype(backend, dtype):
    q, k, v = make_qkv(B=2, Hq=3, L=33, S=70, E=16, dtype=dtype, requires_grad=False)
    _check(backend, q, k, v, window=(20, 4), key_lengths=torch.tensor([70, 9]))


def test_peaked_and_uniform_rows_have_the_known_answers(backend):
    """Equal keys: every weight 1/S, entropy ln S, S effective keys; a huge score on one key:
    entropy ~0, max weight ~1, one effective key."""
    S_ = 50
    q = torch.randn(1, 1, 3, 8)
    k = torch.ones(1, 1, S_, 8)
    v = torch.randn(1, 1, S_, 8)
    device = getattr(backend, "device", "cpu")
    skip_unless_served(backend, q, k, v, return_stats=True)
    stats = attention_stats(*on_device(device, q, k, v), backend=str(backend))
    torch.testing.assert_close(stats.entropy.cpu(), torch.full((1, 1, 3), math.log(S_)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.max_weight.cpu(), torch.full((1, 1, 3), 1 / S_), rtol=1e-6, atol=0)
    torch.testing.assert_close(stats.effective_keys.cpu(), torch.full((1, 1, 3), float(S_)), rtol=1e-5, atol=0)
    bias = torch.zeros(1, 1, 3, S_)
    bias[..., 7] = 200.0
    stats = attention_stats(*on_device(device, q, k, v), attn_mask=on_device(device, bias), backend=str(backend))
    torch.testing.assert_close(stats.entropy.cpu(), torch.zeros(1, 1, 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(stats.max_weight.cpu(), torch.ones(1, 1, 3), rtol=1e-6, atol=0)


def test_output_comes_with_the_stats_and_is_attentions(backend):
    """return_output=True: out is effattn.attention's (the same kernel, the stats beside it),
    with its gradients; the stats carry no gradient."""
    kw = dict(is_causal=True, key_lengths=torch.tensor([45, 20]))
    q, k, v = make_qkv(B=2, Hq=2, L=37, S=45, E=16)
    skip_unless_served(backend, q, k, v, return_stats=True, **kw)
    device = getattr(backend, "device", "cpu")
    kwd = {n: on_device(device, x) for n, x in kw.items()}
    qa, ka, va = on_device(device, q, k, v)
    out, stats = attention_stats(qa, ka, va, backend=str(backend), return_output=True, **kwd)
    assert not stats.entropy.requires_grad and not stats.max_weight.requires_grad
    qb, kb, vb = on_device(device, q, k, v)
    want, lse = effattn.attention(qb, kb, vb, backend=str(backend), return_lse=True, **kwd)
    exact = backend == "cpu"  # the same kernel code for out and lse: bit for bit
    check = torch.equal if exact else (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6))
    assert check(out.detach(), want.detach()) and check(stats.lse, lse.detach())
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g)
    for a, b in ((qa, qb), (ka, kb), (va, vb)):
        assert check(a.grad, b.grad)


def test_reference_backend_serves_the_stats():
    q, k, v = make_qkv(B=2, Hq=2, L=9, S=11, E=8, requires_grad=False)
    _check(effattn.backends.BY_NAME["reference"].name, q, k, v, is_causal=True)


def test_cuda_backend_refuses_the_stats_in_words():
    """The CUDA kernels do not compute the stats: the backend does not declare them and says so."""
    assert not BY_NAME["cuda"].features & S.STATS
    q, k, v = make_qkv(requires_grad=False)
    spec = effattn.make_spec(q, k, v, return_stats=True)
    assert "does not support attention statistics (effattn.diagnostics.attention_stats)" in \
        BY_NAME["cuda"].not_supported_reasons(spec)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot serve this call"):
        attention_stats(q, k, v, backend="cuda")


def test_stats_allocate_nothing_of_size_L_by_S():
    B, H, L, S_, E = 2, 4, 1000, 1000, 16
    q, k, v = make_qkv(B=B, Hq=H, L=L, S=S_, E=E, requires_grad=False)
    one_score_matrix = L * S_ * 4
    biggest = largest_allocation(lambda: attention_stats(q, k, v, is_causal=True, backend="cpu"))
    assert biggest <= max(2 * B * H * L * E * 4, one_score_matrix // 4), biggest
    # the check can fail: the reference's stats do allocate (B, H, L, S)
    assert largest_allocation(lambda: attention_stats(q, k, v, backend="reference")) >= one_score_matrix


def test_plain_calls_do_not_compute_stats():
    """effattn.attention's spec does not ask for stats (so its kernels run without the accumulator)."""
    q, k, v = make_qkv(requires_grad=False)
    assert not effattn.make_spec(q, k, v).features & S.STATS
    assert effattn.make_spec(q, k, v, return_stats=True).features & S.STATS


def test_summary_means_over_rows_that_see_a_key():
    q, k, v = make_qkv(B=2, Hq=1, L=5, S=6, E=8, requires_grad=False)
    stats = attention_stats(q, k, v, key_lengths=torch.tensor([0, 6]))
    summary = stats.summary()
    torch.testing.assert_close(torch.tensor(summary["entropy"], dtype=torch.float64), stats.entropy[1].double().mean())
    assert set(summary) == {"entropy", "max_weight", "effective_keys"}


def test_opcheck_fwd_stats():
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, L=19, S=23, E=8, dtype=torch.float64)
    mask = torch.randn(2, 1, 19, 23, dtype=torch.float64).expand(2, 4, 19, 23)
    variant = BY_NAME["cpu"].isa()[1]
    for args in ((q, k, v, None, None, None, 0.3, None, None, variant),
                 (q, k, v, mask, torch.tensor([23, 5]), torch.tensor([16, 19]), 0.3, 4, 0, variant)):
        torch.library.opcheck(torch.ops.effattn.fwd_stats.default, args)


def test_compile_fullgraph_attention_stats():
    torch._dynamo.reset()
    q, k, v = make_qkv(B=2, Hq=2, L=21, S=30, E=16)
    kl = torch.tensor([30, 11])

    def f(q, k, v):
        out, stats = attention_stats(q, k, v, is_causal=True, key_lengths=kl, return_output=True)
        return out.square().sum(), stats.entropy, stats.max_weight

    loss, entropy, peak = torch.compile(f, fullgraph=True)(q, k, v)
    loss_e, entropy_e, peak_e = f(q, k, v)
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(entropy, entropy_e)
    torch.testing.assert_close(peak, peak_e)
    grads = torch.autograd.grad(loss, (q, k, v))
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b)


def test_dropout_is_refused_with_stats():
    q, k, v = make_qkv(requires_grad=False)
    with pytest.raises(NotImplementedError, match="does not support dropout"):
        attention_stats(q, k, v, dropout_p=0.5)


def test_multihead_attention_records_stats_on_request():
    """record_stats: the same outputs and gradients, and last_stats equal to the entropy and
    largest weight of torch.nn.MultiheadAttention's own (materialised) weights."""
    torch.manual_seed(0)
    ours = effattn.nn.MultiheadAttention(32, 4, batch_first=True)
    theirs = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 40, 32)
    plain, _ = ours(x, x, x)
    assert ours.last_stats is None  # off by default
    assert effattn.nn.record_attention_stats(ours) == [ours]
    out, _ = ours(x, x, x)
    assert torch.equal(out, plain)
    out.sum().backward()  # the output keeps its gradient
    _, weights = theirs(x, x, x, need_weights=True, average_attn_weights=False)  # (B, H, L, S)
    w = weights.double()
    entropy = -torch.special.xlogy(w, w).sum(-1)
    torch.testing.assert_close(ours.last_stats.entropy.double(), entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.last_stats.max_weight.double(), w.amax(-1), rtol=1e-5, atol=1e-6)
    effattn.nn.record_attention_stats(ours, False)
    assert ours.last_stats is None and not ours.record_stats


def test_attention_pooling_records_stats_on_request():
    torch.manual_seed(0)
    pool = effattn.nn.AttentionPooling(16, num_heads=2, num_queries=3)
    x, lengths = torch.randn(3, 20, 16), torch.tensor([20, 7, 0])
    plain = pool(x, lengths)
    pool.record_stats = True
    pooled, weights = pool(x, lengths, return_weights=True)  # (B, H, Q, N)
    assert torch.equal(pooled, plain)
    w = weights.double()
    torch.testing.assert_close(pool.last_stats.entropy.double(), -torch.special.xlogy(w, w).sum(-1),
                               rtol=1e-5, atol=1e-6)
    assert (pool.last_stats.max_weight[2] == 0).all() and (pool.last_stats.effective_keys[2] == 0).all()


def test_triton_serves_stats_on_a_gpu_only_when_enabled(monkeypatch):
    """The Triton stats have run under the interpreter only: on CUDA tensors the backend refuses
    them, in words, unless effattn.config.triton_stats = "1" (and plain calls are not affected)."""
    q, k, v = make_qkv(requires_grad=False)
    with_stats, plain = effattn.make_spec(q, k, v, return_stats=True), effattn.make_spec(q, k, v)
    monkeypatch.setattr(S.AttentionSpec, "device_type", property(lambda self: "cuda"))
    backend = BY_NAME["triton"]
    assert any("attention statistics have not yet run on a GPU" in r for r in backend.limits(with_stats))
    assert backend.limits(plain) == []
    monkeypatch.setattr(effattn.config, "triton_stats", "1")
    assert backend.limits(with_stats) == []
