"""PyTorch's own memory-efficient kernel, for the GPUs effattn's kernels do not run on.

effattn's CUDA and Triton kernels need compute capability 8.0 (mma.sync with
bf16, cp.async). On older GPUs (a T4 or RTX 20xx at 7.5, a GTX 10xx at 6.x,
a V100 at 7.0) this backend calls ``torch.nn.functional.scaled_dot_product_attention``
pinned to ``SDPBackend.EFFICIENT_ATTENTION`` (xformers' CUTLASS kernel, compute
capability 5.0 and newer) and never to the math kernel, so no (L, S) score
matrix is built. Pinned, SDPA raises rather than fall back; the declaration
below and ``limits`` refuse in words what the kernel cannot take first.

The mapping of effattn's arguments onto SDPA's, one rule each:

* causal: top-left as ``is_causal=True``; bottom-right (L < S) as SDPA's own
  ``causal_lower_right`` object, which SDPA serves with that kernel's
  bottom-right mask type (on CUDA; SDPA's CPU kernels take it too). Causal
  masking does not combine with a dense mask: SDPA takes ``is_causal`` only
  without a mask, and their sum would be an (L, S) tensor. With
  ``key_lengths`` it is two calls: row i sees keys j <= i + d and j < n
  (d the diagonal, n the row's key length), so a row with i + d < n needs only
  the causal mask and any other row only the lengths; each row takes its
  output from the call that serves it (twice the work, no (L, S) tensor).
* a dense mask: read at its own (unbroadcast) size, e.g. (B, 1, 1, S) stays
  that; a bool mask becomes a float one of that size (as SDPA itself does);
* ``key_lengths``: a (B, 1, 1, S) float mask, added to the mask if any, and
  the keys and values past the lengths zeroed (a copy of K and V), so their
  padding is never read into a score;
* ``query_lengths``: the query rows past the lengths zeroed on the way in (a
  copy of Q) and their outputs zeroed on the way out;
* a row that sees no key (every mask entry -inf): SDPA's kernels would give
  NaN or garbage there; the row's mask is made 0 and its output zeroed, so it
  returns zeros and zero gradients as everywhere in effattn;
* grouped-query attention: key/value heads repeated to the query heads (a
  copy of K and V; the memory-efficient kernel takes equal heads);
* head dims padded with zeros to a multiple of 8 (the kernel's alignment; the
  scale stays the caller's), the output sliced back.

On CPU tensors the same mapping runs over SDPA's CPU flash kernel (the CPU
has no memory-efficient kernel): that is how the mapping is tested against the
reference without a GPU. ``auto`` picks this backend only for CUDA GPUs below
8.0; anywhere else it runs only when asked for by name.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from .. import spec as S
from .base import Backend, cuda_capability

KERNEL_CC = 80  # effattn's own GPU kernels start here; auto uses this backend below it
ALIGN = 8  # head dims are padded to this (the memory-efficient kernel's alignment for 16-bit types)


def _compact(mask: torch.Tensor) -> torch.Tensor:
    """A broadcast (stride-0) view at its own size: (B, Hq, L, S) with stride 0 along
    heads -> (B, 1, L, S), a view. SDPA broadcasts it back without copying."""
    index = tuple(slice(0, 1) if stride == 0 and size > 1 else slice(None)
                  for stride, size in zip(mask.stride(), mask.shape))
    return mask[index]


def _pad_last(t: torch.Tensor, width: int) -> torch.Tensor:
    return t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]))


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class SdpaEfficientBackend(Backend):
    name = "sdpa_efficient"
    devices = ("cuda", "cpu")
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    features = (S.CAUSAL | S.CAUSAL_LOWER_RIGHT | S.KEY_LENGTHS | S.QUERY_LENGTHS | S.BOOL_MASK | S.FLOAT_MASK
                | S.MASK_BROADCAST | S.GQA | S.VALUE_HEAD_DIM)
    deterministic_backward = False  # the memory-efficient kernel's backward adds with atomics

    def _capability(self, spec) -> int:
        index = spec.device.index
        return cuda_capability(index if index is not None else 0)

    def limits(self, spec) -> List[str]:
        reasons = []
        if spec.seqlen_q == 0 or spec.seqlen_k == 0 or spec.q.shape[0] == 0 or spec.heads_q == 0:
            reasons.append("SDPA's fused kernels take no empty sequences, batches or heads")
        if spec.band[1] is not None and spec.mask is not None:
            reasons.append("causal masking together with attn_mask (SDPA takes is_causal only without a mask, "
                           "and their sum would be an (L, S) tensor)")
        if spec.mask is not None and spec.key_lengths is not None:
            mask = _compact(spec.mask)
            if mask.shape[0] < spec.q.shape[0] and mask.shape[2] > 1:
                reasons.append("key_lengths with an attn_mask shared by the batch that varies along the query "
                               "rows (their sum would be a (B, ..., L, S) tensor)")
        if spec.device_type == "cuda" and spec.dtype == torch.bfloat16:
            cap = self._capability(spec)
            if cap < 80:
                reasons.append(f"bfloat16 in PyTorch's memory-efficient kernel needs compute capability 8.0, "
                               f"{spec.device} has {cap // 10}.{cap % 10}")
        return reasons

    auto_note = "auto picks it only on CUDA GPUs below compute capability 8.0"

    def auto_reason(self, spec) -> str:
        if spec.device_type == "cuda" and self._capability(spec) < KERNEL_CC:
            return ""
        return f"{self.auto_note} (backend='sdpa_efficient' asks for it)"

    def variant(self, spec) -> str:
        if spec.device_type == "cpu":
            return "SDPA's CPU flash kernel (SDPBackend.FLASH_ATTENTION), as a test of the mapping"
        return "SDPA's memory-efficient kernel (SDPBackend.EFFICIENT_ATTENTION)"

    def _sdpa_backend(self, spec):
        from torch.nn.attention import SDPBackend
        return SDPBackend.FLASH_ATTENTION if spec.device_type == "cpu" else SDPBackend.EFFICIENT_ATTENTION

    def _bias(self, spec):
        """(float mask of its own size or None, bool rows that see no key or None)."""
        bias, owned = None, False
        if spec.mask is not None:
            mask = _compact(spec.mask)
            if mask.dtype == torch.bool:
                bias = torch.zeros(mask.shape, dtype=spec.dtype, device=spec.device).masked_fill_(~mask, float("-inf"))
                owned = True
            else:
                bias = mask.to(spec.dtype)
                owned = bias is not mask
        if spec.key_lengths is not None:
            B, S_ = spec.q.shape[0], spec.seqlen_k
            past = torch.arange(S_, device=spec.device).view(1, 1, 1, S_) >= spec.key_lengths.view(B, 1, 1, 1)
            lengths = torch.zeros(past.shape, dtype=spec.dtype, device=spec.device).masked_fill_(past, float("-inf"))
            bias, owned = (lengths, True) if bias is None else (bias + lengths, True)
        if bias is None:
            return None, None
        empty = torch.isneginf(bias).all(dim=-1, keepdim=True)
        # (eagerly, a mask the caller owns is copied only when a row is empty; compiled, always)
        if owned:
            bias.masked_fill_(empty, 0.0)
        elif torch.compiler.is_compiling() or bool(empty.any()):
            bias = bias.masked_fill(empty, 0.0)
        return bias, empty

    def forward(self, spec):
        from torch.nn.attention import sdpa_kernel
        from torch.nn.attention.bias import causal_lower_right

        q, k, v = spec.q, spec.k, spec.v
        B, Hq, L, E = q.shape
        S_, Ev = k.shape[2], v.shape[3]
        bias, empty = self._bias(spec)
        zero_rows = empty
        if spec.key_lengths is not None:  # padding keys never reach a score (0 * NaN would)
            past = torch.arange(S_, device=spec.device).view(1, 1, S_, 1) >= spec.key_lengths.view(B, 1, 1, 1)
            k, v = k.masked_fill(past, 0.0), v.masked_fill(past, 0.0)
        if spec.query_lengths is not None:
            past = torch.arange(L, device=spec.device).view(1, 1, L, 1) >= spec.query_lengths.view(B, 1, 1, 1)
            q = q.masked_fill(past, 0.0)
            zero_rows = past if zero_rows is None else zero_rows | past
        if spec.heads_kv != Hq:
            group = Hq // spec.heads_kv
            k, v = (t.unsqueeze(2).expand(B, spec.heads_kv, group, *t.shape[2:]).reshape(B, Hq, *t.shape[2:])
                    for t in (k, v))
        width_qk = _round_up(E)
        width_v = _round_up(Ev)
        if spec.device_type == "cpu":  # SDPA's CPU flash kernel takes Ev == E only
            width_qk = width_v = max(width_qk, width_v)
        q, k, v = _pad_last(q, width_qk), _pad_last(k, width_qk), _pad_last(v, width_v)

        right = spec.band[1]  # the causal diagonal: 0 (top-left) or S - L > 0 (bottom-right); no dense mask then
        with sdpa_kernel([self._sdpa_backend(spec)]):
            if right is None:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=spec.scale)
            else:
                causal = dict(is_causal=True) if right == 0 else dict(attn_mask=causal_lower_right(L, S_))
                out = F.scaled_dot_product_attention(q, k, v, scale=spec.scale, **causal)
                if bias is not None:  # key_lengths: rows i + right >= n see only the keys below n
                    by_lengths = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=spec.scale)
                    rows = torch.arange(L, device=spec.device).view(1, 1, L, 1) + right < \
                        spec.key_lengths.view(B, 1, 1, 1)
                    out = torch.where(rows, out, by_lengths)
        if out.shape[-1] != Ev:
            out = out[..., :Ev]
        if zero_rows is not None:
            out = out.masked_fill(zero_rows, 0.0)
        return out, None
