"""Backend registry and dispatcher.

``effattn.backends()`` lists the backends and whether each is usable here;
``effattn.backends(q, k, v, **kwargs)`` says, for that call, which backends can
serve it (and the kernel variant each would run) and why each other one
cannot. (This package is callable for that.)

``auto`` picks the first backend in ``PRIORITY`` that can serve the call
(one with an ``auto_note``, e.g. sdpa_efficient, only where the note says);
the reference math comes last, with a warning, since it materialises the
(L, S) score matrix. A call no backend serves raises NotImplementedError (a
RuntimeError) with every backend's reasons.
"""
from __future__ import annotations

import sys
import types
import warnings
from typing import Dict, List

import torch

from ..spec import AttentionSpec, make_spec
from .base import Backend
from .cpu import CpuBackend
from .cuda import CudaBackend
from .reference import ReferenceBackend
from .sdpa_efficient import SdpaEfficientBackend
from .triton import TritonBackend

# Fastest first for each device. CUDA tensors: the Triton kernels measured
# faster than the CUDA C++ ones on an H100 at every size (bench/results/
# triton-gpu.md, cuda-h100.md), so CUDA C++ serves what Triton cannot (e.g.
# Triton not installed) and on request. The Triton backend takes CPU tensors
# only under Triton's interpreter, and then after the CPU kernel.
# GPUs below compute capability 8.0, which effattn's kernels do not run on, get PyTorch's
# memory-efficient kernel (sdpa_efficient; auto picks it nowhere else).
PRIORITY: List[Backend] = [CpuBackend(), TritonBackend(), CudaBackend(), SdpaEfficientBackend(), ReferenceBackend()]
BY_NAME: Dict[str, Backend] = {b.name: b for b in PRIORITY}


class BackendReport(dict):
    """name -> list of reasons it cannot serve (empty: it can); ``variants``: name ->
    the kernel variant it would run, for those that can."""

    def __init__(self, items, variants=None):
        super().__init__(items)
        self.variants = variants or {}

    def usable(self) -> List[str]:
        return [name for name, reasons in self.items() if not reasons]

    def __str__(self) -> str:
        lines = []
        for name, reasons in self.items():
            variant = self.variants.get(name)
            ok = f"ok ({variant})" if variant else "ok"
            lines.append(f"{name}: " + (ok if not reasons else "no: " + "; ".join(reasons)))
        return "\n".join(lines)


def _variant(backend: Backend, spec) -> str:
    try:
        variant = backend.variant(spec)
    except ValueError as exc:  # a configured variant that cannot run here
        variant = f"but: {exc}"
    note = backend.auto_reason(spec)
    return f"{variant}; {note}" if variant and note else (variant or note)


def report(*args, **kwargs) -> BackendReport:
    """Which backends can serve a call (or, with no arguments, exist here)."""
    if not args and not kwargs:
        return BackendReport(((b.name, b.unavailable_reasons()) for b in PRIORITY),
                             {b.name: b.auto_note for b in PRIORITY if b.auto_note})
    spec = make_spec(*args, **kwargs)
    reasons = {b.name: b.reasons(spec) for b in PRIORITY}
    return BackendReport(reasons, {b.name: _variant(b, spec) for b in PRIORITY if not reasons[b.name]})


def select(spec: AttentionSpec, backend: str = "auto") -> Backend:
    if backend != "auto":
        if backend not in BY_NAME:
            raise ValueError(f"effattn.attention: unknown backend {backend!r}; "
                             f"choose 'auto' or one of {sorted(BY_NAME)}")
        chosen = BY_NAME[backend]
        reasons = chosen.reasons(spec)
        if reasons:
            raise RuntimeError(f"effattn.attention: backend {backend!r} cannot serve this call: "
                               + "; ".join(reasons))
        return chosen
    skipped = []
    for b in PRIORITY:
        reasons = b.reasons(spec)
        passed_over = "" if reasons else b.auto_reason(spec)
        if passed_over:
            reasons = [passed_over]
        elif not reasons:
            if b.materializes_scores and skipped and not torch.compiler.is_compiling():
                # (not while compiling: the eager run of the same call has warned already,
                # and a warning would be a graph break)
                warnings.warn("effattn: no fused backend can serve this call ("
                              + " | ".join(skipped) + "); falling back to the reference math, "
                              "which materialises the (L, S) score matrix", stacklevel=3)
            return b
        skipped.append(f"{b.name}: " + "; ".join(reasons))
    raise NotImplementedError("effattn.attention: no backend can serve this call: " + " | ".join(skipped))


class _CallableModule(types.ModuleType):
    """Lets ``effattn.backends(...)`` be called while it stays a package."""

    def __call__(self, *args, **kwargs) -> BackendReport:
        return report(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
