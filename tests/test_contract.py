"""The feature contract (effattn/spec.py, effattn/backends/base.py): the spec derives
every feature a call needs, each backend declares what it serves, and a feature a
backend does not declare is refused in words, never ignored; SDPA's own mask
objects are understood or refused, never passed through as a tensor."""
import warnings

import pytest
import torch
import torch.nn.attention.bias as sdpa_bias
import torch.nn.functional as F

import effattn
from effattn import spec as S
from effattn.backends import BY_NAME, PRIORITY, select
from effattn.backends.reference import ReferenceBackend
from conftest import check_against_oracle, make_qkv

FUSED = [b for b in PRIORITY if not b.materializes_scores]


def test_a_feature_only_the_reference_knows_is_refused_by_every_fused_backend(monkeypatch):
    """A new feature that reaches the spec and the reference but no kernel: every fused
    backend refuses it, naming it, and auto falls back to the reference with the warning."""
    new = 1 << 40
    monkeypatch.setitem(S.FEATURES, new, "a test-only score modifier")
    monkeypatch.setattr(ReferenceBackend, "features", ReferenceBackend.features | new)
    q, k, v = make_qkv(requires_grad=False)
    spec = effattn.make_spec(q, k, v, is_causal=True)
    spec = spec.replace(features=spec.features | new)
    for backend in FUSED:
        reasons = backend.reasons(spec)
        assert reasons, f"{backend.name} accepted a feature it never declared"
        if not backend.unavailable_reasons():  # (an unavailable backend says that first)
            assert "does not support a test-only score modifier" in reasons, (backend.name, reasons)
    with pytest.warns(UserWarning, match=r"cpu: does not support a test-only score modifier.*falling back"):
        assert select(spec, "auto").name == "reference"
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot serve this call: does not support a test-only"):
        select(spec, "cpu")


def test_every_feature_is_declared_by_the_reference_or_refused_everywhere():
    """The reference declares, explicitly, every feature reference.py implements: all but
    dropout today (a new feature fails here until the reference serves it, or is added to
    this list of features nobody serves yet). A feature no backend declares makes the call
    a NotImplementedError naming it."""
    served_by_nobody = S.DROPOUT
    assert ReferenceBackend.features == S.ALL_FEATURES & ~served_by_nobody, \
        S.feature_words(S.ALL_FEATURES & ~served_by_nobody & ~ReferenceBackend.features)
    q, k, v = make_qkv(requires_grad=False)
    with pytest.raises(NotImplementedError, match=r"cpu: does not support dropout.*reference: does not support dropout"):
        effattn.attention(q, k, v, dropout_p=0.5)


@pytest.mark.parametrize("kw,features", [
    (dict(), 0),
    (dict(is_causal=True), S.CAUSAL),
    (dict(window=(3, None)), S.WINDOW),
    (dict(window=(None, None)), 0),
    (dict(attn_mask="lower_right"), S.CAUSAL_LOWER_RIGHT),
    (dict(attn_mask="lower_right_more_queries"), S.CAUSAL_LOWER_RIGHT | S.NEGATIVE_BAND),
    (dict(attn_mask="upper_left"), S.CAUSAL),
    (dict(attn_mask="bool"), S.BOOL_MASK),
    (dict(attn_mask="float_bcast"), S.FLOAT_MASK | S.MASK_BROADCAST),
    (dict(attn_mask="float_grad"), S.FLOAT_MASK | S.MASK_BROADCAST | S.MASK_GRAD),
    (dict(key_lengths=torch.tensor([3, 45])), S.KEY_LENGTHS),
    (dict(query_lengths=torch.tensor([3, 37])), S.QUERY_LENGTHS),
    (dict(enable_gqa=True, gqa=True), S.GQA),
    (dict(value_dim=True), S.VALUE_HEAD_DIM),
    (dict(return_lse=True), S.RETURN_LSE),
    (dict(dropout_p=0.1), S.DROPOUT),
])
def test_the_spec_derives_each_feature(kw, features):
    kw = dict(kw)
    L, S_ = (37, 20) if kw.get("attn_mask") == "lower_right_more_queries" else (37, 45)
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2 if kw.pop("gqa", False) else 4, L=L, S=S_,
                       Ev=24 if kw.pop("value_dim", False) else None, requires_grad=False)
    masks = {"lower_right": sdpa_bias.causal_lower_right(L, S_), "upper_left": sdpa_bias.causal_upper_left(L, S_),
             "bool": torch.rand(2, 4, L, S_) > 0.5, "float_bcast": torch.randn(L, S_),
             "float_grad": torch.randn(L, S_, requires_grad=True)}
    masks["lower_right_more_queries"] = masks["lower_right"]
    if isinstance(kw.get("attn_mask"), str):
        kw["attn_mask"] = masks[kw["attn_mask"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SDPA's own warning for lower-right with L > S
        spec = effattn.make_spec(q, k, v, **kw)
    assert spec.features == features, S.feature_words(spec.features ^ features)


@pytest.mark.parametrize("L,S_", [(37, 45), (45, 45), (45, 20), (1, 30), (30, 1)])
@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
def test_sdpa_causal_mask_objects_mean_what_they_mean_in_sdpa(variant, L, S_):
    """causal_upper_left / causal_lower_right as SDPA computes them (on the CPU), served as a
    band, no mask tensor; rows that see no key (lower-right with L > S) are zeros here, where
    SDPA documents NaN, so only the rows that see a key are compared with SDPA."""
    q, k, v = make_qkv(B=2, Hq=2, L=L, S=S_, E=16, requires_grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mask = getattr(sdpa_bias, f"causal_{variant}")(L, S_)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    spec = effattn.make_spec(q, k, v, attn_mask=mask)
    assert spec.mask is None
    assert spec.band == (None, 0 if variant == "upper_left" else S_ - L)
    got = effattn.attention(q, k, v, attn_mask=mask)
    sees = torch.arange(L) + (0 if variant == "upper_left" else S_ - L) >= 0
    torch.testing.assert_close(got[:, :, sees], want[:, :, sees], atol=2e-6, rtol=1e-5)
    assert (got[:, :, ~sees] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L,S_", [(97, 150), (150, 97), (70, 70)])
def test_causal_lower_right_on_every_backend(backend, dtype, L, S_):
    """Bottom-right causal (a band with a negative side when L > S) against the oracle,
    with key lengths and GQA, forward and gradients."""
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, L=L, S=S_, E=24, dtype=dtype)
    check_against_oracle(q, k, v, backend, attn_mask=sdpa_bias.causal_lower_right(L, S_), enable_gqa=True,
                         key_lengths=torch.tensor([S_, S_ // 2]))


def test_causal_bias_of_the_wrong_size_is_an_error():
    q, k, v = make_qkv(L=37, S=45, requires_grad=False)
    with pytest.raises(ValueError, match=r"CausalBias for \(seq_len_q, seq_len_kv\) = \(40, 45\) but query and key "
                                         r"have L = 37, S = 45"):
        effattn.attention(q, k, v, attn_mask=sdpa_bias.causal_lower_right(40, 45))


class _Tagged(torch.Tensor):
    """A tensor subclass that changes what ops do (as SDPA's CausalBias does)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


def test_other_tensor_subclasses_are_refused_as_masks():
    q, k, v = make_qkv(L=8, S=10, requires_grad=False)
    tagged = torch.zeros(8, 10).as_subclass(_Tagged)
    with pytest.raises(ValueError, match=r"attn_mask of type _Tagged \(a tensor subclass\) is not supported"):
        effattn.attention(q, k, v, attn_mask=tagged)
    # a Parameter (a learned bias) is a plain tensor to the kernels: served (by the reference, for its gradient)
    bias = torch.nn.Parameter(torch.zeros(8, 10))
    with pytest.warns(UserWarning, match="falling back"):
        effattn.attention(q, k, v, attn_mask=bias).sum().backward()
    assert bias.grad is not None


def test_nested_tensors_are_refused_clearly():
    seqs = [torch.randn(5, 2, 16), torch.randn(7, 2, 16)]
    nt = torch.nested.nested_tensor(seqs, layout=torch.jagged).transpose(1, 2)
    with pytest.raises(ValueError, match=r"query is a nested tensor .*not supported yet"):
        effattn.attention(nt, nt, nt)


def test_backends_name_the_variant_that_runs():
    q, k, v = make_qkv(requires_grad=False)
    report = effattn.backends(q, k, v)
    isa = BY_NAME["cpu"].isa()[0]
    assert report.variants["cpu"] == isa and f"cpu: ok ({isa})" in str(report)
