"""Modules built on :func:`effattn.attention`: none of them builds an (L, S) matrix.

* :class:`MultiheadAttention`: a drop-in for ``torch.nn.MultiheadAttention``
  (same constructor, parameters, state_dict and forward arguments), whose
  attention is ``effattn.attention``.
* :class:`AttentionPooling`: pools a padded batch ``(B, N, D)`` with ``lengths``
  into ``(B, out_dim)`` with one or a few queries; padded frames are masked
  through ``key_lengths`` (no mask tensor), scores are scaled by 1/sqrt(d).

Both record the health of their attention when asked (``record_stats = True``, or
:func:`record_attention_stats` on a whole model): each forward then keeps, in
``last_stats``, the per-row entropy, largest weight and effective number of keys of its
attention weights (effattn.diagnostics.attention_stats), computed by the same kernel call.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .api import attention

__all__ = ["MultiheadAttention", "AttentionPooling", "record_attention_stats"]


def _fail(owner: str, msg: str):
    raise ValueError(f"{owner}: {msg}")


def _check_lengths(owner: str, lengths, batch: int) -> Tensor:
    if not isinstance(lengths, Tensor) or lengths.is_floating_point() or lengths.is_complex() \
            or lengths.dtype == torch.bool:
        _fail(owner, f"lengths must be an integer tensor of shape ({batch},), got "
                     f"{getattr(lengths, 'dtype', type(lengths).__name__)}")
    if tuple(lengths.shape) != (batch,):
        _fail(owner, f"lengths must have shape ({batch},) (the batch size), got {tuple(lengths.shape)}")
    return lengths


# ---------------------------------------------------------------------------
# MultiheadAttention
# ---------------------------------------------------------------------------

def _effattn_mask(mask: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    """torch.nn.MultiheadAttention's mask convention -> effattn's.

    nn.MultiheadAttention: bool True = do NOT attend; SDPA/effattn: bool True =
    attend. Float masks are added to the scores in both."""
    if mask.dtype == torch.bool:
        return ~mask
    if not mask.is_floating_point():
        raise ValueError(f"effattn.nn.MultiheadAttention: {name} must be bool or floating point, got {mask.dtype}")
    return mask if mask.dtype in (torch.float32, dtype) else mask.to(dtype)


def _merge_masks(a: Tensor, b: Tensor) -> Tensor:
    """One mask meaning both (effattn convention); broadcasts, so it materialises
    the broadcast shape, e.g. (B, 1, L, S) for an (L, S) mask and a padding mask."""
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    dtype = next(m.dtype for m in (a, b) if m.dtype != torch.bool)
    if a.dtype != b.dtype and torch.bool not in (a.dtype, b.dtype):
        dtype = torch.float32

    def additive(m):
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, float("-inf"))
        return m.to(dtype)

    return additive(a) + additive(b)


class _RecordsStats:
    """The opt-in shared by the modules: with ``record_stats = True`` (off by default) each
    forward computes its attention with effattn.diagnostics.attention_stats instead of
    effattn.attention, in the same single kernel pass, and keeps the detached
    :class:`~effattn.diagnostics.AttentionStats` of the call in ``last_stats`` (shape
    (B, H, L) each), so a training loop can log attention-entropy collapse
    (``module.last_stats.summary()``)."""

    record_stats: bool = False
    last_stats = None

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, return_lse: bool = False, **kw):
        if not self.record_stats:
            return attention(q, k, v, return_lse=return_lse, **kw)
        from .diagnostics.attention import attention_stats

        out, self.last_stats = attention_stats(q, k, v, return_output=True, **kw)
        return (out, self.last_stats.lse) if return_lse else out


def record_attention_stats(model: torch.nn.Module, enabled: bool = True):
    """Sets ``record_stats`` on every effattn.nn module in ``model`` (itself included);
    returns those modules, e.g. to log ``m.last_stats.summary()`` after each step."""
    found = [m for m in model.modules() if isinstance(m, _RecordsStats)]
    for m in found:
        m.record_stats = enabled
        if not enabled:
            m.last_stats = None
    return found


class MultiheadAttention(_RecordsStats, torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` computed with :func:`effattn.attention`.

    Same constructor arguments, parameter names and initialisation (it is a
    subclass), so ``load_state_dict`` from a ``torch.nn.MultiheadAttention``
    works and gives the same outputs, and the same forward arguments, with
    these differences:

    * ``need_weights`` defaults to False and True raises NotImplementedError:
      the (L, S) weights are never materialised. ``average_attn_weights`` is
      accepted and ignored. The second return value is always None.
    * Dropout is not implemented: forward raises NotImplementedError in
      training mode when ``dropout > 0``; in eval mode dropout is off anyway.
    * ``is_causal=True`` needs no ``attn_mask`` (torch requires one as a
      "hint"); with one, both apply (the same result when the mask is causal).
    * Extras, keyword-only: ``key_lengths`` (int (B,): keys at or past it are
      padding; the memory-free alternative to ``key_padding_mask``) and
      ``window=(left, right)`` (local attention), as in effattn.attention.
    * ``record_stats = True`` keeps each call's attention statistics in
      ``last_stats`` (the module docstring).

    Memory: ``key_padding_mask`` alone is passed as a (B, 1, 1, S) view. A bool
    ``attn_mask`` is negated (one copy of it) and combining ``attn_mask`` with
    ``key_padding_mask`` materialises their broadcast (B, 1 or H, L, S); pass
    ``key_lengths`` instead to avoid both. ``add_bias_kv`` and ``add_zero_attn``
    are supported (one or two keys appended), but not with ``is_causal``,
    ``key_lengths`` or ``window``, whose key positions they would shift.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = False, attn_mask: Optional[Tensor] = None,
                average_attn_weights: bool = True, is_causal: bool = False, *,
                key_lengths: Optional[Tensor] = None,
                window: Optional[Sequence[Optional[int]]] = None) -> Tuple[Tensor, None]:
        owner = "effattn.nn.MultiheadAttention"
        if need_weights:
            raise NotImplementedError(
                f"{owner} does not materialise the (L, S) attention weights; call it with "
                "need_weights=False (its default), or use torch.nn.MultiheadAttention to inspect weights")
        if self.training and self.dropout > 0:
            raise NotImplementedError(
                f"{owner}: attention dropout is not supported (dropout={self.dropout}); construct it with "
                "dropout=0.0 or call .eval() (in eval mode dropout is off, as in torch)")
        query, key, value, key_padding_mask, key_lengths, batched = self._to_batch_first(
            query, key, value, key_padding_mask, key_lengths)
        B, L, E = query.shape
        S, H = key.shape[1], self.num_heads

        q, k, v = self._project(query, key, value)
        k, v, extra = self._append_extra_keys(k, v)
        if extra and (is_causal or key_lengths is not None or window is not None):
            _fail(owner, "add_bias_kv / add_zero_attn append keys at the end, which is_causal, key_lengths "
                         "and window would not see as intended; they cannot be combined")
        mask = self._combined_mask(attn_mask, key_padding_mask, B, L, S, extra, q.dtype)

        def heads(t):  # (B, N, H*d) -> (B, H, N, d), a view
            return t.view(B, t.shape[1], H, -1).transpose(1, 2)

        out = self._attend(heads(q), heads(k), heads(v), attn_mask=mask, is_causal=is_causal,
                           key_lengths=key_lengths, window=window)
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, E))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    # ---- steps of forward ----------------------------------------------------
    def _to_batch_first(self, query, key, value, key_padding_mask, key_lengths):
        """Checks shapes; returns batch-first (B, N, dim) views and (B,)-shaped extras."""
        owner = "effattn.nn.MultiheadAttention"
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                _fail(owner, f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if query.dim() not in (2, 3):
            _fail(owner, f"query must be 3-D ({'(B, L, E)' if self.batch_first else '(L, B, E)'}) or "
                         f"2-D unbatched (L, E), got shape {tuple(query.shape)}")
        for name, t in (("key", key), ("value", value)):
            if t.dim() != query.dim():
                _fail(owner, f"{name} must have {query.dim()} dims like query, got shape {tuple(t.shape)}")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            if key_lengths is not None:
                key_lengths = key_lengths.reshape(1)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        for name, t, want in (("query", query, self.embed_dim), ("key", key, self.kdim),
                              ("value", value, self.vdim)):
            if t.shape[-1] != want:
                _fail(owner, f"{name}.size(-1) = {t.shape[-1]} must equal "
                             f"{'embed_dim' if name == 'query' else name[0] + 'dim'} = {want}")
        bdim = 0 if (self.batch_first or not batched) else 1
        for name, t in (("key", key), ("value", value)):
            if t.shape[0] != query.shape[0]:
                _fail(owner, f"{name}.size({bdim}) = {t.shape[0]} must equal query.size({bdim}) = "
                             f"{query.shape[0]} (the batch size)")
        if value.shape[1] != key.shape[1]:
            _fail(owner, f"value.size({1 - bdim}) = {value.shape[1]} must equal key.size({1 - bdim}) = "
                         f"{key.shape[1]} (the key sequence length)")
        B, S = key.shape[:2]
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, S):
            _fail(owner, f"key_padding_mask must have shape {(B, S) if batched else (S,)} "
                         f"((batch, key length)), got {tuple(key_padding_mask.shape)}")
        return query, key, value, key_padding_mask, key_lengths, batched

    def _project(self, query, key, value):
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _append_extra_keys(self, k, v):
        """add_bias_kv then add_zero_attn, as torch: keys S, S+1 of every sequence."""
        extra = 0
        B = k.shape[0]
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(B, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(B, 1, -1)], dim=1)
            extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(B, 1, k.shape[2])], dim=1)
            v = torch.cat([v, v.new_zeros(B, 1, v.shape[2])], dim=1)
            extra += 1
        return k, v, extra

    def _combined_mask(self, attn_mask, key_padding_mask, B, L, S, extra, dtype):
        """attn_mask and key_padding_mask (torch convention) -> one effattn mask, or None."""
        H = self.num_heads
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (L, S):
                pass
            elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (B * H, L, S):
                attn_mask = attn_mask.view(B, H, L, S)
            else:
                _fail("effattn.nn.MultiheadAttention",
                      f"attn_mask must have shape (L, S) = {(L, S)} or (batch * num_heads, L, S) = "
                      f"{(B * H, L, S)}, got {tuple(attn_mask.shape)}")
            mask = _effattn_mask(F.pad(attn_mask, (0, extra)), "attn_mask", dtype)
        if key_padding_mask is not None:
            kpm = _effattn_mask(F.pad(key_padding_mask, (0, extra)), "key_padding_mask", dtype)
            kpm = kpm.view(B, 1, 1, S + extra)
            mask = kpm if mask is None else _merge_masks(mask, kpm)
        return mask


# ---------------------------------------------------------------------------
# AttentionPooling
# ---------------------------------------------------------------------------

class AttentionPooling(_RecordsStats, torch.nn.Module):
    """Attention pooling of padded sequences: ``(B, N, D)`` and ``lengths`` -> ``(B, out_dim)``.

    Each of ``num_queries`` queries attends over the valid frames of its
    sequence (frames ``t >= lengths[b]`` are excluded through ``key_lengths``:
    they get exactly zero weight and zero gradient), with scores scaled by
    1/sqrt(head dim)::

        keys   = key_proj(x)   (or x itself when key_proj=False)
        values = value_proj(x) (or x itself when value_proj=False, the default)
        query  = a learned vector per query            (query="learned")
                 or q_proj(mean of the valid frames)   (query="mean")
        pooled = softmax(query . keys / sqrt(d) over valid frames) . values, per head

    Args:
      embed_dim: D, the size of a frame.
      num_heads: heads; they split the query/key and the value dims.
      num_queries: queries per sequence; their results are concatenated
        (``combine="concat"``, out_dim = num_queries * value_dim) or averaged
        (``combine="mean"``, out_dim = value_dim).
      query: "learned" or "mean" (see above).
      attn_dim: size of queries and keys (default D; must be D without key_proj).
      key_proj, value_proj: whether keys / values are a linear projection of x.
      value_dim: size of values with value_proj (default D).
      bias: whether the query and value projections have a bias (the key
        projection never has one: it would add the same q.b to every score of
        a query, which softmax ignores, so its gradient is always zero).

    ``forward(x, lengths, return_weights=True)`` also returns the attention
    weights (B, num_heads, num_queries, N), cheap here since the query count is
    small: computed from the kernel's log-sum-exp, so they sum to 1 over the
    valid frames only if the kernel excluded the padding. A sequence of length 0
    pools to zeros.
    """

    def __init__(self, embed_dim: int, num_heads: int = 1, *, num_queries: int = 1, query: str = "learned",
                 attn_dim: Optional[int] = None, key_proj: bool = True, value_proj: bool = False,
                 value_dim: Optional[int] = None, combine: str = "concat", bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        owner = "effattn.nn.AttentionPooling"
        kw = dict(device=device, dtype=dtype)
        if value_dim is not None and not value_proj:
            _fail(owner, "value_dim needs value_proj=True (without it the values are the frames)")
        attn_dim = attn_dim or embed_dim
        value_dim = value_dim or embed_dim
        if query not in ("learned", "mean"):
            _fail(owner, f"query must be 'learned' or 'mean', got {query!r}")
        if combine not in ("concat", "mean"):
            _fail(owner, f"combine must be 'concat' or 'mean', got {combine!r}")
        if not key_proj and attn_dim != embed_dim:
            _fail(owner, f"without key_proj the keys are the frames: attn_dim must be embed_dim = {embed_dim}, "
                         f"got {attn_dim}")
        for name, d in (("attn_dim", attn_dim), ("value_dim", value_dim)):
            if d % num_heads:
                _fail(owner, f"{name} = {d} must be divisible by num_heads = {num_heads}")
        if num_queries < 1:
            _fail(owner, f"num_queries must be >= 1, got {num_queries}")
        self.embed_dim, self.num_heads, self.num_queries = embed_dim, num_heads, num_queries
        self.attn_dim, self.value_dim, self.query_kind, self.combine = attn_dim, value_dim, query, combine
        self.out_dim = value_dim * (num_queries if combine == "concat" else 1)

        # no key bias: it adds the same q.b to every score of a query, which softmax ignores (zero gradient)
        self.key_proj = torch.nn.Linear(embed_dim, attn_dim, bias=False, **kw) if key_proj else None
        self.value_proj = torch.nn.Linear(embed_dim, value_dim, bias=bias, **kw) if value_proj else None
        if query == "learned":
            # N(0, 1): with the 1/sqrt(d) scale, scores start O(1), neither uniform nor saturated
            self.query = torch.nn.Parameter(torch.randn(num_queries, attn_dim, **kw))
            self.q_proj = None
        else:
            self.query = None
            self.q_proj = torch.nn.Linear(embed_dim, num_queries * attn_dim, bias=bias, **kw)

    def forward(self, x: Tensor, lengths: Tensor, return_weights: bool = False):
        owner = "effattn.nn.AttentionPooling"
        if not isinstance(x, Tensor) or x.dim() != 3:
            _fail(owner, f"x must be a (batch, frames, embed_dim) tensor, got shape "
                         f"{tuple(getattr(x, 'shape', ()))}")
        B, N, D = x.shape
        if D != self.embed_dim:
            _fail(owner, f"x.size(2) = {D} must equal embed_dim = {self.embed_dim}")
        _check_lengths(owner, lengths, B)
        H, Q = self.num_heads, self.num_queries

        if self.query_kind == "mean":
            valid = (torch.arange(N, device=x.device) < lengths.unsqueeze(1)).unsqueeze(2)  # (B, N, 1)
            total = torch.where(valid, x, x.new_zeros(())).sum(1)  # where: padding gets exactly 0 gradient
            mean = total / lengths.clamp(min=1).unsqueeze(1).to(x.dtype)
            q = self.q_proj(mean).view(B, Q, self.attn_dim)
        else:
            q = self.query.unsqueeze(0).expand(B, Q, self.attn_dim)
        keys = self.key_proj(x) if self.key_proj is not None else x
        values = self.value_proj(x) if self.value_proj is not None else x

        def heads(t):  # (B, n, H*d) -> (B, H, n, d), a view
            return t.reshape(B, t.shape[1], H, -1).transpose(1, 2)

        q, keys, values = heads(q), heads(keys), heads(values)
        out, lse = self._attend(q, keys, values, key_lengths=lengths, return_lse=True)
        out = out.transpose(1, 2).reshape(B, Q, self.value_dim)  # (B, Q, value_dim)
        pooled = out.reshape(B, self.out_dim) if self.combine == "concat" else out.mean(1)
        if not return_weights:
            return pooled
        return pooled, self._weights(q, keys, lse, lengths)

    def _weights(self, q: Tensor, keys: Tensor, lse: Tensor, lengths: Tensor) -> Tensor:
        """exp(score - lse) on valid frames, 0 on padded ones: (B, H, Q, N), float32."""
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores = torch.matmul(q.float(), keys.float().transpose(-2, -1)) * scale
        valid = torch.arange(keys.shape[2], device=keys.device) < lengths.view(-1, 1, 1, 1)
        lse = lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1)  # -inf: length 0, no valid frame
        return torch.where(valid, torch.exp(scores - lse), 0.0)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_queries={self.num_queries}, "
                f"query={self.query_kind!r}, attn_dim={self.attn_dim}, value_dim={self.value_dim}, "
                f"combine={self.combine!r}, out_dim={self.out_dim}")
