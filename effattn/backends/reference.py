"""The reference math as a backend: serves every call it declares, materialises (B, H, L, S)."""
from __future__ import annotations

from .. import reference, spec as S
from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"
    devices = ("cpu", "cuda", "xpu", "mps", "meta")
    dtypes = S.SUPPORTED_DTYPES
    # Every feature reference.py implements; a new feature goes here once it does.
    features = S.ALL_FEATURES & ~S.DROPOUT
    materializes_scores = True

    def forward(self, spec):
        return reference.reference_forward(spec)
