"""The Triton kernels (effattn/triton): the auto backend for CUDA tensors.

Runs on CUDA GPUs of compute capability >= 8.0 (Ampere, Ada, Hopper). Under
Triton's interpreter (TRITON_INTERPRET=1 set before effattn is imported) it
also runs on CPU tensors, slowly: that is how CI tests the kernels without a
GPU. It never takes CPU tensors in ``auto`` ahead of the C++ CPU kernel.

float32 inputs use TF32 tensor-core matmuls by default (as
``torch.backends.cuda.matmul.allow_tf32 = True`` would); call
``effattn.backends.triton.set_float32_precision("ieee")`` for exact float32.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .base import Backend

MAX_HEAD_DIM = 256
_TRITON_FOUND = importlib.util.find_spec("triton") is not None  # once: a constant under torch.compile
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_problem() -> str:
    """Under TRITON_INTERPRET=1: why this torch cannot launch interpreted kernels, or "".
    (torch.library.wrap_triton takes them from torch 2.13 on; 2.11 rejects them.)"""
    import triton
    from torch.library import wrap_triton

    @triton.jit
    def probe(x):
        pass

    try:
        wrap_triton(probe)
    except RuntimeError:
        return (f"Triton's interpreter (TRITON_INTERPRET=1) needs a newer torch: torch {torch.__version__}'s "
                "torch.library.wrap_triton cannot launch interpreted kernels (torch 2.13 can)")
    return ""


_INTERPRETER_PROBLEM = _interpreter_problem() if _INTERPRET and _TRITON_FOUND else ""  # once, as above
_FP32_PRECISION = "tf32"


def set_float32_precision(precision: str) -> None:
    """"tf32" (default: tensor cores, ~1e-3 relative error) or "ieee" (exact float32)."""
    global _FP32_PRECISION
    if precision not in ("tf32", "ieee"):
        raise ValueError(f"effattn: float32 precision must be 'tf32' or 'ieee', got {precision!r}")
    _FP32_PRECISION = precision


def get_float32_precision() -> str:
    return _FP32_PRECISION


class TritonBackend(Backend):
    name = "triton"
    devices = ("cuda", "cpu") if _INTERPRET else ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    min_cuda_capability = 80  # the kernels' bf16 tensor-core dots and tiles assume Ampere or newer

    def unavailable_reasons(self):
        if not _TRITON_FOUND:
            return ["Triton is not installed (pip install triton)"]
        if _INTERPRETER_PROBLEM:
            return [_INTERPRETER_PROBLEM]
        if "cpu" not in self.devices and not torch.cuda.is_available():
            return ["no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"]
        return []

    def not_supported_reasons(self, spec):
        reasons = super().not_supported_reasons(spec)
        E, Ev = spec.q.shape[-1], spec.v.shape[-1]
        if E > MAX_HEAD_DIM or Ev > MAX_HEAD_DIM:
            reasons.append(f"head dims up to {MAX_HEAD_DIM}, got query/key {E} and value {Ev}")
        if E == 0:
            reasons.append("head dim 0")
        return reasons

    def forward(self, spec):
        from ..triton import ops  # imports Triton on first use

        return ops.fwd(spec, fp32_ieee=_FP32_PRECISION == "ieee")
