"""The CUDA C++ kernels (csrc/cuda): a FlashAttention-2-style forward and
recompute backward on tensor cores (mma.sync m16n8k16, compute capability 8.0+),
float16 and bfloat16, head dims up to 256, forward and backward. Builds with
the Turing tiles (EFFATTN_UNVERIFIED=1, 7.5 in the arch list: not yet run on a
GPU) also serve compute capability 7.5, float16 at head dims up to 128.

The variant (the ops' `variant` argument, csrc/cuda/api.h's Variant bits) is
chosen here, once per call, from effattn.config and the device:

* the backward's sm_80 tile set: Large where its shared memory fits what a
  block may opt into on the device (sm_80, sm_90), Small (<= 99 KB) otherwise
  (sm_86, sm_89); ``config.cuda_bwd_tiles`` = "large" / "small" forces one;
* the Hopper kernels (wgmma + TMA, csrc/cuda/flash_{fwd,bwd}_sm90_kernel.h),
  in builds that hold them (EFFATTN_UNVERIFIED=1) and only when asked
  (``config.cuda_sm90`` / ``cuda_sm90_bwd`` = "1", or "require" to make a call
  they cannot take an error): they have not run on a GPU yet;
* the Turing tiles (kSm75: <= 64 KB of shared memory, csrc/cuda/ptx.h's sm_75
  lowering in their sm_75 code) on GPUs below 8.0, in builds that hold them;
  ``config.cuda_sm75`` = "force" takes them on every GPU (gpu_check.sh runs a
  compute_75-PTX-only build that way on the H200).
"""
from __future__ import annotations

import functools
from typing import List

import torch

from .. import build_facts, config, ops, spec as S
from .base import Backend, best_cuda_capability, cuda_capability

HEAD_DIMS = build_facts.CUDA_HEAD_DIMS  # kernel tile widths; other head dims run on the next larger one
SM90_HEAD_DIMS = build_facts.CUDA_SM90_HEAD_DIMS

# csrc/cuda/api.h, Variant
SM90_FWD, SM90_BWD, SM90_REQUIRE, BWD_TILES_LARGE, SM75 = 1, 2, 4, 8, 16
SM75_MAX_HEAD_DIM = 128  # csrc/cuda/kernel_traits.h: no Turing tiles for 192 and 256


def _read_compiled_variants() -> int:
    if ops.LOAD_ERROR:
        return 0
    try:
        return int(torch.ops.effattn.cuda_variants())
    except (AttributeError, RuntimeError):  # an older build without the op
        return 0


_COMPILED_VARIANTS = _read_compiled_variants()  # read once: a constant, also under torch.compile


def compiled_variants() -> int:
    """effattn::cuda_variants (csrc/cuda/api.h): bit i for HEAD_DIMS[i] compiled (both dtypes,
    forward and backward), bit 16 for the Hopper kernels, bit 17 for the Turing tiles; 0
    without CUDA kernels."""
    return _COMPILED_VARIANTS


def sm90_kernels_compiled() -> bool:
    """Whether this build holds the Hopper kernels (EFFATTN_UNVERIFIED=1 with 9.0a in the arch list)."""
    return bool(compiled_variants() >> 16 & 1)


def sm75_kernels_compiled() -> bool:
    """Whether this build holds the Turing tiles (EFFATTN_UNVERIFIED=1 with 7.5 in the arch list)."""
    return bool(compiled_variants() >> 17 & 1)


def kernel_head_dim(head_dim: int) -> int:
    """The kernel tile width that serves this head dim (0: none compiled)."""
    bits = compiled_variants()
    for i, d in enumerate(HEAD_DIMS):
        if d >= head_dim and bits >> i & 1:
            return d
    return 0


@torch.compiler.assume_constant_result
@functools.lru_cache(maxsize=None)
def _large_bwd_tiles_fit(index: int, kernel_dim: int) -> bool:
    """Whether the Large backward tiles at this kernel head dim fit a block on device ``index``."""
    optin = torch.cuda.get_device_properties(index).shared_memory_per_block_optin
    return int(torch.ops.effattn.cuda_bwd_large_smem(kernel_dim)) <= optin


class CudaBackend(Backend):
    name = "cuda"
    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16)
    # No NEGATIVE_BAND: the kernels read a negative band side as unbounded (block_utils.h).
    features = (S.CAUSAL | S.CAUSAL_LOWER_RIGHT | S.WINDOW | S.KEY_LENGTHS | S.QUERY_LENGTHS | S.BOOL_MASK
                | S.FLOAT_MASK | S.MASK_BROADCAST | S.GQA | S.VALUE_HEAD_DIM | S.RETURN_LSE)
    max_head_dim = HEAD_DIMS[-1]
    deterministic_backward = False  # dQ is accumulated with float atomics

    @property
    def min_cuda_capability(self) -> int:
        # mma.sync m16n8k16 with bf16, cp.async; the Turing tiles lower them to sm_75's PTX (ptx.h)
        return 75 if sm75_kernels_compiled() else 80

    @staticmethod
    def _turing(spec) -> bool:
        """Whether the call takes the Turing tiles (kSm75)."""
        if not sm75_kernels_compiled():
            return False
        index = spec.device.index if spec.device.index is not None else 0
        return config.checked("cuda_sm75", config.cuda_sm75) == "force" or cuda_capability(index) < 80

    def unavailable_reasons(self) -> List[str]:
        if ops.LOAD_ERROR:
            return [ops.LOAD_ERROR]
        if compiled_variants() == 0:
            return ["effattn was built without its CUDA kernels (no CUDA toolkit at build time, "
                    "or EFFATTN_CPU_ONLY=1)"]
        if not torch.cuda.is_available():
            return ["no CUDA GPU is available"]
        if best_cuda_capability() < self.min_cuda_capability:
            which = ("8.0 or newer (Ampere, Ada, Hopper; 7.5 in builds with the unverified Turing tiles)"
                     if self.min_cuda_capability == 80 else "7.5 or newer (Turing, Ampere, Ada, Hopper)")
            return [f"needs a GPU of compute capability {which}; below that, auto takes sdpa_efficient"]
        return []

    def limits(self, spec) -> List[str]:
        reasons = []
        need = max(spec.head_dim, spec.head_dim_v)
        if kernel_head_dim(need) == 0:
            reasons.append(f"this build has no CUDA kernel for head dim {need} "
                           "(EFFATTN_CUDA_HEAD_DIMS at build time)")
        if spec.q.shape[0] > 65535 or spec.heads_q > 65535:
            reasons.append("supports batch and heads up to 65535 each")
        if max(spec.seqlen_q, spec.seqlen_k) >= 1 << 30:
            reasons.append("supports sequence lengths below 2**30")
        if self._turing(spec):
            if spec.dtype != torch.float16:
                reasons.append("on the Turing tiles supports float16 only (compute capability 7.5 has no "
                               "bfloat16 tensor cores)")
            if need > SM75_MAX_HEAD_DIM:
                reasons.append(f"on the Turing tiles supports head dims up to {SM75_MAX_HEAD_DIM} (64 KB of "
                               f"shared memory per block), got {need}")
        return reasons

    def variant_bits(self, spec) -> int:
        if self._turing(spec):
            return SM75
        dim = kernel_head_dim(max(spec.head_dim, spec.head_dim_v))
        index = spec.device.index if spec.device.index is not None else 0
        tiles = config.checked("cuda_bwd_tiles", config.cuda_bwd_tiles)
        large = tiles == "large" or (tiles == "auto" and _large_bwd_tiles_fit(index, dim))
        bits = BWD_TILES_LARGE if large else 0
        if sm90_kernels_compiled() and dim in SM90_HEAD_DIMS and cuda_capability(index) == 90:
            fwd = config.checked("cuda_sm90", config.cuda_sm90)
            bwd = config.checked("cuda_sm90_bwd", config.cuda_sm90_bwd)
            bits |= (SM90_FWD if fwd != "0" else 0) | (SM90_BWD if bwd != "0" else 0)
            bits |= SM90_REQUIRE if "require" in (fwd, bwd) else 0
        return bits

    def variant(self, spec) -> str:
        bits = self.variant_bits(spec)
        if bits & SM75:
            return "sm75 (Turing tiles, unverified), forward and backward"
        fwd = "sm90 (Hopper) where TMA can take the tensors" if bits & SM90_FWD else "sm80"
        bwd = "sm90 (Hopper)" if bits & SM90_BWD else ("sm80, large tiles" if bits & BWD_TILES_LARGE
                                                       else "sm80, small tiles")
        return f"forward {fwd}, backward {bwd}"

    def forward(self, spec):
        return ops.CPP(spec, self.variant_bits(spec))
