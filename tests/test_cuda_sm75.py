"""The cuda backend's Turing tiles (csrc/cuda, kSm75): what it declares and which
calls auto sends there, on a pretend GPU (no tensor moves, nothing launches),
so these run on any machine. The spec reports cuda:0, the driver answers with
the compute capability the test sets, and the build's compiled variants are
set as a build with (or without) the Turing tiles reports them.

The kernels themselves run only on a GPU: tests/test_cuda.py, which
csrc/cuda/dev/gpu_check.sh also runs on the H200 with a compute_75-PTX-only
build and EFFATTN_CUDA_SM75=force. Whether a build holds them is checked by
test_the_build_holds_what_it_was_asked_for.
"""
from __future__ import annotations

import os
import types

import pytest
import torch

import effattn
from conftest import make_qkv
from effattn import spec as S
from effattn.backends import BY_NAME, select
from effattn.backends import cuda as cuda_mod

BACKEND = BY_NAME["cuda"]
ALL_HEAD_DIMS = (1 << len(cuda_mod.HEAD_DIMS)) - 1
WITH_SM75 = ALL_HEAD_DIMS | 1 << 17
WITHOUT_SM75 = ALL_HEAD_DIMS


@pytest.fixture
def pretend_gpu(monkeypatch):
    """cuda:0 of the compute capability the test sets, and a build with the Turing tiles."""
    if effattn.ops.LOAD_ERROR:
        pytest.skip(f"effattn._C does not load: {effattn.ops.LOAD_ERROR}")
    state = {"cc": 75}
    monkeypatch.setattr(S.AttentionSpec, "device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(S.AttentionSpec, "device_type", property(lambda self: "cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: divmod(state["cc"], 10))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: types.SimpleNamespace(
        major=state["cc"] // 10, minor=state["cc"] % 10, shared_memory_per_block_optin=65536))
    monkeypatch.setattr(cuda_mod, "_large_bwd_tiles_fit", lambda index, dim: False)
    monkeypatch.setattr(cuda_mod, "_COMPILED_VARIANTS", WITH_SM75)
    return state


def spec_for(dtype=torch.float16, E=64, **kw):
    q, k, v = make_qkv(B=2, Hq=2, L=33, S=40, E=E, dtype=dtype, requires_grad=True)
    return effattn.make_spec(q, k, v, **kw)


def test_serves_float16_up_to_head_dim_128_on_turing(pretend_gpu):
    for E in (32, 40, 64, 96, 128):
        spec = spec_for(E=E, is_causal=True, key_lengths=torch.tensor([40, 7]))
        assert BACKEND.reasons(spec) == [], E
        assert BACKEND.variant_bits(spec) == cuda_mod.SM75
        assert "Turing" in BACKEND.variant(spec)


def test_refuses_bfloat16_and_wide_heads_on_turing_in_words(pretend_gpu):
    reasons = BACKEND.reasons(spec_for(dtype=torch.bfloat16))
    assert reasons == ["on the Turing tiles supports float16 only (compute capability 7.5 has no bfloat16 "
                       "tensor cores)"]
    reasons = BACKEND.reasons(spec_for(E=160))
    assert reasons == ["on the Turing tiles supports head dims up to 128 (64 KB of shared memory per block), "
                       "got 160"]


def test_auto_takes_the_turing_tiles_on_7_5_and_sdpa_efficient_below(pretend_gpu):
    assert select(spec_for(), "auto").name == "cuda"  # triton needs 8.0
    # bfloat16 there: the cuda backend refuses it, PyTorch's memory-efficient kernel serves it
    # (SDPA itself refuses bfloat16 below 8.0 too: sdpa_efficient's limits say so).
    pretend_gpu["cc"] = 61
    spec = spec_for()
    assert BACKEND.reasons(spec) == ["needs a GPU of compute capability 7.5 or newer (Turing, Ampere, Ada, "
                                     "Hopper); below that, auto takes sdpa_efficient"]
    assert select(spec, "auto").name == "sdpa_efficient"


def test_a_build_without_them_leaves_turing_to_sdpa_efficient(pretend_gpu, monkeypatch):
    monkeypatch.setattr(cuda_mod, "_COMPILED_VARIANTS", WITHOUT_SM75)
    spec = spec_for()
    assert BACKEND.min_cuda_capability == 80
    assert BACKEND.reasons(spec) == ["needs a GPU of compute capability 8.0 or newer (Ampere, Ada, Hopper; 7.5 "
                                     "in builds with the unverified Turing tiles); below that, auto takes "
                                     "sdpa_efficient"]
    assert select(spec, "auto").name == "sdpa_efficient"


def test_newer_gpus_take_them_only_when_forced(pretend_gpu, monkeypatch):
    pretend_gpu["cc"] = 90
    spec = spec_for(dtype=torch.bfloat16, E=256)
    assert BACKEND.reasons(spec) == [] and not BACKEND.variant_bits(spec) & cuda_mod.SM75
    monkeypatch.setattr(effattn.config, "cuda_sm75", "force")  # gpu_check.sh's compute_75 PTX run
    assert BACKEND.variant_bits(spec_for()) == cuda_mod.SM75
    assert len(BACKEND.reasons(spec)) == 2  # and then the Turing tiles' limits hold
    monkeypatch.setattr(effattn.config, "cuda_sm75", "always")
    with pytest.raises(ValueError, match="cuda_sm75"):
        BACKEND.variant_bits(spec_for())


def _asked_for_turing() -> bool:
    archs = [a.split("+")[0] for a in os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(" ", ";").split(";")]
    return os.environ.get("EFFATTN_UNVERIFIED") == "1" and "7.5" in archs


@pytest.mark.skipif(cuda_mod.compiled_variants() == 0, reason="effattn was built without its CUDA kernels")
def test_the_build_holds_what_it_was_asked_for():
    # .ci/run builds with EFFATTN_UNVERIFIED=1 and 7.5 in TORCH_CUDA_ARCH_LIST and runs the tests
    # in that environment: the build must then report the Turing tiles (and not otherwise,
    # when the environment describes the build).
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        pytest.skip("TORCH_CUDA_ARCH_LIST is not set: the environment does not say what was built")
    assert cuda_mod.sm75_kernels_compiled() == _asked_for_turing()
