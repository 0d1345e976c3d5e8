"""One description of an attention call, shared by every backend.

``make_spec`` validates the arguments of :func:`effattn.attention` (every
user-facing check lives here, with errors that name the tensor, the dimension
and what was expected) and normalises them to the canonical form that every
backend reads:

* ``q`` (B, Hq, L, E), ``k`` (B, Hkv, S, E), ``v`` (B, Hkv, S, Ev): views of
  the inputs (no copies) with a contiguous last dim and any other strides;
* ``mask``: a broadcast (stride-0) view of shape (B, Hq, L, S), never expanded
  in memory, or None;
* ``key_lengths`` / ``query_lengths``: int64 tensors of shape (B,), or None;
* ``window``: (left, right) with -1 for an unbounded side; ``is_causal`` kept
  separately (top-left aligned, as SDPA's).

Leading batch dims of the inputs are flattened into B; ``batch_shape`` keeps
them so outputs are returned in the caller's shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
UNBOUNDED = -1


@dataclass(frozen=True)
class AttentionSpec:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[torch.Tensor]
    key_lengths: Optional[torch.Tensor]
    query_lengths: Optional[torch.Tensor]
    scale: float
    is_causal: bool
    window: Tuple[int, int]
    dropout_p: float
    batch_shape: Tuple[int, ...]  # the caller's leading dims (heads dim excluded)
    heads_in_shape: bool  # whether the caller's tensors had a heads dim

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
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def mask_needs_grad(self) -> bool:
        return self.mask is not None and self.mask.requires_grad and torch.is_grad_enabled()

    @property
    def window_left(self) -> int:
        return self.window[0]

    @property
    def window_right(self) -> int:
        return self.window[1]

    # ---- output shaping ------------------------------------------------------
    def to_caller_shape(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, L, ...) -> the caller's (*batch, [H,] L, ...)."""
        shape = (*self.batch_shape, *t.shape[1 if self.heads_in_shape else 2:])
        return t if t.shape == shape else t.reshape(shape)


def _fail(msg: str):
    raise ValueError(f"effattn.attention: {msg}")


def _check_tensor(name: str, t, min_dim: int = 2):
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < min_dim:
        _fail(f"{name} must have at least {min_dim} dims (..., seq, dim), got shape {tuple(t.shape)}")


def _to_canonical(t: torch.Tensor, heads_in_shape: bool, contiguous_last: bool = True) -> torch.Tensor:
    """(*batch, H, L, E) or (*batch, L, E) -> (B, H, L, E) as a view where possible.

    q, k, v need a contiguous last dim (a copy only when it is not); a mask is
    read through all four strides and is never copied."""
    if not heads_in_shape:
        t = t.unsqueeze(-3)
    if t.dim() == 3:
        t = t.unsqueeze(0)
    elif t.dim() > 4:
        t = t.flatten(0, t.dim() - 4)  # a view unless the batch dims are not mergeable
    if contiguous_last and t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()  # the kernels need a contiguous last dim; all else stays strided
    return t


def _normalize_window(window) -> Tuple[int, int]:
    if window is None:
        return (UNBOUNDED, UNBOUNDED)
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        _fail(f"window must be a pair (left, right) of ints or None, got {window!r}")
    out = []
    for side, w in zip(("left", "right"), window):
        if w is None:
            out.append(UNBOUNDED)
            continue
        if isinstance(w, bool) or not isinstance(w, int):
            _fail(f"window {side} size must be an int >= 0 or None (unbounded), got {w!r}")
        if w < 0:
            _fail(f"window {side} size must be >= 0 (None means unbounded), got {w}")
        out.append(int(w))
    return (out[0], out[1])


def _check_lengths(name: str, t, batch_shape: Tuple[int, ...], limit: int, limit_name: str,
                   device: torch.device) -> Optional[torch.Tensor]:
    if t is None:
        return None
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
    t = t.reshape(numel).to(torch.int64).contiguous()  # (B,) int64: a few bytes
    # Value checks read the data: cheap on the CPU, a host sync on a GPU and a
    # graph break under torch.compile, so only done eagerly for CPU tensors.
    # The CPU kernel checks again (so compiled calls are covered); the
    # reference treats any value as a plain comparison; GPU kernels must
    # tolerate out-of-range values without reading out of bounds.
    if t.device.type == "cpu" and not torch.compiler.is_compiling() and numel > 0:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0:
            _fail(f"{name} must be >= 0, got a minimum of {lo}")
        if hi > limit:
            _fail(f"{name} must be <= {limit_name} = {limit}, got a maximum of {hi}")
    return t


def make_spec(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
              scale: Optional[float] = None, enable_gqa: bool = False, *, key_lengths=None,
              query_lengths=None, window: Optional[Sequence[Optional[int]]] = None) -> AttentionSpec:
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t)
    if not (query.dim() == key.dim() == value.dim()):
        _fail(f"query, key and value must have the same number of dims, got "
              f"{query.dim()}, {key.dim()} and {value.dim()}")
    # Under torch.autocast, float32 inputs run in the autocast dtype, as SDPA's do.
    if query.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(query.device.type):
        low = torch.get_autocast_dtype(query.device.type)
        query, key, value = (t.to(low) if t.dtype == torch.float32 else t for t in (query, key, value))
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            _fail(f"{name} has dtype {t.dtype} but query has {query.dtype}; they must match")
        if t.device != query.device:
            _fail(f"{name} is on {t.device} but query is on {query.device}")
    if query.dtype not in SUPPORTED_DTYPES:
        _fail(f"query dtype must be one of float16, bfloat16, float32, float64, got {query.dtype}")

    nd = query.dim()
    L, E = query.shape[-2], query.shape[-1]
    S = key.shape[-2]
    if key.shape[-1] != E:
        _fail(f"key.size(-1) = {key.shape[-1]} must equal query.size(-1) = {E} (the head dim)")
    if value.shape[-2] != S:
        _fail(f"value.size(-2) = {value.shape[-2]} must equal key.size(-2) = {S} (the key sequence length)")

    # Heads: dim -3, for 4+ dim inputs, and for 3-dim ones under GQA (as SDPA).
    heads_in_shape = nd >= 4 or (nd == 3 and enable_gqa)
    if heads_in_shape:
        batch_shape = tuple(query.shape[:-3])
        Hq, Hk, Hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if Hk != Hv:
            _fail(f"key.size(-3) = {Hk} and value.size(-3) = {Hv} must be equal (the key/value heads)")
        if enable_gqa:
            if (Hq % Hk if Hk else Hq):  # (no heads at all is an empty call)
                _fail(f"with enable_gqa, query heads (query.size(-3) = {Hq}) must be a multiple of "
                      f"key/value heads (key.size(-3) = {Hk})")
        elif Hk != Hq:
            _fail(f"key.size(-3) = {Hk} must equal query.size(-3) = {Hq} (heads); "
                  f"pass enable_gqa=True for grouped-query attention")
    else:
        batch_shape = tuple(query.shape[:-2])
        Hq = Hk = 1
    # Key/value batch dims may broadcast against query's (as in SDPA), as views.
    nb = len(batch_shape)
    for name, t in (("key", key), ("value", value)):
        for d in range(nb):
            if t.shape[d] not in (1, batch_shape[d]):
                _fail(f"{name}.size({d}) = {t.shape[d]} must equal query.size({d}) = {batch_shape[d]} "
                      f"(or be 1 to broadcast)")
    tail = 3 if heads_in_shape else 2
    if tuple(key.shape[:nb]) != batch_shape:  # (no call when nothing broadcasts: each costs microseconds)
        key = key.expand(*batch_shape, *key.shape[nd - tail:])
    if tuple(value.shape[:nb]) != batch_shape:
        value = value.expand(*batch_shape, *value.shape[nd - tail:])

    if dropout_p is None:
        dropout_p = 0.0
    if not (0.0 <= float(dropout_p) <= 1.0):
        _fail(f"dropout_p must be in [0, 1], got {dropout_p}")
    if dropout_p > 0.0:
        raise NotImplementedError(
            "effattn.attention: dropout is not supported yet (dropout_p must be 0.0); "
            "apply dropout outside attention or use torch.nn.functional.scaled_dot_product_attention")

    if scale is None:
        scale = 1.0 / math.sqrt(E) if E > 0 else 1.0
    elif isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        _fail(f"scale must be a finite Python float or None, got {scale!r}")

    full_shape = (*batch_shape, Hq, L, S) if heads_in_shape else (*batch_shape, L, S)
    mask = None
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            _fail(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            _fail(f"attn_mask dtype must be bool, float32 or the dtype of query ({query.dtype}), "
                  f"got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            _fail(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
        try:
            target = torch.broadcast_shapes(attn_mask.shape, full_shape)
        except RuntimeError:
            target = None
        if target != torch.Size(full_shape):
            _fail(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                  f"{full_shape} (batch..., {'heads, ' if heads_in_shape else ''}L, S)")
        mask = _to_canonical(attn_mask.expand(full_shape), heads_in_shape, contiguous_last=False)

    window_n = _normalize_window(window)
    device = query.device
    lengths_shape = batch_shape if batch_shape else (1,)
    key_lengths = _check_lengths("key_lengths", key_lengths, lengths_shape, S, "key.size(-2)", device)
    query_lengths = _check_lengths("query_lengths", query_lengths, lengths_shape, L, "query.size(-2)", device)

    return AttentionSpec(
        q=_to_canonical(query, heads_in_shape),
        k=_to_canonical(key, heads_in_shape),
        v=_to_canonical(value, heads_in_shape),
        mask=mask,
        key_lengths=key_lengths,
        query_lengths=query_lengths,
        scale=float(scale),
        is_causal=bool(is_causal),
        window=window_n,
        dropout_p=float(dropout_p),
        batch_shape=batch_shape,
        heads_in_shape=heads_in_shape,
    )
