"""The sdpa_efficient backend (effattn/backends/sdpa_efficient.py): PyTorch's memory-efficient
kernel for GPUs below compute capability 8.0. Its argument mapping runs on CPU tensors over
SDPA's CPU flash kernel and goes through the whole test matrix against the float64 reference
(tests/test_attention.py, the ``sdpa_efficient-cpu`` cases); here: what only it does. Its
GPU run (the memory-efficient kernel itself) is not tested without a GPU."""
import pytest
import torch
import torch.nn.attention.bias as sdpa_bias

import effattn
from effattn import spec as S
from effattn.backends import BY_NAME, select
from effattn.backends import sdpa_efficient as module
from conftest import check_against_oracle, largest_allocation, make_qkv

BACKEND = BY_NAME["sdpa_efficient"]


@pytest.fixture
def pretend_gpu(monkeypatch):
    """The spec reports cuda:0, whose compute capability is what the test sets (no tensor moves)."""
    capability = {"cc": 75}
    monkeypatch.setattr(S.AttentionSpec, "device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(S.AttentionSpec, "device_type", property(lambda self: "cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: divmod(capability["cc"], 10))
    return capability


@pytest.mark.parametrize("cc", [50, 61, 70, 75])
def test_auto_picks_it_below_compute_capability_8(pretend_gpu, cc):
    pretend_gpu["cc"] = cc
    q, k, v = make_qkv(dtype=torch.float16, requires_grad=False)
    spec = effattn.make_spec(q, k, v, is_causal=True, key_lengths=torch.tensor([45, 3]))
    assert BACKEND.reasons(spec) == [] and BACKEND.auto_reason(spec) == ""
    assert select(spec, "auto").name == "sdpa_efficient"


def test_auto_passes_it_over_from_compute_capability_8(pretend_gpu, monkeypatch):
    pretend_gpu["cc"] = 80
    q, k, v = make_qkv(dtype=torch.float16, requires_grad=False)
    spec = effattn.make_spec(q, k, v)
    assert BACKEND.reasons(spec) == []  # it could, when asked for by name
    assert "auto picks it only on CUDA GPUs below compute capability 8.0" in BACKEND.auto_reason(spec)
    monkeypatch.setattr(BY_NAME["triton"], "devices", ())  # (the interpreted Triton kernels would serve)
    with pytest.warns(UserWarning, match="sdpa_efficient: auto picks it only on CUDA GPUs below"):
        assert select(spec, "auto").name == "reference"  # (no GPU kernels here to pick instead)


def test_cpu_calls_go_to_the_cpu_kernel_and_to_sdpa_efficient_only_by_name():
    q, k, v = make_qkv(requires_grad=False)
    spec = effattn.make_spec(q, k, v)
    assert select(spec, "auto").name == "cpu"
    assert select(spec, "sdpa_efficient").name == "sdpa_efficient"
    assert "SDPBackend.FLASH_ATTENTION" in effattn.backends(q, k, v).variants["sdpa_efficient"]


def test_refusals_in_words(pretend_gpu):
    q, k, v = make_qkv(dtype=torch.bfloat16, requires_grad=False)
    reasons = BACKEND.reasons(effattn.make_spec(q, k, v))
    assert reasons == ["bfloat16 in PyTorch's memory-efficient kernel needs compute capability 8.0, "
                       "cuda:0 has 7.5"]
    pretend_gpu["cc"] = 80
    assert BACKEND.reasons(effattn.make_spec(q, k, v)) == []
    q, k, v = make_qkv(requires_grad=False)
    for kw, words in ((dict(window=(4, 0)), "does not support a local window"),
                      (dict(return_lse=True), "does not support returning the log-sum-exp"),
                      (dict(attn_mask=torch.zeros(37, 45), is_causal=True), "causal masking together with attn_mask"),
                      (dict(attn_mask=torch.zeros(37, 45, requires_grad=True)), "the gradient of attn_mask"),
                      (dict(attn_mask=torch.zeros(37, 45), key_lengths=torch.tensor([3, 45])),
                       "key_lengths with an attn_mask shared by the batch")):
        assert any(words in r for r in BACKEND.reasons(effattn.make_spec(q, k, v, **kw))), (kw, words)
    q64 = q.double()
    assert "not float64" in "; ".join(BACKEND.reasons(effattn.make_spec(q64, q64, q64)))


def test_never_the_math_kernel(monkeypatch):
    """The SDPA call runs with only the fused kernel enabled: pinned, SDPA raises rather than
    fall back to its math (which builds the (L, S) matrix)."""
    seen = []
    real = module.F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()))
        return real(*args, **kwargs)

    monkeypatch.setattr(module.F, "scaled_dot_product_attention", spy)
    q, k, v = make_qkv(requires_grad=False)
    effattn.attention(q, k, v, backend="sdpa_efficient", key_lengths=torch.tensor([45, 3]))
    assert seen == [(False, True)]  # (CPU tensors: SDPA's CPU flash kernel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_causal_with_lengths_takes_each_row_from_the_call_that_serves_it(dtype):
    """Causal (top-left and bottom-right) with key and query lengths: two SDPA calls, no (L, S) mask."""
    for L, S_, mask in ((50, 50, None), (40, 70, sdpa_bias.causal_lower_right(40, 70)),
                        (70, 40, None)):
        q, k, v = make_qkv(B=3, Hq=2, L=L, S=S_, E=24, dtype=dtype)
        kw = dict(key_lengths=torch.tensor([S_, 9, 0]), query_lengths=torch.tensor([L, 30, 5]))
        kw.update(dict(attn_mask=mask) if mask is not None else dict(is_causal=True))
        check_against_oracle(q, k, v, "sdpa_efficient", **kw)


def test_no_allocation_of_size_L_by_S():
    L = S_ = 2048
    q, k, v = make_qkv(B=1, Hq=2, L=L, S=S_, E=32, requires_grad=False)
    mask = (torch.arange(S_) < 1000).view(1, 1, 1, S_)
    kw = dict(attn_mask=mask, key_lengths=torch.tensor([900]), query_lengths=torch.tensor([1000]))
    largest = largest_allocation(lambda: effattn.attention(q, k, v, backend="sdpa_efficient", **kw))
    assert largest < L * S_ * 4 // 8, largest  # (SDPA's CPU flash kernel's own buffers: about 1 MiB)


def test_compiles_fullgraph():
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, L=33, S=40, E=20, requires_grad=False)
    kw = dict(key_lengths=torch.tensor([40, 7]), query_lengths=torch.tensor([33, 20]), enable_gqa=True)

    def f(q, k, v):
        return effattn.attention(q, k, v, backend="sdpa_efficient", **kw)

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v))
