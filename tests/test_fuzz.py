"""Property-based fuzzing of effattn.attention over its whole option space, against the float64
reference, forward and gradients (hypothesis): shapes with 0, 1, odd sizes and sizes past a
tile; layouts and strides (the (B, L, H, E) transpose, padded rows, broadcast key/value batch);
every dtype; bool and float masks in several broadcasts; key and query lengths; windows; causal
top-left and bottom-right; GQA; the scale; the LSE; the attention statistics.

Every draw is one call checked with conftest.check_against_oracle (the project's error bound).
The spec's own feature list is the check that nothing is left out: a feature in spec.FEATURES
that the fuzzer cannot draw fails test_the_fuzzer_draws_every_feature.

Budget: EFFATTN_FUZZ_EXAMPLES draws for the cpu backend (default 2000, about a minute on two
cores; a third of it for the baseline variant), a 25th of it for triton under the interpreter; a long run is e.g.
EFFATTN_FUZZ_EXAMPLES=5000. The draws are derandomised (the same cases every run, so CI is
repeatable); EFFATTN_FUZZ_SEED=N draws another set. A failure shrinks to a minimal case, which
hypothesis prints with the line that reproduces it.
"""
import os

import pytest
import torch
import torch.nn.attention.bias as sdpa_bias

import effattn
from conftest import BackendCase, _mask64, check_against_oracle, cpu_isa_runs_here, on_device, oracle_stats
from effattn import spec as S
from effattn.backends import BY_NAME
from effattn import reference

hypothesis = pytest.importorskip("hypothesis", reason="the fuzzer needs hypothesis (pip install hypothesis)")
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("EFFATTN_FUZZ_EXAMPLES", "2000"))
SEED = int(os.environ.get("EFFATTN_FUZZ_SEED", "0"))
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# What the fuzzer draws, by the spec's feature bits (DROPOUT: no backend serves it yet; MASK_GRAD:
# only the reference, which is the oracle itself).
DRAWN = (S.CAUSAL | S.CAUSAL_LOWER_RIGHT | S.WINDOW | S.NEGATIVE_BAND | S.KEY_LENGTHS | S.QUERY_LENGTHS
         | S.BOOL_MASK | S.FLOAT_MASK | S.MASK_BROADCAST | S.GQA | S.VALUE_HEAD_DIM | S.RETURN_LSE | S.STATS)
NOT_DRAWN = S.DROPOUT | S.MASK_GRAD


def test_the_fuzzer_draws_every_feature():
    assert DRAWN | NOT_DRAWN == S.ALL_FEATURES, S.feature_words(S.ALL_FEATURES & ~(DRAWN | NOT_DRAWN))


def _tensor(shape, layout, dtype, g):
    """A (B, H, N, D) tensor in a layout: contiguous, the (B, N, H, D) transpose, or rows padded."""
    B, H, N, D = shape
    if layout == "blhe":
        t = torch.randn(B, N, H, D, generator=g).transpose(1, 2)
    elif layout == "padded":
        t = torch.randn(B, H, N, D + 3, generator=g)[..., 1:D + 1]
    else:
        t = torch.randn(B, H, N, D, generator=g)
    return t.to(dtype)


@st.composite
def calls(draw, small=False, dtypes=tuple(DTYPES)):
    """(q, k, v, kwargs, stats) of one call."""
    # (hypothesis takes a list's first entries for its simplest draws, and shrinks towards them)
    sizes = [16, 7, 33, 1, 97, 130, 2, 0] if not small else [16, 7, 1, 33, 2, 0]
    dtype = draw(st.sampled_from(dtypes))
    B = draw(st.sampled_from([2, 1, 3, 2, 1, 3, 0]))
    Hkv = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 1, 3]))
    L, S_ = draw(st.sampled_from(sizes)), draw(st.sampled_from(sizes))
    E = draw(st.sampled_from([16, 8, 40, 72, 1]))
    Ev = E if draw(st.booleans()) else draw(st.sampled_from([4, 16, 24]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    layouts = [draw(st.sampled_from(["bhle", "blhe", "padded"])) for _ in range(3)]
    q = _tensor((B, Hkv * group, L, E), layouts[0], dtype, g)
    kv_batch = 1 if B > 1 and draw(st.integers(0, 4)) == 4 else B  # key/value broadcast over the batch
    k = _tensor((kv_batch, Hkv, S_, E), layouts[1], dtype, g)
    v = _tensor((kv_batch, Hkv, S_, Ev), layouts[2], dtype, g)
    kw = {}
    if group > 1:
        kw["enable_gqa"] = True
    structure = draw(st.sampled_from(["causal", "none", "lower_right", "window", "upper_left", "causal+window"]))
    if structure in ("causal", "causal+window"):
        kw["is_causal"] = True
    if structure == "lower_right":
        kw["attn_mask"] = sdpa_bias.causal_lower_right(L, S_)
    elif structure == "upper_left":
        kw["attn_mask"] = sdpa_bias.causal_upper_left(L, S_)
    if structure in ("window", "causal+window"):
        kw["window"] = (draw(st.sampled_from([5, None, 0, 1, 40])), draw(st.sampled_from([3, None, 0, 40])))
    if "attn_mask" not in kw:
        mask = draw(st.sampled_from(["bool", "float", "none", "float32"]))
        if mask != "none":
            shape = draw(st.sampled_from([(B, 1, 1, S_), (B, Hkv * group, L, S_), (1, 1, L, S_), (L, S_), (S_,)]))
            if mask == "bool":
                kw["attn_mask"] = torch.rand(shape, generator=g) > draw(st.sampled_from([0.2, 0.7, 0.97]))
            else:
                m = torch.randn(shape, generator=g) * 2
                kw["attn_mask"] = m if mask == "float32" else m.to(dtype)
    if B and draw(st.booleans()):
        kw["key_lengths"] = torch.randint(0, S_ + 1, (B,), generator=g)
    if B and draw(st.integers(0, 2)) == 2:
        kw["query_lengths"] = torch.randint(0, L + 1, (B,), generator=g)
    if draw(st.integers(0, 3)) == 3:
        kw["scale"] = draw(st.sampled_from([0.05, 0.5, 2.0]))
    kw["return_lse"] = draw(st.booleans())
    stats = draw(st.integers(0, 3)) == 3
    return q, k, v, kw, stats


def _check(backend, case):
    q, k, v, kw, stats = case
    features = effattn.make_spec(q, k, v, return_stats=stats, **kw).features
    hypothesis.note(f"features: {S.feature_words(features)}")
    reasons = effattn.backends(q, k, v, **kw)[str(backend)] if not stats else []
    hypothesis.assume(not reasons)  # (a call the backend declares it cannot serve: drawn again)
    if stats:
        _check_stats(backend, q, k, v, kw)
        return
    lse = kw.pop("return_lse")
    check_against_oracle(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), backend, **kw)
    if lse:
        _check_lse(backend, q, k, v, kw)


def _check_lse(backend, q, k, v, kw):
    device = backend.device
    _, lse = effattn.attention(*on_device(device, q.detach(), k.detach(), v.detach()), backend=str(backend),
                               return_lse=True, **{n: on_device(device, x) for n, x in kw.items()})
    _, want = reference.attention(*(t.detach().double() for t in (q, k, v)), compute_dtype=torch.float64,
                                  return_lse=True, **_mask64(kw))
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(lse.cpu()), finite), "lse: -inf rows differ"
    tol = 1e-9 if q.dtype == torch.float64 else 2e-3
    torch.testing.assert_close(lse.cpu().double()[finite], want[finite], rtol=tol, atol=tol)


def _check_stats(backend, q, k, v, kw):
    kw = dict(kw)
    kw.pop("return_lse")
    device = backend.device
    stats = effattn.diagnostics.attention_stats(*on_device(device, q, k, v), backend=str(backend),
                                                **{n: on_device(device, x) for n, x in kw.items()})
    entropy, max_weight = oracle_stats(q, k, v, **kw)
    tol = 1e-9 if q.dtype == torch.float64 else 1e-4  # (bf16 / fp16: the same rounded inputs, float32 math)
    torch.testing.assert_close(stats.entropy.cpu().double(), entropy, rtol=tol, atol=tol)
    torch.testing.assert_close(stats.max_weight.cpu().double(), max_weight, rtol=tol, atol=tol)


def _fuzz(backend, examples, small, dtypes=tuple(DTYPES)):
    @seed(SEED)
    @settings(max_examples=examples, deadline=None, derandomize=SEED == 0, print_blob=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(calls(small=small, dtypes=dtypes))
    def run(case):
        _check(backend, case)

    run()


@pytest.mark.parametrize("isa", ["auto", "baseline"])
def test_fuzz_cpu(isa, monkeypatch):
    """The cpu backend, its default (widest) variant and the portable baseline."""
    if isa != "auto":
        runs, reason = cpu_isa_runs_here(isa)
        if not runs:
            pytest.skip(reason)
    monkeypatch.setattr(effattn.config, "cpu_isa", isa)
    if BY_NAME["cpu"].unavailable_reasons():
        pytest.skip("; ".join(BY_NAME["cpu"].unavailable_reasons()))
    _fuzz(BackendCase("cpu", "cpu"), EXAMPLES if isa == "auto" else max(1, EXAMPLES // 3), small=False)


def test_fuzz_triton_interpreted():
    """The Triton kernels under the interpreter (on the CPU): fewer, smaller draws."""
    reasons = BY_NAME["triton"].unavailable_reasons()
    if reasons or "cpu" not in BY_NAME["triton"].devices:
        pytest.skip("; ".join(reasons) or "the Triton interpreter is off (TRITON_INTERPRET=1 runs it on the CPU)")
    from effattn.backends import triton as triton_backend
    saved = triton_backend.get_float32_precision()
    triton_backend.set_float32_precision("ieee")
    try:
        _fuzz(BackendCase("triton", "cpu"), max(1, EXAMPLES // 25), small=True,
              dtypes=(torch.float32, torch.bfloat16, torch.float16))
    finally:
        triton_backend.set_float32_precision(saved)
