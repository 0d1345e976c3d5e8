"""The reference math as a backend: serves every call it declares, materialises (B, H, L, S)."""
from __future__ import annotations

from .. import reference, spec as S
from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"
    devices = ("cpu", "cuda", "xpu", "mps", "meta")
    dtypes = S.SUPPORTED_DTYPES
    # Every feature reference.py implements, listed like any backend's: a new feature is refused
    # here too until reference_forward implements it (tests/test_contract.py checks the list).
    features = (S.CAUSAL | S.CAUSAL_LOWER_RIGHT | S.WINDOW | S.NEGATIVE_BAND | S.KEY_LENGTHS | S.QUERY_LENGTHS
                | S.BOOL_MASK | S.FLOAT_MASK | S.MASK_BROADCAST | S.MASK_GRAD | S.GQA | S.VALUE_HEAD_DIM | S.RETURN_LSE
                | S.STATS)
    materializes_scores = True

    def forward(self, spec):
        return reference.reference_forward(spec)
