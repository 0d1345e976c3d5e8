"""The Triton kernels as PyTorch ops: ``effattn::triton_fwd`` and
``effattn::triton_bwd``, defined with ``torch.library.triton_op`` so that
``torch.compile(fullgraph=True)`` traces through them (the kernels are
launched with ``wrap_triton``), with the recompute backward registered as the
forward's autograd formula.

Arguments are the canonical spec (effattn/spec.py): q (B, Hq, L, E),
k (B, Hkv, S, E), v (B, Hkv, S, Ev) with a contiguous last dim and any other
strides; mask a broadcast view of (B, Hq, L, S) or None; lengths (B,) int64
or None; window sides -1 for unbounded, with causal already folded into
window_right. Outputs follow the input layouts (as the C++ ops).
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch
import triton
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from ..ops import (EagerCaller, check_op_args, empty_in_layout_of, not_differentiable_autograd,
                   recompute_autograd)
from . import configs
from .backward import bwd_dkdv_kernel, bwd_dq_kernel, bwd_preprocess_kernel
from .forward import attn_fwd_kernel, merge_splits_kernel
from .tiles import LOG2E, UNBOUNDED

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SPLIT_CHUNK = 256  # keys per split are a multiple of this (and so of every BLOCK_N)


def _pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))  # tl.dot needs >= 16 and powers of two


def _bucket(n: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), 1 << 16)


def _mask_args(mask: Optional[Tensor], dtype: torch.dtype):
    """(tensor for the kernel, kind, 4 strides). A bool mask is read as uint8."""
    if mask is None:
        return None, 0, (0, 0, 0, 0)
    strides = tuple(mask.stride())
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), 1, strides
    return mask, 2, strides


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so the tests exercise the merge
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _num_splits(n_programs: int, S: int, device: torch.device) -> int:
    """Key splits for the short-query path: enough programs for ~2 waves."""
    want = triton.cdiv(2 * _num_sms(device), max(n_programs, 1))
    return max(1, min(want, triton.cdiv(S, SPLIT_CHUNK)))


def _common(q: Tensor, k: Tensor, v: Tensor, window_left: int, window_right: int,
            key_lengths, query_lengths, mask, backward=None):
    check_op_args(q, k, v, mask, key_lengths, query_lengths, (window_left, window_right), backward)
    B, H, L, E = q.shape
    HKV, S, EV = k.shape[1], k.shape[2], v.shape[3]
    mask_t, mask_kind, mstr = _mask_args(mask, q.dtype)
    meta = dict(
        HEAD_DIM=E, HEAD_DIM_PAD=_pad(E), HEAD_DIM_V=EV, HEAD_DIM_V_PAD=_pad(EV),
        HAS_KEY_LENGTHS=key_lengths is not None, HAS_QUERY_LENGTHS=query_lengths is not None,
        MASK_KIND=mask_kind,
        UPCAST=INTERPRET and q.dtype in (torch.bfloat16, torch.float16),
    )
    # unused pointer slots get any tensor (never read: their flags are off)
    dummy = q
    ptrs = (mask_t if mask_t is not None else dummy,
            key_lengths if key_lengths is not None else dummy,
            query_lengths if query_lengths is not None else dummy)
    return B, H, HKV, L, S, E, EV, mstr, meta, ptrs


def _long(L, S) -> bool:
    """Whether the interpreter takes its long-sequence blocks. Asked only under the
    interpreter: under torch.compile with dynamic shapes, max(L, S) would add a guard
    on which of the two is longer, and so a recompile when that changes."""
    return INTERPRET and max(L, S) > 256


def _window(side: int) -> int:
    """-1 (unbounded) becomes a bound no index reaches, so the kernels need no flag."""
    return UNBOUNDED if side < 0 else min(side, UNBOUNDED)


def _use_tma(q: Tensor, k: Tensor, v: Tensor, head_dim_pad: int, head_dim_v_pad: int) -> bool:
    """Whether the forward's interior blocks load K and V through tensor descriptors.

    Opt-in (EFFATTN_TRITON_TMA=1) until measured on a GPU: tested for
    correctness under the interpreter, and compiled for sm_90 on the CPU
    (bench/dev/triton_aot.py), but never run on a GPU. Needs Hopper or newer
    (or the interpreter), power-of-two head dims, and TMA's alignment: 16-byte
    aligned bases and 16-byte multiples for every stride but the last. Not
    under torch.compile (device-side descriptors need triton.set_allocator's
    scratch memory, which a compiled graph does not set up)."""
    if os.environ.get("EFFATTN_TRITON_TMA", "0") != "1" or torch.compiler.is_compiling() or is_fake(q):
        return False  # (fake tensors: torch.compile tracing this op's body into a graph)
    if k.shape[-1] != head_dim_pad or v.shape[-1] != head_dim_v_pad:
        return False
    if not INTERPRET and (q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] < 9):
        return False
    for t in (k, v):
        es = t.element_size()
        if t.data_ptr() % 16 or any((st * es) % 16 for st in t.stride()[:3]):
            return False
    return True


def _tma_scratch(device: torch.device):
    """triton.set_allocator's callback: scratch for device-side descriptors."""
    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device=device)
    return alloc


def _precision(dtype: torch.dtype, fp32_ieee: bool) -> str:
    return "ieee" if dtype == torch.float32 and fp32_ieee else "tf32"


@triton_op("effattn::triton_fwd", mutates_args=())
def triton_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], key_lengths: Optional[Tensor],
               query_lengths: Optional[Tensor], scale: float, window_left: int, window_right: int,
               fp32_ieee: bool) -> Tuple[Tensor, Tensor]:
    B, H, HKV, L, S, E, EV, mstr, meta, (mask_t, klen, qlen) = _common(
        q, k, v, window_left, window_right, key_lengths, query_lengths, mask)
    window_left, window_right = _window(window_left), _window(window_right)
    out = empty_in_layout_of(q, (B, H, L, EV), q.dtype)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if B * H * L == 0:
        return out, lse
    meta["PRECISION"] = _precision(q.dtype, fp32_ieee)
    elem = q.element_size()
    # configs are sized by the wider head dim and the device's shared memory per block
    d_pad, smem = max(meta["HEAD_DIM_PAD"], meta["HEAD_DIM_V_PAD"]), configs.smem_limit(q.device)
    args_tail = (mstr[0], mstr[1], mstr[2], mstr[3], H, H // HKV, L, S)
    splits = _num_splits(B * H, S, q.device) if L <= configs.SHORT_QUERY_ROWS else 1
    if splits > 1:
        bm, bn, w, st = configs.short(d_pad, elem, INTERPRET, smem, mask is not None)
        per_split = triton.cdiv(triton.cdiv(S, splits), SPLIT_CHUNK) * SPLIT_CHUNK
        splits = triton.cdiv(S, per_split)
        o_part = torch.empty((splits, B, H, L, EV), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((splits, B, H, L), dtype=torch.float32, device=q.device)
        wrap_triton(attn_fwd_kernel)[(triton.cdiv(L, bm), B * H, splits)](
            q, k, v, o_part, lse_part, mask_t, klen, qlen,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o_part.stride(1), o_part.stride(2), o_part.stride(3), o_part.stride(0), lse_part.stride(0),
            *args_tail, per_split, _bucket(L), _bucket(S), scale * LOG2E, window_left, window_right,
            # every argument, defaults included: torch.compile reads the kernel's IR for the
            # tensors it writes, and without one it assumes all (and copies q, k, v first)
            USE_TMA=False, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, **meta)
        wrap_triton(merge_splits_kernel)[(triton.cdiv(L, 16), B * H)](
            o_part, lse_part, out, lse, out.stride(0), out.stride(1), out.stride(2), H, L, splits,
            HEAD_DIM_V=EV, HEAD_DIM_V_PAD=meta["HEAD_DIM_V_PAD"], BLOCK_M=16, num_warps=4)
        return out, lse
    use_tma = _use_tma(q, k, v, meta["HEAD_DIM_PAD"], meta["HEAD_DIM_V_PAD"])
    if use_tma:
        triton.set_allocator(_tma_scratch(q.device))
    kernel, fixed = configs.launcher(attn_fwd_kernel, "fwd", d_pad, elem, INTERPRET, _long(L, S), smem,
                                     mask is not None)
    grid = lambda META: (triton.cdiv(L, META["BLOCK_M"]), B * H, 1)  # noqa: E731
    wrap_triton(kernel)[grid](
        q, k, v, out, lse, mask_t, klen, qlen,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2), 0, 0,
        *args_tail, max(S, 1), _bucket(L), _bucket(S), scale * LOG2E, window_left, window_right,
        USE_TMA=use_tma, **meta, **(fixed or {}))
    return out, lse


@triton_op("effattn::triton_bwd", mutates_args=())
def triton_bwd(grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
               lse: Tensor, mask: Optional[Tensor], key_lengths: Optional[Tensor],
               query_lengths: Optional[Tensor], scale: float, window_left: int, window_right: int,
               fp32_ieee: bool) -> Tuple[Tensor, Tensor, Tensor]:
    B, H, HKV, L, S, E, EV, mstr, meta, (mask_t, klen, qlen) = _common(
        q, k, v, window_left, window_right, key_lengths, query_lengths, mask,
        dict(grad_out=grad_out, grad_lse=grad_lse, out=out, lse=lse))
    window_left, window_right = _window(window_left), _window(window_right)
    dq = empty_in_layout_of(q, (B, H, L, E), q.dtype)
    dk = empty_in_layout_of(k, (B, HKV, S, E), k.dtype)
    dv = empty_in_layout_of(v, (B, HKV, S, EV), v.dtype)
    if B * H * L == 0 or S == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    meta["PRECISION"] = _precision(q.dtype, fp32_ieee)
    elem = q.element_size()
    d_pad, smem = max(meta["HEAD_DIM_PAD"], meta["HEAD_DIM_V_PAD"]), configs.smem_limit(q.device)

    # ---- 1. delta and lse2, (B, H, L) float32 each ----
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    lse2 = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    dlse = grad_lse.to(torch.float32).contiguous() if grad_lse is not None else lse
    wrap_triton(bwd_preprocess_kernel)[(triton.cdiv(L, 64), B * H)](
        out, grad_out, lse, dlse, delta, lse2,
        out.stride(0), out.stride(1), out.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        H, L, HEAD_DIM_V=EV, HEAD_DIM_V_PAD=meta["HEAD_DIM_V_PAD"], BLOCK_M=64,
        HAS_DLSE=grad_lse is not None, num_warps=4)

    common = dict(meta)
    buckets = (_bucket(L), _bucket(S))
    # ---- 2. dK, dV: one program per key block ----
    kernel, fixed = configs.launcher(bwd_dkdv_kernel, "dkdv", d_pad, elem, INTERPRET, _long(L, S), smem,
                                     mask is not None)
    grid = lambda META: (triton.cdiv(S, META["BLOCK_N"]), B * HKV)  # noqa: E731
    wrap_triton(kernel)[grid](
        q, k, v, grad_out, lse2, delta, dk, dv, mask_t, klen, qlen,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        mstr[0], mstr[1], mstr[2], mstr[3], H, HKV, H // HKV, L, S, *buckets,
        scale, scale * LOG2E, window_left, window_right, **common, **(fixed or {}))

    # ---- 3. dQ: one program per query block (and key split, for short queries) ----
    splits = _num_splits(B * H, S, q.device) if L <= configs.SHORT_QUERY_ROWS else 1
    tail = (mstr[0], mstr[1], mstr[2], mstr[3], H, H // HKV, L, S)
    if splits > 1:
        bm, bn, w, st = configs.short(d_pad, elem, INTERPRET, smem, mask is not None)
        per_split = triton.cdiv(triton.cdiv(S, splits), SPLIT_CHUNK) * SPLIT_CHUNK
        splits = triton.cdiv(S, per_split)
        dq_part = torch.empty((splits, B, H, L, E), dtype=torch.float32, device=q.device)
        wrap_triton(bwd_dq_kernel)[(triton.cdiv(L, bm), B * H, splits)](
            q, k, v, grad_out, lse2, delta, dq_part, mask_t, klen, qlen,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            dq_part.stride(1), dq_part.stride(2), dq_part.stride(3), dq_part.stride(0),
            *tail, per_split, *buckets, scale, scale * LOG2E, window_left, window_right,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, **common)
        dq.copy_(dq_part.sum(0))
        return dq, dk, dv
    kernel, fixed = configs.launcher(bwd_dq_kernel, "dq", d_pad, elem, INTERPRET, _long(L, S), smem,
                                     mask is not None)
    grid = lambda META: (triton.cdiv(L, META["BLOCK_M"]), B * H, 1)  # noqa: E731
    wrap_triton(kernel)[grid](
        q, k, v, grad_out, lse2, delta, dq, mask_t, klen, qlen,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), 0,
        *tail, max(S, 1), *buckets, scale, scale * LOG2E, window_left, window_right,
        **common, **(fixed or {}))
    return dq, dk, dv


_backward, _setup_context = recompute_autograd(lambda: torch.ops.effattn.triton_bwd)
triton_fwd.register_autograd(_backward, setup_context=_setup_context)
_no_backward, _no_context = not_differentiable_autograd()
triton_bwd.register_autograd(_no_backward, setup_context=_no_context)
_call_fwd = EagerCaller(torch.ops.effattn.triton_fwd.default, _backward, _setup_context)


def fwd(spec, fp32_ieee: bool) -> Tuple[Tensor, Tensor]:
    """Runs effattn::triton_fwd (differentiable) on a normalised AttentionSpec."""
    left, right = spec.window
    if spec.is_causal:  # top-left aligned, as SDPA's
        right = 0 if right < 0 else min(right, 0)
    return _call_fwd(spec.q, spec.k, spec.v, spec.mask, spec.key_lengths, spec.query_lengths, spec.scale,
                     left, right, fp32_ieee)
