"""effattn.attention: SDPA's signature and semantics, without the (L, S) matrix."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import backends as _backends
from .spec import make_spec


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False, *,
              key_lengths: Optional[torch.Tensor] = None, query_lengths: Optional[torch.Tensor] = None,
              window: Optional[Sequence[Optional[int]]] = None, return_lse: bool = False,
              backend: str = "auto"):
    """Exact scaled dot-product attention, memory O(L + S) instead of O(L * S).

    The arguments shared with ``torch.nn.functional.scaled_dot_product_attention``
    mean exactly what they mean there: ``query`` (..., Hq, L, E), ``key``
    (..., Hkv, S, E), ``value`` (..., Hkv, S, Ev); ``attn_mask`` bool (True =
    attend) or float (added to the scores), broadcastable to (..., Hq, L, S);
    ``is_causal`` top-left aligned (query i sees keys j <= i); ``scale``
    defaulting to 1/sqrt(E); ``enable_gqa`` for Hq a multiple of Hkv.
    SDPA's causal mask objects are understood as what they mean, with no
    mask tensor: ``attn_mask=torch.nn.attention.bias.causal_upper_left(L, S)``
    (as ``is_causal``) and ``causal_lower_right(L, S)`` (bottom-right aligned,
    FlashAttention's convention for L != S: query i sees keys
    j <= i + S - L). ``dropout_p`` > 0 is not supported yet (no backend
    serves it: NotImplementedError). Unlike SDPA, ``attn_mask`` and
    ``is_causal`` may be combined.

    Extras:
      key_lengths, query_lengths: int tensors of the batch shape (B,): keys at
        or past key_lengths[b] are masked; query rows at or past
        query_lengths[b] return zeros. No (L, S) mask is built.
      window=(left, right): query i sees keys i-left <= j <= i+right (None for
        an unbounded side); combines with is_causal.
      return_lse: also return the log-sum-exp of the scaled scores, shape
        (..., Hq, L), float32 (float64 for float64 inputs); -inf for rows that
        see no key.
      backend: "auto" or a name from ``effattn.backends()``.

    A query row that sees no key returns zeros and zero gradients.
    """
    spec = make_spec(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                     key_lengths=key_lengths, query_lengths=query_lengths, window=window,
                     return_lse=return_lse)
    chosen = _backends.select(spec, backend)
    out, lse = chosen.forward(spec)
    out = spec.to_caller_shape(out)
    if return_lse:
        return out, spec.to_caller_shape(lse)
    return out
