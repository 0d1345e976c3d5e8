"""One description of an attention call, shared by every backend.

``make_spec`` validates the arguments of :func:`effattn.attention` (every
user-facing check lives here, with errors that name the tensor, the dimension
and what was expected), normalises them to the canonical form that every
backend reads, and derives, once, everything a backend needs to know about the
call. Nothing below it (backends, op layer, kernels) re-derives any of it.

The canonical form:

* ``q`` (B, Hq, L, E), ``k`` (B, Hkv, S, E), ``v`` (B, Hkv, S, Ev): views of
  the inputs (no copies) with a contiguous last dim and any other strides;
* ``mask``: a broadcast (stride-0) view of shape (B, Hq, L, S), never expanded
  in memory, or None;
* ``key_lengths`` / ``query_lengths``: int64 tensors of shape (B,), or None;
* ``band`` = (left, right): query row i may see key j iff
  ``i - left <= j <= i + right``, None for an unbounded side. Causal masking
  is folded in here and only here (top-left aligned, as SDPA's ``is_causal``
  and ``causal_upper_left``; bottom-right aligned, as FlashAttention's and
  SDPA's ``causal_lower_right``, shifts the diagonal by S - L). Sides may be
  negative (bottom-right causal with L > S: the first L - S rows see nothing).
* ``features``: a bit set of the FEATURES below that the call needs. A backend
  declares the features it serves (effattn/backends/base.py) and is refused,
  in FEATURES' words, every one it does not declare.

Leading batch dims of the inputs are flattened into B; ``batch_shape`` keeps
them so outputs are returned in the caller's shape.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Whether any autocast is on: one C call (torch.is_autocast_enabled(device_type) costs a
# microsecond; dynamo traces this one too).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)

# ---- features: what a call needs beyond plain softmax(Q K^T * scale) V ------
# Bits, so that "does this backend serve this call" is one AND on the hot path.
CAUSAL = 1 << 0              # is_causal / causal_upper_left: top-left aligned
CAUSAL_LOWER_RIGHT = 1 << 1  # causal_lower_right: bottom-right aligned
WINDOW = 1 << 2              # window=(left, right) with a bounded side
NEGATIVE_BAND = 1 << 3       # a band side < 0 (bottom-right causal with L > S)
KEY_LENGTHS = 1 << 4
QUERY_LENGTHS = 1 << 5
BOOL_MASK = 1 << 6
FLOAT_MASK = 1 << 7
MASK_BROADCAST = 1 << 8      # a mask read through a stride-0 dim (e.g. (B, 1, 1, S))
MASK_GRAD = 1 << 9           # the mask requires grad (and grad mode is on)
GQA = 1 << 10                # fewer key/value heads than query heads
VALUE_HEAD_DIM = 1 << 11     # Ev != E
RETURN_LSE = 1 << 12
DROPOUT = 1 << 13
STATS = 1 << 14              # per-row attention statistics (effattn.diagnostics.attention_stats)

# How a refusal words each feature: "does not support <words>".
FEATURES = {
    CAUSAL: "causal masking (is_causal)",
    CAUSAL_LOWER_RIGHT: "bottom-right aligned causal masking (causal_lower_right)",
    WINDOW: "a local window (window=)",
    NEGATIVE_BAND: "a band with a negative side (bottom-right causal with more queries than keys)",
    KEY_LENGTHS: "key_lengths",
    QUERY_LENGTHS: "query_lengths",
    BOOL_MASK: "a bool attn_mask",
    FLOAT_MASK: "a float attn_mask",
    MASK_BROADCAST: "an attn_mask that broadcasts",
    MASK_GRAD: "the gradient of attn_mask (the mask requires grad)",
    GQA: "grouped-query attention (enable_gqa with fewer key/value heads)",
    VALUE_HEAD_DIM: "a value head dim that differs from the query's",
    RETURN_LSE: "returning the log-sum-exp (return_lse=True)",
    DROPOUT: "dropout (dropout_p > 0)",
    STATS: "attention statistics (effattn.diagnostics.attention_stats)",
}
ALL_FEATURES = sum(FEATURES)


def feature_words(bits: int):
    """The FEATURES words of each bit set in ``bits``, in FEATURES' order."""
    return [words for bit, words in FEATURES.items() if bits & bit]


class AttentionSpec:
    """A normalised, validated attention call (see the module docstring).
    Treat it as immutable; ``replace`` makes a changed copy."""

    __slots__ = ("q", "k", "v", "mask", "key_lengths", "query_lengths", "scale", "band", "dropout_p",
                 "features", "batch_shape", "heads_in_shape", "mask_needs_grad")

    def __init__(self, q, k, v, mask, key_lengths, query_lengths, scale, band, dropout_p, features,
                 batch_shape, heads_in_shape, mask_needs_grad):
        self.q, self.k, self.v = q, k, v
        self.mask = mask
        self.key_lengths, self.query_lengths = key_lengths, query_lengths
        self.scale = scale
        self.band = band
        self.dropout_p = dropout_p
        self.features = features
        self.batch_shape = batch_shape  # the caller's leading dims (heads dim excluded)
        self.heads_in_shape = heads_in_shape  # whether the caller's tensors had a heads dim
        self.mask_needs_grad = mask_needs_grad

    def replace(self, **changes) -> "AttentionSpec":
        fields = {name: getattr(self, name) for name in self.__slots__}
        fields.update(changes)
        return AttentionSpec(**fields)

    # ---- derived sizes -------------------------------------------------------
    @property
    def heads_q(self) -> int:
        return self.q.shape[1]

    @property
    def heads_kv(self) -> int:
        return self.k.shape[1]

    @property
    def seqlen_q(self) -> int:
        return self.q.shape[2]

    @property
    def seqlen_k(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def head_dim_v(self) -> int:
        return self.v.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def device_type(self) -> str:
        """"cpu", "cuda", ...: the backends' test, without building a torch.device."""
        q = self.q
        return "cpu" if q.is_cpu else ("cuda" if q.is_cuda else q.device.type)

    def needs_backward(self) -> bool:
        """Whether autograd will call the backward of this call."""
        return torch.is_grad_enabled() and (self.q.requires_grad or self.k.requires_grad or self.v.requires_grad)

    # ---- output shaping ------------------------------------------------------
    def to_caller_shape(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, L, ...) -> the caller's (*batch, [H,] L, ...)."""
        if self.heads_in_shape and len(self.batch_shape) == 1:  # the caller's was (B, H, L, ...)
            return t
        shape = (*self.batch_shape, *t.shape[1 if self.heads_in_shape else 2:])
        return t if t.shape == shape else t.reshape(shape)


def _fail(msg: str):
    raise ValueError(f"effattn.attention: {msg}")


def _check_tensors(query, key, value):
    """Types, nesting and ranks of q, k, v (the one place; the message names the tensor)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_nested:
            _fail(f"{name} is a nested tensor ({t.layout}); nested (jagged or strided) inputs are not "
                  "supported yet: pass padded tensors with key_lengths / query_lengths")
        if t.dim() < 2:
            _fail(f"{name} must have at least 2 dims (..., seq, dim), got shape {tuple(t.shape)}")
    if not (query.dim() == key.dim() == value.dim()):
        _fail(f"query, key and value must have the same number of dims, got "
              f"{query.dim()}, {key.dim()} and {value.dim()}")


def _to_canonical(t: torch.Tensor, heads_in_shape: bool, contiguous_last: bool = True) -> torch.Tensor:
    """(*batch, H, L, E) or (*batch, L, E) -> (B, H, L, E) as a view where possible.

    q, k, v need a contiguous last dim (a copy only when it is not); a mask is
    read through all four strides and is never copied."""
    if not heads_in_shape:
        t = t.unsqueeze(-3)
    nd = t.dim()
    if nd == 3:
        t = t.unsqueeze(0)
    elif nd > 4:
        t = t.flatten(0, nd - 4)  # a view unless the batch dims are not mergeable
    if contiguous_last and t.stride()[-1] != 1 and t.shape[-1] > 1:
        t = t.contiguous()  # the kernels need a contiguous last dim; all else stays strided
    return t


def _window_side(side: str, w) -> Optional[int]:
    if w is None:
        return None
    if isinstance(w, bool) or not isinstance(w, int):
        _fail(f"window {side} size must be an int >= 0 or None (unbounded), got {w!r}")
    if w < 0:
        _fail(f"window {side} size must be >= 0 (None means unbounded), got {w}")
    return int(w)


def _check_lengths(name: str, t, batch_shape: Tuple[int, ...], limit: int, limit_name: str,
                   device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be an integer tensor of shape {batch_shape or (1,)}, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        _fail(f"{name} must have an integer dtype, got {t.dtype}")
    if t.device != device:
        _fail(f"{name} is on {t.device} but query is on {device}")
    numel = math.prod(batch_shape)
    if tuple(t.shape) != tuple(batch_shape) and not (t.dim() == 1 and t.shape[0] == numel):
        _fail(f"{name} must have shape {tuple(batch_shape) or (1,)} (the batch dims of query), "
              f"got {tuple(t.shape)}")
    if t.dtype != torch.int64 or t.dim() != 1:
        t = t.reshape(numel).to(torch.int64)
    if not t.is_contiguous():
        t = t.contiguous()  # (B,) int64: a few bytes
    # Value checks read the data: cheap on the CPU, a host sync on a GPU and a
    # graph break under torch.compile, so only done eagerly for CPU tensors.
    # The CPU kernel checks again (so compiled calls are covered); the
    # reference treats any value as a plain comparison; GPU kernels must
    # tolerate out-of-range values without reading out of bounds.
    if t.device.type == "cpu" and numel > 0 and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(t)
        lo, hi = int(lo), int(hi)
        if lo < 0:
            _fail(f"{name} must be >= 0, got a minimum of {lo}")
        if hi > limit:
            _fail(f"{name} must be <= {limit_name} = {limit}, got a maximum of {hi}")
    return t


def _causal_bias(mask, L: int, S: int) -> bool:
    """SDPA's CausalBias (torch.nn.attention.bias.causal_upper_left / causal_lower_right):
    True for lower-right, False for upper-left; checked against the call's sizes."""
    from torch.nn.attention.bias import CausalVariant

    if (mask.seq_len_q, mask.seq_len_kv) != (L, S):
        _fail(f"attn_mask is a CausalBias for (seq_len_q, seq_len_kv) = ({mask.seq_len_q}, {mask.seq_len_kv}) "
              f"but query and key have L = {L}, S = {S}")
    return mask.variant == CausalVariant.LOWER_RIGHT


def _plain_tensor_type(t) -> bool:
    """A tensor whose data a kernel may read as it is: a plain tensor or parameter, or one of
    torch's own tracing tensors (fake and functional tensors, under torch.compile)."""
    cls = type(t)
    return cls is torch.Tensor or cls is torch.nn.Parameter or cls.__module__.startswith("torch._subclasses")


def make_spec(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
              scale: Optional[float] = None, enable_gqa: bool = False, *, key_lengths=None,
              query_lengths=None, window: Optional[Sequence[Optional[int]]] = None,
              return_lse: bool = False, return_stats: bool = False) -> AttentionSpec:
    # This runs on every call: it reads each tensor attribute once and builds nothing it does
    # not need (on tiny inputs the whole call is a few microseconds; bench/overhead.py).
    if not (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor)) \
            or query.is_nested or key.is_nested or value.is_nested:
        _check_tensors(query, key, value)
    qshape, kshape, vshape = query.shape, key.shape, value.shape
    nd = len(qshape)
    if nd < 2 or len(kshape) != nd or len(vshape) != nd:
        _check_tensors(query, key, value)
    device = query.device
    # Under torch.autocast, float32 inputs run in the autocast dtype, as SDPA's do. (is_cpu /
    # is_cuda: reading device.type builds a string, microseconds per call.)
    if _any_autocast():
        autocast = "cpu" if query.is_cpu else ("cuda" if query.is_cuda else None)
        if autocast is not None and torch.is_autocast_enabled(autocast):
            low = torch.get_autocast_dtype(autocast)
            query, key, value = (t.to(low) if t.dtype == torch.float32 else t for t in (query, key, value))
    dtype = query.dtype
    if key.dtype is not dtype or value.dtype is not dtype:
        name, t = ("key", key) if key.dtype is not dtype else ("value", value)
        _fail(f"{name} has dtype {t.dtype} but query has {dtype}; they must match")
    if key.device != device or value.device != device:
        name, t = ("key", key) if key.device != device else ("value", value)
        _fail(f"{name} is on {t.device} but query is on {device}")
    if dtype not in SUPPORTED_DTYPES:
        _fail(f"query dtype must be one of float16, bfloat16, float32, float64, got {dtype}")

    L, E = qshape[-2], qshape[-1]
    S = kshape[-2]
    Ev = vshape[-1]
    if kshape[-1] != E:
        _fail(f"key.size(-1) = {kshape[-1]} must equal query.size(-1) = {E} (the head dim)")
    if vshape[-2] != S:
        _fail(f"value.size(-2) = {vshape[-2]} must equal key.size(-2) = {S} (the key sequence length)")
    features = 0 if Ev == E else VALUE_HEAD_DIM

    # Heads: dim -3, for 4+ dim inputs, and for 3-dim ones under GQA (as SDPA).
    heads_in_shape = nd >= 4 or (nd == 3 and enable_gqa)
    if heads_in_shape:
        batch_shape = (qshape[0],) if nd == 4 else tuple(qshape[:-3])
        Hq, Hk, Hv = qshape[-3], kshape[-3], vshape[-3]
        if Hk != Hv:
            _fail(f"key.size(-3) = {Hk} and value.size(-3) = {Hv} must be equal (the key/value heads)")
        if Hk != Hq:
            if not enable_gqa:
                _fail(f"key.size(-3) = {Hk} must equal query.size(-3) = {Hq} (heads); "
                      f"pass enable_gqa=True for grouped-query attention")
            if (Hq % Hk if Hk else Hq):  # (no heads at all is an empty call)
                _fail(f"with enable_gqa, query heads (query.size(-3) = {Hq}) must be a multiple of "
                      f"key/value heads (key.size(-3) = {Hk})")
            features |= GQA
        tail = 3
    else:
        batch_shape = tuple(qshape[:-2])
        Hq = 1
        tail = 2
    # Key/value batch dims may broadcast against query's (as in SDPA), as views.
    nb = len(batch_shape)
    if (kshape[0] != qshape[0] or vshape[0] != qshape[0]) if nb == 1 else \
            (tuple(kshape[:nb]) != batch_shape or tuple(vshape[:nb]) != batch_shape):
        for name, t in (("key", key), ("value", value)):
            for d in range(nb):
                if t.shape[d] not in (1, batch_shape[d]):
                    _fail(f"{name}.size({d}) = {t.shape[d]} must equal query.size({d}) = {batch_shape[d]} "
                          f"(or be 1 to broadcast)")
        if tuple(kshape[:nb]) != batch_shape:
            key = key.expand(*batch_shape, *kshape[nd - tail:])
        if tuple(vshape[:nb]) != batch_shape:
            value = value.expand(*batch_shape, *vshape[nd - tail:])

    if dropout_p:
        dropout_p = float(dropout_p)
        if not 0.0 <= dropout_p <= 1.0:
            _fail(f"dropout_p must be in [0, 1], got {dropout_p}")
        if dropout_p > 0.0:
            features |= DROPOUT
    else:
        dropout_p = 0.0

    if scale is None:
        scale = 1.0 / math.sqrt(E) if E > 0 else 1.0
    elif isinstance(scale, (bool, torch.Tensor)) or not isinstance(scale, (int, float)) \
            or not math.isfinite(scale):
        _fail(f"scale must be a finite Python float or None, got {scale!r}")

    # ---- the band: the window, with causal masking folded in (the one place) ----
    left = right = None
    if window is not None:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            _fail(f"window must be a pair (left, right) of ints or None, got {window!r}")
        left, right = _window_side("left", window[0]), _window_side("right", window[1])
        if left is not None or right is not None:
            features |= WINDOW
    diagonal = None  # causal: j <= i + diagonal
    if is_causal:
        diagonal = 0  # top-left aligned, as SDPA's is_causal
        features |= CAUSAL

    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            _fail(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if not _plain_tensor_type(attn_mask):
            from torch.nn.attention.bias import CausalBias

            if not isinstance(attn_mask, CausalBias):
                _fail(f"attn_mask of type {type(attn_mask).__qualname__} (a tensor subclass) is not supported: "
                      "pass a plain bool or float tensor, or one of SDPA's causal_upper_left / causal_lower_right")
            # SDPA's causal mask objects: served as a band, no mask tensor
            if _causal_bias(attn_mask, L, S):
                lower_right = S - L
                diagonal = lower_right if diagonal is None else min(diagonal, lower_right)
                features |= CAUSAL_LOWER_RIGHT
            else:
                diagonal = 0
                features |= CAUSAL
            attn_mask = None
    if diagonal is not None:
        right = diagonal if right is None else min(right, diagonal)
    if (left is not None and left < 0) or (right is not None and right < 0):
        features |= NEGATIVE_BAND

    mask = None
    mask_needs_grad = False
    if attn_mask is not None:
        if attn_mask.dtype not in (torch.bool, torch.float32, dtype):
            _fail(f"attn_mask dtype must be bool, float32 or the dtype of query ({dtype}), got {attn_mask.dtype}")
        if attn_mask.device != device:
            _fail(f"attn_mask is on {attn_mask.device} but query is on {device}")
        full_shape = (*batch_shape, Hq, L, S) if heads_in_shape else (*batch_shape, L, S)
        if tuple(attn_mask.shape) != full_shape:
            try:
                target = torch.broadcast_shapes(attn_mask.shape, full_shape)
            except RuntimeError:
                target = None
            if target != torch.Size(full_shape):
                _fail(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                      f"{full_shape} (batch..., {'heads, ' if heads_in_shape else ''}L, S)")
            attn_mask = attn_mask.expand(full_shape)
        mask = _to_canonical(attn_mask, heads_in_shape, contiguous_last=False)
        features |= BOOL_MASK if mask.dtype == torch.bool else FLOAT_MASK
        if 0 in mask.stride():
            features |= MASK_BROADCAST
        if mask.requires_grad and torch.is_grad_enabled():
            mask_needs_grad = True
            features |= MASK_GRAD

    if key_lengths is not None or query_lengths is not None:
        lengths_shape = batch_shape if batch_shape else (1,)
        if key_lengths is not None:
            key_lengths = _check_lengths("key_lengths", key_lengths, lengths_shape, S, "key.size(-2)", device)
            features |= KEY_LENGTHS
        if query_lengths is not None:
            query_lengths = _check_lengths("query_lengths", query_lengths, lengths_shape, L, "query.size(-2)",
                                           device)
            features |= QUERY_LENGTHS
    if return_lse:
        features |= RETURN_LSE
    if return_stats:
        features |= STATS

    if nd == 4:  # already canonical (B, H, L, E): only the last dim's stride to check
        if query.stride()[-1] != 1 and E > 1:
            query = query.contiguous()
        if key.stride()[-1] != 1 and E > 1:
            key = key.contiguous()
        if value.stride()[-1] != 1 and Ev > 1:
            value = value.contiguous()
    else:
        query, key, value = (_to_canonical(t, heads_in_shape) for t in (query, key, value))
    # (positional: the slots' order)
    return AttentionSpec(query, key, value, mask, key_lengths, query_lengths, float(scale), (left, right), dropout_p,
                         features, batch_shape, heads_in_shape, mask_needs_grad)
