"""What every backend declares: where it runs, what it serves, and how it runs."""
from __future__ import annotations

from typing import List, Tuple

import torch

from ..spec import AttentionSpec


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


class Backend:
    """A way to compute attention for an :class:`AttentionSpec`.

    Subclasses set the class attributes and implement ``forward``; the
    dispatcher calls ``unavailable_reasons`` (is it usable on this machine at
    all?) and ``not_supported_reasons`` (can it serve this call?), each a list
    of sentences, empty meaning yes. Tests are generated from these
    declarations.
    """

    name: str = ""
    devices: Tuple[str, ...] = ()
    dtypes: Tuple[torch.dtype, ...] = ()
    supports_mask_grad: bool = False
    min_cuda_capability: int = 0  # 10 * major + minor, checked for CUDA tensors (80: Ampere)
    materializes_scores: bool = False  # True only for the reference math

    def unavailable_reasons(self) -> List[str]:
        return []

    def not_supported_reasons(self, spec: AttentionSpec) -> List[str]:
        reasons = []
        if spec.device.type not in self.devices:
            reasons.append(f"runs on {'/'.join(self.devices)} tensors, not {spec.device.type}")
        if spec.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"supports dtypes {names}, not {str(spec.dtype).replace('torch.', '')}")
        if self.min_cuda_capability and spec.device.type == "cuda":
            cap = cuda_capability(spec.device.index if spec.device.index is not None else 0)
            if cap < self.min_cuda_capability:
                want = self.min_cuda_capability
                reasons.append(f"needs compute capability {want // 10}.{want % 10} or newer, "
                               f"{spec.device} has {cap // 10}.{cap % 10}")
        if spec.mask_needs_grad and not self.supports_mask_grad:
            reasons.append("does not compute the gradient of attn_mask (the mask requires grad)")
        return reasons

    def reasons(self, spec: AttentionSpec) -> List[str]:
        return self.unavailable_reasons() or self.not_supported_reasons(spec)

    def forward(self, spec: AttentionSpec) -> Tuple[torch.Tensor, torch.Tensor]:
        """Differentiable (out (B, Hq, L, Ev), lse (B, Hq, L))."""
        raise NotImplementedError
