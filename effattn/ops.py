"""Python registrations for the C++ ops declared in csrc/ops.cpp.

* ``register_fake`` for ``effattn::fwd`` and ``effattn::bwd`` so that
  ``torch.compile`` and other tracers see shapes, dtypes and strides;
* ``register_autograd`` for ``effattn::fwd`` so that its backward is the
  recompute kernel ``effattn::bwd`` (the forward saves only out and the lse).
* ``EagerCaller``: how the backends call such an op, skipping torch.library's
  costly autograd wrapper in eager mode (same backward, same saved tensors).

Importing this module loads ``effattn._C``; ``LOAD_ERROR`` holds why that
failed (the cpu backend then reports it as its reason).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

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


def recompute_autograd(bwd_op):
    """(backward, setup_context) for a forward op whose inputs are
    (q, k, v, mask, key_lengths, query_lengths, *flags) and outputs (out, lse):
    it saves those and calls ``bwd_op()(grad_out, grad_lse, q, k, v, out, lse,
    mask, key_lengths, query_lengths, *flags)`` -> (dq, dk, dv). Shared by the
    C++ ops and the Triton ops."""
    def setup_context(ctx, inputs, output):
        out, lse = output
        # An unused lse gets None as its gradient, not a materialised zero
        # tensor (the backward ops take grad_lse as optional); likewise out.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs[:3], out, lse, *inputs[3:6])
        ctx.flags = tuple(inputs[6:])

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, mask, key_lengths, query_lengths = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        elif grad_out.shape[-1] > 1 and grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()  # e.g. the stride-0 gradient of out.sum()
        dq, dk, dv = bwd_op()(grad_out, grad_lse, q, k, v, out, lse, mask, key_lengths, query_lengths,
                              *ctx.flags)
        return (dq, dk, dv) + (None,) * (3 + len(ctx.flags))

    return backward, setup_context


DOUBLE_BACKWARD_ERROR = (
    "effattn: attention's backward is not itself differentiable, so a gradient of a gradient through it "
    "(double backward, e.g. a gradient penalty) is not supported; effattn.attention(..., backend='reference') "
    "supports it")


def not_differentiable_autograd():
    """(backward, setup_context) for a backward op: computing its gradient raises
    DOUBLE_BACKWARD_ERROR. Registered so that gradients taken with
    create_graph=True carry a graph that fails loudly when differentiated,
    rather than none (their dependence on q, k, v silently dropped)."""
    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)

    return backward, setup_context


def _below_autograd():
    """A guard under which ops dispatch straight to their kernels."""
    return torch._C._AutoDispatchBelowAutograd()


class EagerCaller:
    """Calls a forward op registered with ``recompute_autograd`` in eager mode
    without torch.library's autograd wrapper, which costs tens of microseconds
    per call (about 65 us of the 95 us of a small effattn::fwd call with grads
    on the 2-core CPU machine): below autograd when no input needs a gradient,
    else through a plain autograd.Function made of the same backward and
    setup_context. Under torch.compile the op itself is called, so graphs hold
    the custom op and its registered autograd."""

    def __init__(self, fwd_op, backward, setup_context):
        self.fwd_op = fwd_op

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(*args):
                with _below_autograd():
                    return fwd_op(*args)

            @staticmethod
            def setup_context(ctx, inputs, output):
                setup_context(ctx, inputs, output)

            @staticmethod
            def backward(ctx, grad_out, grad_lse):
                if torch.is_grad_enabled():
                    # create_graph=True: the backward op records its own autograd
                    # (not_differentiable_autograd), so a second backward raises.
                    return backward(ctx, grad_out, grad_lse)
                with _below_autograd():  # the usual case: skip that wrapper's cost too
                    return backward(ctx, grad_out, grad_lse)

        self.function = Function

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.fwd_op(*args)
        if torch.is_grad_enabled() and any(t.requires_grad for t in args[:3]):
            return self.function.apply(*args)
        with _below_autograd():
            return self.fwd_op(*args)


_FLOATING = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _fail(msg: str):
    raise RuntimeError("effattn: " + msg)


def check_op_args(q, k, v, mask, key_lengths, query_lengths, window, backward=None):
    """The ops' contract on their tensors, as csrc/host_params.h checks it for effattn::fwd
    and effattn::bwd: for their fake kernels (torch.compile tracing, meta tensors) and for
    the Triton ops, whose kernels would otherwise read out of bounds. effattn.attention
    establishes it (effattn/spec.py); these checks are for direct calls of the ops.
    ``window``: (left, right); ``backward``: dict of grad_out, grad_lse, out, lse.
    Raises RuntimeError."""
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
    if min(window) < -1:
        _fail("window sizes must be >= 0, or -1 for unbounded")
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
    def _fwd_fake(q, k, v, mask, key_lengths, query_lengths, scale, is_causal, window_left, window_right):
        check_op_args(q, k, v, mask, key_lengths, query_lengths, (window_left, window_right))
        B, H, L, _ = q.shape
        out = empty_in_layout_of(q, (B, H, L, v.shape[3]), q.dtype)
        lse = q.new_empty((B, H, L), dtype=accum_dtype(q.dtype))
        return out, lse

    @torch.library.register_fake("effattn::bwd")
    def _bwd_fake(grad_out, grad_lse, q, k, v, out, lse, mask, key_lengths, query_lengths, scale,
                  is_causal, window_left, window_right):
        check_op_args(q, k, v, mask, key_lengths, query_lengths, (window_left, window_right),
                      dict(grad_out=grad_out, grad_lse=grad_lse, out=out, lse=lse))
        return (empty_in_layout_of(q, q.shape, q.dtype), empty_in_layout_of(k, k.shape, k.dtype),
                empty_in_layout_of(v, v.shape, v.dtype))

    _backward, _setup_context = recompute_autograd(lambda: torch.ops.effattn.bwd)
    torch.library.register_autograd("effattn::fwd", _backward, setup_context=_setup_context)
    _no_backward, _no_context = not_differentiable_autograd()
    torch.library.register_autograd("effattn::bwd", _no_backward, setup_context=_no_context)
    _call_fwd = EagerCaller(torch.ops.effattn.fwd.default, _backward, _setup_context)


def fwd(spec) -> "tuple[torch.Tensor, torch.Tensor]":
    """Runs effattn::fwd (differentiable) on a normalised AttentionSpec."""
    return _call_fwd(spec.q, spec.k, spec.v, spec.mask, spec.key_lengths, spec.query_lengths,
                     spec.scale, spec.is_causal, spec.window_left, spec.window_right)
