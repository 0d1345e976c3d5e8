"""The reference math as a backend: serves every call, materialises (B, H, L, S)."""
from __future__ import annotations

from .. import reference
from ..spec import SUPPORTED_DTYPES
from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"
    devices = ("cpu", "cuda", "xpu", "mps", "meta")
    dtypes = SUPPORTED_DTYPES
    supports_mask_grad = True
    materializes_scores = True

    def forward(self, spec):
        return reference.reference_forward(spec)
