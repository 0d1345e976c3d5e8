"""The CUDA C++ kernels (csrc/cuda): a FlashAttention-2-style forward and
recompute backward on tensor cores (mma.sync m16n8k16, compute capability 8.0+),
float16 and bfloat16, head dims up to 256, forward and backward.

The backward picks its tiles by the shared memory a block may use on the
device (csrc/cuda/kernel_traits.h, BwdConfig): Large on sm_80/sm_90 where they
fit, Small (<= 99 KB) on sm_86/sm_89 and newer consumer parts.
EFFATTN_CUDA_BWD_TILES=small forces Small (the tests use it to run both sets
on one GPU).

Hopper kernels (wgmma + TMA, csrc/cuda/flash_{fwd,bwd}_sm90_kernel.h) are
built for sm_90a and opt-in until they have been verified on a GPU:
EFFATTN_CUDA_SM90=1 for the forward, EFFATTN_CUDA_SM90_BWD=1 for the backward
("require": an error instead of the sm_80 kernel where they can't run, for
tests)."""
from __future__ import annotations

from typing import List

import torch

from .. import ops
from .base import Backend, best_cuda_capability

# Kernel tile widths; other head dims run on the next larger one (zero-padded).
HEAD_DIMS = (32, 64, 96, 128, 192, 256)


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
    forward and backward), bit 16 for the Hopper kernels; 0 without CUDA kernels."""
    return _COMPILED_VARIANTS


# The kernel head dims with Hopper kernels, forward and backward (kernel_traits.h,
# FwdConfig/BwdConfig::Sm90).
SM90_HEAD_DIMS = (64, 128)


def sm90_kernels_compiled() -> bool:
    """Whether this build holds the Hopper kernels (wgmma + TMA; built with TORCH_CUDA_ARCH_LIST
    containing 9.0a, as by default). They run on sm_90 GPUs when opted into (EFFATTN_CUDA_SM90=1
    for the forward, EFFATTN_CUDA_SM90_BWD=1 for the backward, until verified on a GPU), at the
    kernel head dims above, where TMA can describe the tensors (16-byte aligned base and
    strides); other calls take the sm_80 kernels."""
    return bool(compiled_variants() >> 16 & 1)


def kernel_head_dim(head_dim: int) -> int:
    """The kernel tile width that serves this head dim (0: none compiled)."""
    bits = compiled_variants()
    for i, d in enumerate(HEAD_DIMS):
        if d >= head_dim and bits >> i & 1:
            return d
    return 0


def _needs_backward(spec) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in (spec.q, spec.k, spec.v))


class CudaBackend(Backend):
    name = "cuda"
    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16)
    min_cuda_capability = 80  # mma.sync m16n8k16 with bf16, cp.async

    def unavailable_reasons(self) -> List[str]:
        if ops.LOAD_ERROR:
            return [ops.LOAD_ERROR]
        if compiled_variants() == 0:
            return ["effattn was built without its CUDA kernels (no CUDA toolkit at build time, "
                    "or EFFATTN_CPU_ONLY=1)"]
        if not torch.cuda.is_available():
            return ["no CUDA GPU is available"]
        if best_cuda_capability() < self.min_cuda_capability:
            return ["needs a GPU of compute capability 8.0 or newer (Ampere, Ada, Hopper)"]
        return []

    def not_supported_reasons(self, spec) -> List[str]:
        reasons = super().not_supported_reasons(spec)
        if spec.device.type != "cuda":
            return reasons
        E, Ev = spec.q.shape[-1], spec.v.shape[-1]
        need = max(E, Ev)
        if spec.dtype in self.dtypes:
            if need > HEAD_DIMS[-1]:
                reasons.append(f"supports head dims up to {HEAD_DIMS[-1]}, got {need}")
            elif kernel_head_dim(need) == 0:
                reasons.append(f"this build has no CUDA kernel for head dim {need} "
                               "(EFFATTN_CUDA_HEAD_DIMS at build time)")
        if _needs_backward(spec) and torch.are_deterministic_algorithms_enabled():
            reasons.append("its backward adds dQ with float atomics, which is not deterministic "
                           "(torch.use_deterministic_algorithms is on; the triton and cpu backends are)")
        if spec.dropout_p > 0.0:
            reasons.append("does not implement dropout")
        if spec.q.shape[0] > 65535 or spec.heads_q > 65535:
            reasons.append("supports batch and heads up to 65535 each")
        if max(spec.seqlen_q, spec.seqlen_k) >= 1 << 30:
            reasons.append("supports sequence lengths below 2**30")
        return reasons

    def forward(self, spec):
        return ops.fwd(spec)
