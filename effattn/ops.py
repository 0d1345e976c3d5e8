"""The one op layer, shared by every op family.

effattn's kernels are custom ops in families of two, a forward and its
recompute backward: the C++ ops ``effattn::fwd`` / ``effattn::bwd`` (declared
in csrc/ops.cpp; the CPU and CUDA kernels) and the Triton ops
``effattn::triton_fwd`` / ``effattn::triton_bwd`` (effattn/triton/ops.py).
Every family takes the same arguments with the same meaning::

    fwd(q, k, v, mask, key_lengths, query_lengths, scale, window_left, window_right, variant)
        -> (out, lse)
    bwd(grad_out, grad_lse, q, k, v, out, lse, mask, key_lengths, query_lengths, scale,
        window_left, window_right, variant) -> (grad_q, grad_k, grad_v)

and, for the backends that declare the STATS feature, the forward with the attention
statistics of every query row (effattn.diagnostics.attention_stats)::

    fwd_stats(<fwd's arguments>) -> (out, lse, stats)   # stats (2, B, Hq, L): entropy, max weight

whose out and lse have fwd's autograd (stats have no gradient),
in the canonical layout of effattn/spec.py; the window sides are the spec's
band (causal already folded in; None for an unbounded side, any int
otherwise) and ``variant`` is the kernel variant the backend chose (its
meaning is the family's: see the backend).

This module holds what the families share: the contract check
(``check_op_args``, for the fake kernels and the Triton ops; csrc/host_params.h
checks the same in C++), the output layout rule (``empty_in_layout_of``), the
recompute autograd, and the eager caller; ``OpFamily`` wires them for one
pair of ops. Importing it loads ``effattn._C``; ``LOAD_ERROR`` holds why that
failed (the cpu backend then reports it as its reason).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .spec import STATS

try:
    from . import _C  # noqa: F401  (loads the library: registers the ops)

    LOAD_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    LOAD_ERROR = f"effattn._C could not be loaded ({exc}); reinstall effattn"


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_in_layout_of(like: torch.Tensor, sizes: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """The layout rule of csrc/host_params.h (keep the two in step): dims 0..2
    in ``like``'s stride order, size-1 dims outermost, last dim contiguous."""
    def key(d):
        return (0, 0) if like.shape[d] <= 1 else (1, -like.stride(d))

    order = sorted(range(3), key=key)
    t = like.new_empty([sizes[d] for d in order] + [sizes[3]], dtype=dtype)
    inverse = [0, 0, 0, 3]
    for i, d in enumerate(order):
        inverse[d] = i
    return t.permute(*inverse)


def _below_autograd():
    """A guard under which ops dispatch straight to their kernels."""
    return torch._C._AutoDispatchBelowAutograd()


DOUBLE_BACKWARD_ERROR = (
    "effattn: attention's backward is not itself differentiable, so a gradient of a gradient through it "
    "(double backward, e.g. a gradient penalty) is not supported; effattn.attention(..., backend='reference') "
    "supports it")

# The forward's arguments after (q, k, v): the optional tensors, then the flags.
_TENSOR_ARGS = 6  # q, k, v, mask, key_lengths, query_lengths


class OpFamily:
    """A forward op and its recompute backward, taking the arguments of the module
    docstring. Registers, once:

    * the forward's autograd: setup_context saves q, k, v, out, lse and the optional
      tensors (nothing of size L x S) and the backward calls the backward op;
    * the backward op's autograd: differentiating it raises DOUBLE_BACKWARD_ERROR, so
      gradients taken with create_graph=True carry a graph that fails loudly when
      differentiated, rather than none (their dependence on q, k, v silently dropped);
    * an eager caller that skips torch.library's autograd wrapper, which costs tens of
      microseconds per call: below autograd when no input needs a gradient, else a
      plain autograd.Function made of the same backward and setup_context. Under
      torch.compile the op itself is called, so graphs hold the custom op and its
      registered autograd.
    """

    def __init__(self, fwd_op, bwd_op, stats_op=None):
        self.fwd_op, self.bwd_op, self.stats_op = fwd_op, bwd_op, stats_op
        torch.library.register_autograd(fwd_op._schema.name, self._backward, setup_context=self._setup_context)
        torch.library.register_autograd(bwd_op._schema.name, self._double_backward, setup_context=self._no_context)
        # The bound C++ callables behind the OpOverloads (what their __call__ calls), for the
        # eager calls below autograd: one Python frame less per call.
        self._fwd_raw = fwd_op._op
        self._function = self._eager_function(self._fwd_raw)
        if stats_op is not None:  # the forward with the stats output: the same backward
            torch.library.register_autograd(stats_op._schema.name, self._backward, setup_context=self._setup_context)
            self._stats_raw = stats_op._op
            self._stats_function = self._eager_function(self._stats_raw)

    def _eager_function(self, raw):
        """The plain autograd.Function around a forward's raw callable (see the class docstring)."""
        family = self

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                with _below_autograd():
                    output = raw(*args)
                family._setup_context(ctx, args, output)
                return output

            @staticmethod
            def backward(ctx, grad_out, grad_lse, *no_grad_stats):
                if torch.is_grad_enabled():
                    # create_graph=True: the backward op records its own autograd
                    # (_double_backward), so a second backward raises.
                    return family._backward(ctx, grad_out, grad_lse)
                with _below_autograd():  # the usual case: skip that wrapper's cost too
                    return family._backward(ctx, grad_out, grad_lse)

        return Function

    @staticmethod
    def _setup_context(ctx, inputs, output):
        out, lse = output[:2]
        if len(output) == 3:  # the stats output: a diagnostic, with no gradient
            ctx.mark_non_differentiable(output[2])
        # An unused lse gets None as its gradient, not a materialised zero tensor
        # (the backward ops take grad_lse as optional); likewise out.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs[:3], out, lse, *inputs[3:_TENSOR_ARGS])
        ctx.flags = inputs[_TENSOR_ARGS:]

    def _backward(self, ctx, grad_out, grad_lse, *no_grad_stats):
        q, k, v, out, lse, mask, key_lengths, query_lengths = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        elif grad_out.stride(-1) != 1 and grad_out.shape[-1] > 1:
            grad_out = grad_out.contiguous()  # e.g. the stride-0 gradient of out.sum()
        dq, dk, dv = self.bwd_op(grad_out, grad_lse, q, k, v, out, lse, mask, key_lengths, query_lengths,
                                 *ctx.flags)
        return (dq, dk, dv) + (None,) * (_TENSOR_ARGS - 3 + len(ctx.flags))

    @staticmethod
    def _no_context(ctx, inputs, output):
        pass

    @staticmethod
    def _double_backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)

    def __call__(self, spec, variant: int):
        """(out, lse) of the forward op on a normalised AttentionSpec, differentiable; and
        stats (not differentiable) when the spec asks for them (its STATS feature)."""
        args = (spec.q, spec.k, spec.v, spec.mask, spec.key_lengths, spec.query_lengths, spec.scale,
                spec.band[0], spec.band[1], variant)
        if spec.features & STATS:
            op, function, raw = self.stats_op, self._stats_function, self._stats_raw
        else:
            op, function, raw = self.fwd_op, self._function, self._fwd_raw
        if torch.compiler.is_compiling():
            return op(*args)
        if torch.is_grad_enabled() and (spec.q.requires_grad or spec.k.requires_grad or spec.v.requires_grad):
            return function.apply(*args)
        with _below_autograd():
            return raw(*args)


_FLOATING = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _fail(msg: str):
    raise RuntimeError("effattn: " + msg)


def check_op_args(q, k, v, mask, key_lengths, query_lengths, backward=None):
    """The ops' contract on their tensors, as csrc/host_params.h checks it for effattn::fwd
    and effattn::bwd: for their fake kernels (torch.compile tracing, meta tensors) and for
    the Triton ops, whose kernels would otherwise read out of bounds. effattn.attention
    establishes it (effattn/spec.py); these checks are for direct calls of the ops.
    ``backward``: dict of grad_out, grad_lse, out, lse. Raises RuntimeError."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.dim() != 4:
            _fail(f"{name} must be 4-D (batch, heads, seq, dim), got {t.dim()} dims")
        if t.shape[3] > 1 and t.stride(3) != 1 and t.numel():  # (an empty tensor is never read)
            _fail(f"{name} must have a contiguous last dimension (stride 1), got stride {t.stride(3)}")
    if not k.dtype == v.dtype == q.dtype:
        _fail("query, key and value must have the same dtype")
    B, H, L, E = q.shape
    HKV, S = k.shape[1], k.shape[2]
    for name, t, dim, want, what in (("key", k, 0, B, "batch of query"), ("value", v, 0, B, "batch of query"),
                                     ("value", v, 1, HKV, "heads of key"),
                                     ("value", v, 2, S, "sequence length of key"),
                                     ("key", k, 3, E, "head dim of query")):
        if t.shape[dim] != want:
            _fail(f"{name}.size({dim}) = {t.shape[dim]} but expected {want} ({what})")
    if (H % HKV if HKV else H):  # (no heads at all is an empty call)
        _fail(f"query heads ({H}) must be a multiple of key/value heads ({HKV})")
    named = {"key": k, "value": v, "attn_mask": mask, "key_lengths": key_lengths, "query_lengths": query_lengths}
    if mask is not None:
        if mask.dim() != 4 or tuple(mask.shape) != (B, H, L, S):
            _fail(f"attn_mask must be a 4-D broadcast view of ({B}, {H}, {L}, {S}) here, "
                  f"got {tuple(mask.shape)}")
        if mask.dtype not in (torch.bool, torch.float32, q.dtype):
            _fail("attn_mask must be bool, float32 or the dtype of query")
    for name, t in (("key_lengths", key_lengths), ("query_lengths", query_lengths)):
        if t is not None and (t.dtype != torch.int64 or tuple(t.shape) != (B,)):
            _fail(f"{name} must be int64 of shape ({B},) here (effattn.attention converts it), "
                  f"got {t.dtype} of shape {tuple(t.shape)}")
    if backward is not None:
        rows = (B, H, L)
        for name, t, want, what in (("out", backward["out"], rows + (v.shape[3],), "shape of the forward output"),
                                    ("grad_out", backward["grad_out"], rows + (v.shape[3],),
                                     "shape of the forward output"),
                                    ("lse", backward["lse"], rows, "rows of the forward output"),
                                    ("grad_lse", backward["grad_lse"], rows, "rows of the forward output")):
            if t is None:
                continue
            if t.dim() != len(want):
                _fail(f"{name} must be {len(want)}-D (batch, heads, seq{', dim' if len(want) == 4 else ''}), "
                      f"got {t.dim()} dims")
            for dim, (got, expected) in enumerate(zip(t.shape, want)):
                if got != expected:
                    _fail(f"{name}.size({dim}) = {got} but expected {expected} ({what})")
            named[name] = t
        out, grad_out, lse, grad_lse = (backward[n] for n in ("out", "grad_out", "lse", "grad_lse"))
        for name, t in (("out", out), ("grad_out", grad_out)):
            if t.dtype != q.dtype:
                _fail(f"{name} must have the dtype of query, {q.dtype}, got {t.dtype}")
            if t.shape[3] > 1 and t.stride(3) != 1 and t.numel():
                _fail(f"{name} must have a contiguous last dimension (stride 1), got stride {t.stride(3)}")
        if lse.dtype != accum_dtype(q.dtype) or not lse.is_contiguous():
            _fail(f"lse must be the forward's contiguous {accum_dtype(q.dtype)} tensor")
        if grad_lse is not None and grad_lse.dtype not in _FLOATING:
            _fail(f"grad_lse must have a floating-point dtype, got {grad_lse.dtype}")
    for name, t in named.items():
        if t is not None and t.device != q.device:
            _fail(f"{name} is on {t.device} but query is on {q.device}")



if LOAD_ERROR is None:

    @torch.library.register_fake("effattn::fwd")
    def _fwd_fake(q, k, v, mask, key_lengths, query_lengths, scale, window_left, window_right, variant):
        check_op_args(q, k, v, mask, key_lengths, query_lengths)
        B, H, L, _ = q.shape
        out = empty_in_layout_of(q, (B, H, L, v.shape[3]), q.dtype)
        lse = q.new_empty((B, H, L), dtype=accum_dtype(q.dtype))
        return out, lse

    @torch.library.register_fake("effattn::fwd_stats")
    def _fwd_stats_fake(q, k, v, mask, key_lengths, query_lengths, scale, window_left, window_right, variant):
        out, lse = _fwd_fake(q, k, v, mask, key_lengths, query_lengths, scale, window_left, window_right, variant)
        return out, lse, q.new_empty((2, *lse.shape), dtype=lse.dtype)

    @torch.library.register_fake("effattn::bwd")
    def _bwd_fake(grad_out, grad_lse, q, k, v, out, lse, mask, key_lengths, query_lengths, scale,
                  window_left, window_right, variant):
        check_op_args(q, k, v, mask, key_lengths, query_lengths,
                      dict(grad_out=grad_out, grad_lse=grad_lse, out=out, lse=lse))
        return (empty_in_layout_of(q, q.shape, q.dtype), empty_in_layout_of(k, k.shape, k.dtype),
                empty_in_layout_of(v, v.shape, v.dtype))

    #: The C++ ops: the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda); fwd_stats
    #: has a CPU kernel only (the cuda backend does not declare the stats).
    CPP = OpFamily(torch.ops.effattn.fwd.default, torch.ops.effattn.bwd.default,
                   torch.ops.effattn.fwd_stats.default)
