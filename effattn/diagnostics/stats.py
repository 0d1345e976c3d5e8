"""What the diagnostics measure, as plain functions: of one tensor (in the hooks) and of a series
of per-timestep gradient norms (in the report).

Norms are L2 norms computed in float64 so that neither vanishing nor exploding gradients under- or
overflow when squared: float32/16 values are squared in float64 (whose range covers their squares),
float64 values are divided by their largest magnitude first. A gradient of 1e-200 has norm 1e-200,
not 0.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

# Saturation thresholds of the issue: |tanh| > 0.99 (its derivative < 0.02), sigmoid outside
# [0.01, 0.99] (its derivative < 0.0099).
TANH_SATURATED = 0.99
SIGMOID_SATURATED = 0.01


# A norm computed the fast way (squares in the input's precision) is exact to rounding when it
# lands in this range: below it, squares of small entries may have underflowed and counted as 0;
# above it, squares may have overflowed.
_FAST_RANGE = {torch.float64: (1e-140, 1e140)}
_FAST_RANGE_DEFAULT = (1e-12, 1e12)  # float32 squares: normal down to 1e-38, finite up to 3e38


def _exact_norm(x: Tensor, dims: List[int]) -> Tensor:
    """float64 norm over ``dims``, each slice divided by its largest magnitude first."""
    x = x.to(torch.float64)
    peak = x.abs().amax(dim=dims, keepdim=True)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    return torch.linalg.vector_norm(x / peak, dim=dims) * peak.reshape(
        [s for d, s in enumerate(peak.shape) if d not in dims])


def norm(x: Tensor, dims: Sequence[int] = ()) -> Tensor:
    """L2 norm of ``x`` over ``dims`` (all dims when empty), float64, without under/overflow.

    On the CPU a whole-tensor norm is first computed the fast way (one pass) and redone exactly
    only when it falls outside the range where the fast way is exact (a host check, free there);
    elsewhere, and over some dims (per-timestep norms span hundreds of decades), always exactly."""
    x = x.detach()
    if x.dim() == 0:
        return x.to(torch.float64).abs()
    if not dims and x.device.type == "cpu":
        fast = torch.linalg.vector_norm(x)
        low, high = _FAST_RANGE.get(x.dtype, _FAST_RANGE_DEFAULT)
        if low <= float(fast) <= high:
            return fast.to(torch.float64)
    return _exact_norm(x, list(dims) if dims else list(range(x.dim())))


def unit_dim(x: Tensor, override: Optional[int] = None) -> int:
    """The dim whose entries are the layer's units (channels, features).

    dim 1 for (N, C) and (N, C, H, W, ...) tensors; the last dim for 3-D tensors, read as the
    (B, T, C) or (T, B, C) outputs of sequence layers (a Conv1d's (N, C, L) needs ``override=1``);
    dim 0 for 1-D tensors. ``override`` wins when the tensor has that dim."""
    if override is not None and -x.dim() <= override < x.dim():
        return override % x.dim()
    if x.dim() <= 1:
        return 0
    return x.dim() - 1 if x.dim() == 3 else 1


def _per_unit(x: Tensor, units_at: int, reduce) -> Tensor:
    """``reduce`` over every dim but ``units_at``: the dims after it first, flattened (contiguous
    and fast in the usual layouts), then those before it."""
    if units_at < x.dim() - 1:
        x = reduce(x.flatten(units_at + 1), dim=units_at + 1)
    if units_at > 0:
        x = reduce(x.flatten(0, units_at - 1), dim=0)
    return x


def zero_stats(x: Tensor, units_at: int) -> Dict[str, Tensor]:
    """Exactly-zero entries of ``x``: their fraction (``zero``), and the fraction of units that are
    zero everywhere over the batch (and positions), i.e. dead (``dead``). 0-dim tensors; NaN
    entries make ``zero`` NaN."""
    nonzero = x.detach().sign().abs_()  # 1 where x != 0 (a float count: faster than a bool sum)
    if x.dim() == 0:
        z = 1.0 - nonzero.to(torch.float64)
        return {"zero": z, "dead": z}
    per_unit = _per_unit(nonzero, units_at, torch.sum)
    return {"zero": 1.0 - per_unit.sum().to(torch.float64) / max(1, x.numel()),
            "dead": (per_unit == 0).to(torch.float64).mean()}


def saturated_fraction(x: Tensor, kind: str) -> Tensor:
    """Fraction of outputs of a tanh (``|x| > 0.99``) or a sigmoid (``x < 0.01`` or ``> 0.99``)."""
    if kind == "tanh":
        hit = x.abs() > TANH_SATURATED
    elif kind == "sigmoid":
        hit = (x < SIGMOID_SATURATED) | (x > 1 - SIGMOID_SATURATED)
    else:
        raise ValueError(f"saturation kind must be 'tanh' or 'sigmoid', got {kind!r}")
    return hit.to(torch.float64).mean()


def time_norms(g: Tensor, time_dim: int) -> Tensor:
    """(T,) norms ||g_t|| of a sequence gradient, over every dim but ``time_dim``."""
    return norm(g, [d for d in range(g.dim()) if d != time_dim])


def packed_time_norms(data: Tensor, batch_sizes: Tensor) -> Tensor:
    """(T,) per-timestep norms of a PackedSequence's ``data`` (time-major rows: the first
    ``batch_sizes[0]`` are step 0, and so on), as if the whole batch had every step: the norm over
    the B_t sequences that reach step t is scaled by sqrt(B / B_t), i.e. their RMS times sqrt(B).
    Without it the norm would fall at late steps only because fewer sequences are that long."""
    rows = norm(data, list(range(1, data.dim()))) if data.dim() > 1 else data.to(torch.float64).abs()
    per_step = torch.split(rows, batch_sizes.tolist())
    padded = torch.nn.utils.rnn.pad_sequence(list(per_step), batch_first=True)  # (T, B), zeros past B_t
    present = batch_sizes.to(device=rows.device, dtype=torch.float64)
    return norm(padded, [1]) * (present[0] / present).sqrt()


# ---------------------------------------------------------------------------
# A series of per-timestep gradient norms, g_0 .. g_{T-1}; the loss sits near the end
# ---------------------------------------------------------------------------

def _usable(norms: Sequence[float]) -> List[int]:
    return [t for t, g in enumerate(norms) if g is not None and math.isfinite(g) and g > 0]


def decay_per_step(norms: Sequence[float]) -> Optional[float]:
    """The geometric factor by which the gradient changes per timestep going back (T -> 1).

    A least-squares fit of log g_t against t over the timesteps where g_t is finite and > 0;
    the factor is exp(-slope): 0.5 means each step back halves the gradient (vanishing),
    above 1 it grows going back (exploding). None with fewer than two usable timesteps."""
    ts = _usable(norms)
    if len(ts) < 2:
        return None
    ys = [math.log(norms[t]) for t in ts]
    t_mean, y_mean = sum(ts) / len(ts), sum(ys) / len(ys)
    var = sum((t - t_mean) ** 2 for t in ts)
    slope = sum((t - t_mean) * (y - y_mean) for t, y in zip(ts, ys)) / var
    return math.exp(-slope)


def last_with_gradient(norms: Sequence[float]) -> Optional[int]:
    """The last timestep whose gradient is finite and > 0: where the loss enters. Later timesteps
    with exactly zero gradient are padding (a padded batch's last steps) and are left out."""
    ts = _usable(norms)
    return ts[-1] if ts else None


def reference_norm(norms: Sequence[float]) -> float:
    """What the other timesteps are compared with: the norm at ``last_with_gradient`` (0 if none)."""
    last = last_with_gradient(norms)
    return 0.0 if last is None else norms[last]


def first_below(norms: Sequence[float], fraction: float = 1e-3) -> Optional[int]:
    """Going back from ``last_with_gradient``, the first timestep t (0-based) whose gradient norm is
    below ``fraction`` of the norm there; None if none is."""
    last = last_with_gradient(norms)
    if last is None:
        return None
    for t in range(last - 1, -1, -1):
        if norms[t] is not None and norms[t] < fraction * norms[last]:
            return t
    return None


def ratio_first_last(norms: Sequence[float]) -> Optional[float]:
    """||g_1|| / ||g_T||, T the last timestep with a gradient; None without one."""
    ref = reference_norm(norms)
    return norms[0] / ref if ref > 0 and norms[0] is not None else None


def fitted_span(norms: Sequence[float]) -> int:
    """Number of timesteps between the first and the last usable one (what the fit covers)."""
    ts = _usable(norms)
    return ts[-1] - ts[0] if ts else 0


def trend(norms: Sequence[float], change: float = 100.0) -> str:
    """"vanishing" when the fitted decay shrinks the gradient more than ``change``-fold over the
    fitted span, "exploding" when it grows more than ``change``-fold, "steady" otherwise;
    "last only" when only one timestep (not the first) gets any gradient (e.g. an RNN's output
    sequence of which the loss reads the last step: not a decay, there is no path); "unknown" with
    fewer than two timesteps."""
    if len(norms) < 2:
        return "unknown"
    factor = decay_per_step(norms)
    if factor is None:
        return "last only" if len(_usable(norms)) == 1 and _usable(norms)[0] > 0 else "unknown"
    log_total = fitted_span(norms) * math.log(factor)  # log of the fitted change over the span
    if log_total < -math.log(change):
        return "vanishing"
    if log_total > math.log(change):
        return "exploding"
    return "steady"
