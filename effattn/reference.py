"""The math oracle: plain PyTorch attention that materialises the score matrix.

It implements exactly the semantics of :func:`effattn.attention` (on the
normalised :class:`~effattn.spec.AttentionSpec`), in any dtype, float64
included, and is differentiable through autograd. It is the test oracle, the
``reference`` backend (the fallback of last resort) and the benchmarks' naive
baseline. It allocates (B, H, L, S) tensors: never use it for long sequences.
"""
from __future__ import annotations

from typing import Optional

import torch

from .spec import STATS, AttentionSpec, feature_words, make_spec


def structure_mask(spec: AttentionSpec) -> torch.Tensor:
    """Bool (B, 1, L, S): True where the band (causal masking folded in by the spec)
    and the lengths let query i see key j."""
    L, S, dev = spec.seqlen_q, spec.seqlen_k, spec.device
    i = torch.arange(L, device=dev).view(1, 1, L, 1)
    j = torch.arange(S, device=dev).view(1, 1, 1, S)
    allowed = torch.ones(1, 1, L, S, dtype=torch.bool, device=dev)
    left, right = spec.band
    if left is not None:
        allowed = allowed & (j >= i - left)
    if right is not None:
        allowed = allowed & (j <= i + right)
    if spec.key_lengths is not None:
        allowed = allowed & (j < spec.key_lengths.view(-1, 1, 1, 1))
    if spec.query_lengths is not None:
        allowed = allowed & (i < spec.query_lengths.view(-1, 1, 1, 1))
    return allowed


def reference_forward(spec: AttentionSpec, compute_dtype: Optional[torch.dtype] = None):
    """(out (B, Hq, L, Ev), lse (B, Hq, L)), and ``stats`` (2, B, Hq, L) when the spec asks
    for them (its STATS feature): the entropy (nats) and the largest weight of each row's
    attention weights, 0 and 0 for a row that sees no key; not differentiable.

    compute_dtype: the precision of the math and of ``out`` (default: the input
    dtype, as PyTorch's math attention computes); float64 makes it the oracle.
    lse and stats are float32, or float64 when inputs or compute_dtype are float64.
    """
    dt = compute_dtype or spec.dtype
    q, k, v = spec.q.to(dt), spec.k.to(dt), spec.v.to(dt)
    group = spec.heads_q // spec.heads_kv if spec.heads_kv else 0
    if group != 1:  # (0 when there are no query heads: no keys either)
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)) * spec.scale
    if spec.mask is not None:
        if spec.mask.dtype == torch.bool:
            scores = scores.masked_fill(~spec.mask, float("-inf"))
        else:
            scores = scores + spec.mask.to(dt)
    scores = scores.masked_fill(~structure_mask(spec), float("-inf"))
    # Softmax that gives zeros (not NaN) for rows without any visible key. The
    # row max is detached: softmax and lse do not depend on it mathematically.
    row_max = (scores.amax(dim=-1, keepdim=True) if scores.shape[-1]  # (no keys at all: every row is empty)
               else scores.new_full((*scores.shape[:-1], 1), float("-inf"))).detach()
    row_max = row_max.masked_fill(torch.isinf(row_max), 0.0)
    e = torch.exp(scores - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    empty = denom == 0
    denom_safe = denom.masked_fill(empty, 1.0)
    weights = e / denom_safe
    out = torch.matmul(weights, v)
    lse = (row_max + torch.log(denom_safe)).masked_fill(empty, float("-inf")).squeeze(-1)
    lse_dtype = torch.float64 if spec.dtype == torch.float64 or dt == torch.float64 else torch.float32
    if not spec.features & STATS:
        return out, lse.to(lse_dtype)
    weights = weights.detach()
    entropy = -torch.special.xlogy(weights, weights).sum(dim=-1)  # 0 log 0 = 0: empty rows give 0
    peak = weights.amax(dim=-1) if weights.shape[-1] else torch.zeros_like(entropy)  # (no keys at all)
    stats = torch.stack([entropy, peak]).to(lse_dtype)
    return out, lse.to(lse_dtype), stats


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False, *, key_lengths=None, query_lengths=None, window=None,
              return_lse=False, compute_dtype: Optional[torch.dtype] = None):
    """:func:`effattn.attention`'s signature, computed by the reference math.

    compute_dtype=torch.float64 gives the oracle's answer, in float64."""
    spec = make_spec(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                     key_lengths=key_lengths, query_lengths=query_lengths, window=window, return_lse=return_lse)
    if spec.features & ~ReferenceBackend.features:  # (the one source of what the reference implements)
        raise NotImplementedError("effattn.reference: does not support "
                                  + "; ".join(feature_words(spec.features & ~ReferenceBackend.features)))
    out, lse = reference_forward(spec, compute_dtype)[:2]
    out = spec.to_caller_shape(out)
    return (out, spec.to_caller_shape(lse)) if return_lse else out


from .backends.reference import ReferenceBackend  # noqa: E402  (it imports this module)
