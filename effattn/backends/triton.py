"""The Triton kernels (effattn/triton): the auto backend for CUDA tensors.

Runs on CUDA GPUs of compute capability >= 8.0 (Ampere, Ada, Hopper). Under
Triton's interpreter (TRITON_INTERPRET=1 set before effattn is imported) it
also runs on CPU tensors, slowly: that is how CI tests the kernels without a
GPU. It never takes CPU tensors in ``auto`` ahead of the C++ CPU kernel.

The variant (the ops' `variant` argument) comes from effattn.config: float32
inputs use TF32 tensor-core matmuls by default (as
``torch.backends.cuda.matmul.allow_tf32 = True`` would); ``config.triton_fp32 =
"ieee"`` (or ``set_float32_precision("ieee")``) for exact float32; and
``config.triton_tma = "1"`` the forward's tensor-descriptor (TMA) loads on
Hopper, not yet run on a GPU, so off by default; likewise the attention
statistics on CUDA tensors (``config.triton_stats = "1"``).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .. import config, spec as S
from .base import Backend

# The ops' `variant` bits for this backend (effattn/triton/ops.py reads them).
FP32_IEEE, TMA = 1, 2

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


def set_float32_precision(precision: str) -> None:
    """"tf32" (default: tensor cores, ~1e-3 relative error) or "ieee" (exact float32):
    sets effattn.config.triton_fp32."""
    if precision not in ("tf32", "ieee"):
        raise ValueError(f"effattn: float32 precision must be 'tf32' or 'ieee', got {precision!r}")
    config.triton_fp32 = precision


def get_float32_precision() -> str:
    return config.checked("triton_fp32", config.triton_fp32)


class TritonBackend(Backend):
    name = "triton"
    devices = ("cuda", "cpu") if _INTERPRET else ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    features = (S.CAUSAL | S.CAUSAL_LOWER_RIGHT | S.WINDOW | S.NEGATIVE_BAND | S.KEY_LENGTHS | S.QUERY_LENGTHS
                | S.BOOL_MASK | S.FLOAT_MASK | S.MASK_BROADCAST | S.GQA | S.VALUE_HEAD_DIM | S.RETURN_LSE
                | S.STATS)
    max_head_dim = MAX_HEAD_DIM
    min_head_dim = 1
    min_cuda_capability = 80  # the kernels' bf16 tensor-core dots and tiles assume Ampere or newer

    def unavailable_reasons(self):
        if not _TRITON_FOUND:
            return ["Triton is not installed (pip install triton)"]
        if _INTERPRETER_PROBLEM:
            return [_INTERPRETER_PROBLEM]
        if "cpu" not in self.devices and not torch.cuda.is_available():
            return ["no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"]
        return []

    def limits(self, spec):
        if spec.features & S.STATS and spec.device_type == "cuda" and \
                config.checked("triton_stats", config.triton_stats) != "1":
            return ["its attention statistics have not yet run on a GPU (tested under Triton's interpreter; "
                    "effattn.config.triton_stats = '1' or EFFATTN_TRITON_STATS=1 enables them)"]
        return []

    def variant_bits(self, spec) -> int:
        bits = FP32_IEEE if spec.q.dtype == torch.float32 and config.checked("triton_fp32", config.triton_fp32) == "ieee" else 0
        return bits | (TMA if config.checked("triton_tma", config.triton_tma) == "1" else 0)

    def variant(self, spec) -> str:
        bits = self.variant_bits(spec)
        name = ("float32 ieee" if bits & FP32_IEEE else "tf32") if spec.q.dtype == torch.float32 else ""
        tma = "tensor-descriptor loads where the tensors allow" if bits & TMA else ""
        return ", ".join(x for x in (name, tma) if x)

    def forward(self, spec):
        from ..triton import ops  # imports Triton on first use

        return ops.TRITON(spec, self.variant_bits(spec))
