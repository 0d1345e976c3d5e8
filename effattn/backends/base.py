"""What every backend declares, as an allow-list, and how a declaration becomes reasons.

A backend lists what it serves (in the style of xformers' operator classes):
devices, dtypes, head dims, compute capability, the spec's FEATURES
(effattn/spec.py), and whether its backward is deterministic. The base class
turns the declaration into ``not_supported_reasons(spec)``: every feature a
call needs that the backend does not list is refused, in the feature's words.
Nothing undeclared is ever silently ignored.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from ..spec import AttentionSpec, feature_words


# Machine facts that backends read while deciding, made constants for torch.compile:
# the dispatcher runs inside compiled code, and a query of the driver there would be
# a graph break. (torch.cuda.is_available is already a constant to the compiler.)
@torch.compiler.assume_constant_result
def cuda_capability(index: int) -> int:
    """Compute capability of CUDA device ``index`` as 10 * major + minor (e.g. 90)."""
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


@torch.compiler.assume_constant_result
def best_cuda_capability() -> int:
    """The highest compute capability among the CUDA devices (0: none)."""
    if not torch.cuda.is_available():
        return 0
    return max(cuda_capability(i) for i in range(torch.cuda.device_count()))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class Backend:
    """A way to compute attention for an :class:`AttentionSpec`.

    Subclasses set the class attributes (the declaration) and implement
    ``forward``; they may add ``limits`` (reasons beyond the declaration, e.g.
    a grid size), ``variant`` (the name of the kernel variant a call runs) and
    ``auto_reason`` (why ``auto`` passes over a call it could serve).
    The dispatcher calls ``reasons(spec)``: ``unavailable_reasons`` (usable
    on this machine at all?) or else ``not_supported_reasons`` (can it serve
    this call?), each a list of sentences, empty meaning yes. The test matrix
    is generated from these declarations.
    """

    name: str = ""
    devices: Tuple[str, ...] = ()
    dtypes: Tuple[torch.dtype, ...] = ()
    features: int = 0  # the spec's FEATURES bits this backend serves; any other is refused
    max_head_dim: int = 0  # 0: any
    min_head_dim: int = 0  # smallest head dim E served
    min_cuda_capability: int = 0  # 10 * major + minor, checked for CUDA tensors (80: Ampere)
    deterministic_backward: bool = True  # False: declined under torch.use_deterministic_algorithms
    materializes_scores: bool = False  # True only for the reference math

    def unavailable_reasons(self) -> List[str]:
        return []

    def limits(self, spec: AttentionSpec) -> List[str]:
        """Reasons beyond the declaration (sizes a kernel's grid cannot hold, ...)."""
        return []

    def variant(self, spec: AttentionSpec) -> str:
        """The kernel variant that serves ``spec`` (shown by effattn.backends), or ""."""
        return ""

    auto_note: str = ""  # where auto picks this backend, when not wherever it can serve (effattn.backends())

    def auto_reason(self, spec: AttentionSpec) -> str:
        """Why ``auto`` passes over this backend for a call it can serve ("": it does not);
        such a backend runs when asked for by name."""
        return ""

    def not_supported_reasons(self, spec: AttentionSpec) -> List[str]:
        reasons = []
        device = spec.device_type
        if device not in self.devices:
            reasons.append(f"runs on {'/'.join(self.devices)} tensors, not {device}")
        dtype = spec.dtype
        if dtype not in self.dtypes:
            names = ", ".join(_dtype_name(d) for d in self.dtypes)
            reasons.append(f"supports dtypes {names}, not {_dtype_name(dtype)}")
        missing = spec.features & ~self.features
        if missing:
            reasons += [f"does not support {words}" for words in feature_words(missing)]
        if self.max_head_dim or self.min_head_dim:
            E, Ev = spec.q.shape[3], spec.v.shape[3]
            if self.max_head_dim and max(E, Ev) > self.max_head_dim:
                reasons.append(f"supports head dims up to {self.max_head_dim}, got query/key {E} and value {Ev}")
            if E < self.min_head_dim:
                reasons.append(f"supports head dims from {self.min_head_dim}, got {E}")
        if self.min_cuda_capability and device == "cuda":
            index = spec.device.index
            cap = cuda_capability(index if index is not None else 0)
            if cap < self.min_cuda_capability:
                want = self.min_cuda_capability
                reasons.append(f"needs compute capability {want // 10}.{want % 10} or newer, "
                               f"{spec.device} has {cap // 10}.{cap % 10}")
        if not self.deterministic_backward and torch.are_deterministic_algorithms_enabled() \
                and spec.needs_backward():
            reasons.append("its backward is not deterministic (torch.use_deterministic_algorithms is on)")
        if not reasons:
            reasons = self.limits(spec)
        return reasons

    def reasons(self, spec: AttentionSpec) -> List[str]:
        return self.unavailable_reasons() or self.not_supported_reasons(spec)

    def forward(self, spec: AttentionSpec) -> Tuple[torch.Tensor, ...]:
        """Differentiable (out (B, Hq, L, Ev), lse (B, Hq, L)); and, when the spec asks for
        them (STATS, declared by the backend), stats (2, B, Hq, L): the entropy and the
        largest weight of each query row's attention weights, without gradient."""
        raise NotImplementedError
