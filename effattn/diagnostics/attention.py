"""Attention health from the kernels, at O(L) memory: per query row, the entropy of the
attention weights, the largest weight and the effective number of keys exp(entropy).

The fused kernels compute them in the forward itself, from one more row accumulator beside the
running max and sum (the STATS feature of effattn/spec.py; csrc/cpu/attention_fwd.h and
effattn/triton/forward.py say how): no (L, S) matrix, no second pass. The reference math
computes them from the materialised softmax (the tests' oracle).

Entropy collapse, attention concentrating on one or a few keys early in training, is a known
sign of instability in transformers (Zhai et al., 2023, "Stabilizing Transformer Training by
Preventing Attention Entropy Collapse"); ``effattn.nn.MultiheadAttention`` and
``AttentionPooling`` record these during training when asked (``record_stats=True``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .. import backends as _backends
from ..spec import make_spec


class AttentionStats(NamedTuple):
    """Per query row, each of shape (..., Hq, L) (the caller's batch dims, heads, rows), in
    float32 (float64 for float64 inputs), without gradient. A row that sees no key (all masked,
    past query_lengths) has entropy 0, max_weight 0 and effective_keys 0."""
    entropy: Tensor         # -sum_j p_ij ln p_ij, in nats: 0 (one key) .. ln(visible keys) (uniform)
    max_weight: Tensor      # max_j p_ij: 1 / visible keys (uniform) .. 1 (one key)
    effective_keys: Tensor  # exp(entropy): how many keys the row attends to, as if uniformly
    lse: Tensor             # the log-sum-exp of the row's scaled scores (-inf for a row with no key)

    def summary(self) -> dict:
        """Means over the rows that see a key (floats; NaN when none does): what a training
        loop logs."""
        seen = self.max_weight > 0
        def mean(t):
            return float(t[seen].double().mean()) if bool(seen.any()) else float("nan")
        return {"entropy": mean(self.entropy), "max_weight": mean(self.max_weight),
                "effective_keys": mean(self.effective_keys)}


def attention_stats(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                    dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                    enable_gqa: bool = False, *, key_lengths: Optional[Tensor] = None,
                    query_lengths: Optional[Tensor] = None, window: Optional[Sequence[Optional[int]]] = None,
                    return_lse: bool = False, backend: str = "auto", return_output: bool = False):
    """The :class:`AttentionStats` of the call ``effattn.attention(query, key, value, ...)``
    with the same arguments, computed by the fused kernels (cpu, triton) in one forward pass.

    ``return_output=True`` returns ``(out, stats)``: ``out`` is the attention output, exactly
    what effattn.attention returns and differentiable like it (the stats are not), so a training
    step gets both from one kernel call. ``return_lse`` is accepted for the shared signature;
    the log-sum-exp is always ``stats.lse``.
    """
    spec = make_spec(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                     key_lengths=key_lengths, query_lengths=query_lengths, window=window,
                     return_lse=return_lse, return_stats=True)
    chosen = _backends.select(spec, backend)
    out, lse, stats = chosen.forward(spec)
    stats = stats.detach()
    entropy, max_weight = spec.to_caller_shape(stats[0]), spec.to_caller_shape(stats[1])
    effective = torch.where(max_weight > 0, entropy.exp(), torch.zeros_like(entropy))
    result = AttentionStats(entropy, max_weight, effective, spec.to_caller_shape(lse.detach()))
    return (spec.to_caller_shape(out), result) if return_output else result
