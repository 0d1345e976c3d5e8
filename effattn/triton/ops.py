"""The Triton kernels as PyTorch ops: ``effattn::triton_fwd``, ``effattn::triton_fwd_stats``
and ``effattn::triton_bwd``, defined with ``torch.library.triton_op`` so that
``torch.compile(fullgraph=True)`` traces through them (the kernels are
launched with ``wrap_triton``); effattn/ops.py's OpFamily registers the
recompute backward as the forward's autograd formula, as for the C++ ops.

Arguments: the op layer's (effattn/ops.py), the same as the C++ ops': the
canonical spec's tensors, the band's sides (None: unbounded) and the variant
bits of effattn/backends/triton.py (FP32_IEEE, TMA). Outputs follow the
input layouts (as the C++ ops).
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

from ..backends.triton import FP32_IEEE, TMA
from ..ops import OpFamily, check_op_args, empty_in_layout_of
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


def _key_splits(n_programs: int, L: int, S: int, device: torch.device, d_pad: int, elem: int, smem: int,
                masked: bool):
    """The split-keys launch of the forward and dQ kernels (flash-decoding) for short queries:
    (splits, keys per split, (BLOCK_M, BLOCK_N, warps, stages)), or (1, S, None) for the plain one."""
    splits = _num_splits(n_programs, S, device) if L <= configs.SHORT_QUERY_ROWS else 1
    if splits == 1:
        return 1, S, None
    per_split = triton.cdiv(triton.cdiv(S, splits), SPLIT_CHUNK) * SPLIT_CHUNK
    return triton.cdiv(S, per_split), per_split, configs.short(d_pad, elem, INTERPRET, smem, masked)


def _strides(t: Tensor):
    """The (batch, head, row) strides of a (B, H, rows, dim) tensor, as every kernel takes
    them (the last dim is contiguous); for (splits, B, H, rows, dim) per-split partials, those
    and then the split stride. (The kernels get the whole partials tensor, not a view of split
    0: under torch.compile a kernel's written argument must be what it writes.)"""
    if t.dim() == 5:
        return t.stride(1), t.stride(2), t.stride(3), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def _common(q: Tensor, k: Tensor, v: Tensor, key_lengths, query_lengths, mask, variant: int, backward=None):
    """(sizes, the constexprs every kernel takes, the mask and lengths arguments)."""
    check_op_args(q, k, v, mask, key_lengths, query_lengths, backward)
    B, H, L, E = q.shape
    HKV, S, EV = k.shape[1], k.shape[2], v.shape[3]
    meta = dict(
        HEAD_DIM=E, HEAD_DIM_PAD=_pad(E), HEAD_DIM_V=EV, HEAD_DIM_V_PAD=_pad(EV),
        HAS_KEY_LENGTHS=key_lengths is not None, HAS_QUERY_LENGTHS=query_lengths is not None,
        MASK_KIND=0 if mask is None else (1 if mask.dtype == torch.bool else 2),
        UPCAST=INTERPRET and q.dtype in (torch.bfloat16, torch.float16),
        PRECISION="ieee" if q.dtype == torch.float32 and variant & FP32_IEEE else "tf32",
    )
    # unused pointer slots get any tensor (never read: their flags are off); a bool mask is read as uint8
    pointers = (q if mask is None else mask.view(torch.uint8) if mask.dtype == torch.bool else mask,
                key_lengths if key_lengths is not None else q, query_lengths if query_lengths is not None else q)
    mask_strides = (0, 0, 0, 0) if mask is None else tuple(mask.stride())
    return (B, H, HKV, L, S, EV), meta, pointers, mask_strides


def _long(L, S) -> bool:
    """Whether the interpreter takes its long-sequence blocks. Asked only under the
    interpreter: under torch.compile with dynamic shapes, max(L, S) would add a guard
    on which of the two is longer, and so a recompile when that changes."""
    return INTERPRET and max(L, S) > 256


def _window(side: Optional[int]) -> int:
    """None (unbounded) becomes a bound no index reaches, so the kernels need no flag."""
    return UNBOUNDED if side is None else max(-UNBOUNDED, min(side, UNBOUNDED))


def _use_tma(q: Tensor, k: Tensor, v: Tensor, head_dim_pad: int, head_dim_v_pad: int, variant: int) -> bool:
    """Whether the forward's interior blocks load K and V through tensor descriptors.

    Opt-in (the variant's TMA bit: effattn.config.triton_tma) until measured
    on a GPU: tested for correctness under the interpreter, and compiled for
    sm_90 on the CPU (bench/dev/triton_aot.py), but never run on a GPU. Needs
    Hopper or newer (or the interpreter), power-of-two head dims, and TMA's
    alignment: 16-byte aligned bases and 16-byte multiples for every stride
    but the last. Not under torch.compile (device-side descriptors need
    triton.set_allocator's scratch memory, which a compiled graph does not
    set up)."""
    if not variant & TMA or torch.compiler.is_compiling() or is_fake(q):
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


def _forward(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], key_lengths: Optional[Tensor],
             query_lengths: Optional[Tensor], scale: float, window_left: Optional[int], window_right: Optional[int],
             variant: int, with_stats: bool):
    """triton_fwd's body: (out, lse), and the (2, B, H, L) stats with ``with_stats`` (never split)."""
    (B, H, HKV, L, S, EV), meta, mask_and_lengths, mask_strides = _common(q, k, v, key_lengths, query_lengths,
                                                                          mask, variant)
    out = empty_in_layout_of(q, (B, H, L, EV), q.dtype)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    stats = torch.empty((2, B, H, L), dtype=torch.float32, device=q.device) if with_stats else None
    if B * H * L == 0:
        return out, lse, stats
    elem = q.element_size()
    # configs are sized by the wider head dim and the device's shared memory per block
    d_pad, smem = max(meta["HEAD_DIM_PAD"], meta["HEAD_DIM_V_PAD"]), configs.smem_limit(q.device)
    semantics = (scale * LOG2E, _window(window_left), _window(window_right))
    splits, per_split, short = (1, S, None) if with_stats else _key_splits(B * H, L, S, q.device, d_pad, elem,
                                                                           smem, mask is not None)
    if splits > 1:
        bm, bn, w, st = short
        o_part = torch.empty((splits, B, H, L, EV), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((splits, B, H, L), dtype=torch.float32, device=q.device)
        wrap_triton(attn_fwd_kernel)[(triton.cdiv(L, bm), B * H, splits)](
            q, k, v, o_part, lse_part, lse_part, *mask_and_lengths,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o_part), lse_part.stride(0), *mask_strides,
            H, H // HKV, L, S, per_split, _bucket(L), _bucket(S), *semantics,
            # every argument, defaults included: torch.compile reads the kernel's IR for the
            # tensors it writes, and without one it assumes all (and copies q, k, v first)
            USE_TMA=False, STATS=False, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, **meta)
        wrap_triton(merge_splits_kernel)[(triton.cdiv(L, 16), B * H)](
            o_part, lse_part, out, lse, *_strides(out), H, L, splits,
            HEAD_DIM_V=EV, HEAD_DIM_V_PAD=meta["HEAD_DIM_V_PAD"], BLOCK_M=16, num_warps=4)
        return out, lse, stats
    use_tma = _use_tma(q, k, v, meta["HEAD_DIM_PAD"], meta["HEAD_DIM_V_PAD"], variant)
    if use_tma:
        triton.set_allocator(_tma_scratch(q.device))
    kernel, fixed = configs.launcher(attn_fwd_kernel, "fwd", d_pad, elem, INTERPRET, _long(L, S), smem,
                                     mask is not None)
    grid = lambda META: (triton.cdiv(L, META["BLOCK_M"]), B * H, 1)  # noqa: E731
    wrap_triton(kernel)[grid](
        q, k, v, out, lse, lse if stats is None else stats, *mask_and_lengths,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), 0, 0, *mask_strides,
        H, H // HKV, L, S, max(S, 1), _bucket(L), _bucket(S), *semantics,
        USE_TMA=use_tma, STATS=with_stats, **meta, **(fixed or {}))
    return out, lse, stats


@triton_op("effattn::triton_fwd", mutates_args=())
def triton_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], key_lengths: Optional[Tensor],
               query_lengths: Optional[Tensor], scale: float, window_left: Optional[int],
               window_right: Optional[int], variant: int) -> Tuple[Tensor, Tensor]:
    out, lse, _ = _forward(q, k, v, mask, key_lengths, query_lengths, scale, window_left, window_right, variant,
                           False)
    return out, lse


@triton_op("effattn::triton_fwd_stats", mutates_args=())
def triton_fwd_stats(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], key_lengths: Optional[Tensor],
                     query_lengths: Optional[Tensor], scale: float, window_left: Optional[int],
                     window_right: Optional[int], variant: int) -> Tuple[Tensor, Tensor, Tensor]:
    """triton_fwd and the (2, B, H, L) float32 stats of csrc/ops.cpp's fwd_stats."""
    return _forward(q, k, v, mask, key_lengths, query_lengths, scale, window_left, window_right, variant, True)


@triton_op("effattn::triton_bwd", mutates_args=())
def triton_bwd(grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
               lse: Tensor, mask: Optional[Tensor], key_lengths: Optional[Tensor],
               query_lengths: Optional[Tensor], scale: float, window_left: Optional[int],
               window_right: Optional[int], variant: int) -> Tuple[Tensor, Tensor, Tensor]:
    (B, H, HKV, L, S, EV), meta, mask_and_lengths, mask_strides = _common(
        q, k, v, key_lengths, query_lengths, mask, variant,
        dict(grad_out=grad_out, grad_lse=grad_lse, out=out, lse=lse))
    E = q.shape[3]
    dq = empty_in_layout_of(q, (B, H, L, E), q.dtype)
    dk = empty_in_layout_of(k, (B, HKV, S, E), k.dtype)
    dv = empty_in_layout_of(v, (B, HKV, S, EV), v.dtype)
    if B * H * L == 0 or S == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    elem = q.element_size()
    d_pad, smem = max(meta["HEAD_DIM_PAD"], meta["HEAD_DIM_V_PAD"]), configs.smem_limit(q.device)
    semantics = (scale, scale * LOG2E, _window(window_left), _window(window_right))
    buckets = (_bucket(L), _bucket(S))

    # ---- 1. delta and lse2, (B, H, L) float32 each ----
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    lse2 = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    dlse = grad_lse.to(torch.float32).contiguous() if grad_lse is not None else lse
    wrap_triton(bwd_preprocess_kernel)[(triton.cdiv(L, 64), B * H)](
        out, grad_out, lse, dlse, delta, lse2, *_strides(out), *_strides(grad_out), H, L,
        HEAD_DIM_V=EV, HEAD_DIM_V_PAD=meta["HEAD_DIM_V_PAD"], BLOCK_M=64, HAS_DLSE=grad_lse is not None,
        num_warps=4)

    # ---- 2. dK, dV: one program per key block ----
    kernel, fixed = configs.launcher(bwd_dkdv_kernel, "dkdv", d_pad, elem, INTERPRET, _long(L, S), smem,
                                     mask is not None)
    grid = lambda META: (triton.cdiv(S, META["BLOCK_N"]), B * HKV)  # noqa: E731
    wrap_triton(kernel)[grid](
        q, k, v, grad_out, lse2, delta, dk, dv, *mask_and_lengths,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv), *mask_strides,
        H, HKV, H // HKV, L, S, *buckets, *semantics, **meta, **(fixed or {}))

    # ---- 3. dQ: one program per query block (and key split, for short queries) ----
    splits, per_split, short = _key_splits(B * H, L, S, q.device, d_pad, elem, smem, mask is not None)
    if splits > 1:
        bm, bn, w, st = short
        dq_part = torch.empty((splits, B, H, L, E), dtype=torch.float32, device=q.device)
        wrap_triton(bwd_dq_kernel)[(triton.cdiv(L, bm), B * H, splits)](
            q, k, v, grad_out, lse2, delta, dq_part, *mask_and_lengths,
            *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq_part), *mask_strides,
            H, H // HKV, L, S, per_split, *buckets, *semantics,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, **meta)
        dq.copy_(dq_part.sum(0))
        return dq, dk, dv
    kernel, fixed = configs.launcher(bwd_dq_kernel, "dq", d_pad, elem, INTERPRET, _long(L, S), smem,
                                     mask is not None)
    grid = lambda META: (triton.cdiv(L, META["BLOCK_M"]), B * H, 1)  # noqa: E731
    wrap_triton(kernel)[grid](
        q, k, v, grad_out, lse2, delta, dq, *mask_and_lengths,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq), 0, *mask_strides,
        H, H // HKV, L, S, max(S, 1), *buckets, *semantics, **meta, **(fixed or {}))
    return dq, dk, dv


#: The Triton ops, wired by the shared op layer (autograd, eager caller) as the C++ ops are.
TRITON = OpFamily(torch.ops.effattn.triton_fwd.default, torch.ops.effattn.triton_bwd.default,
                  torch.ops.effattn.triton_fwd_stats.default)
