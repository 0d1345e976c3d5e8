"""The C++ CPU kernel (csrc/cpu): tiled online-softmax forward, recompute backward."""
from __future__ import annotations

import torch

from .. import ops
from .base import Backend


class CpuBackend(Backend):
    name = "cpu"
    devices = ("cpu",)
    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

    def unavailable_reasons(self):
        return [ops.LOAD_ERROR] if ops.LOAD_ERROR else []

    def forward(self, spec):
        return ops.fwd(spec)
