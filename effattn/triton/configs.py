"""Launch configurations for the Triton kernels.

On a GPU the main kernels are autotuned (triton.autotune) over a short list
per kernel, pruned by head dim before autotuning so that no config that
cannot fit in shared memory is compiled; the autotune key buckets the
sequence lengths to powers of two, so variable-length training does not
re-tune at every new length. ``EFFATTN_TRITON_AUTOTUNE=0`` uses the first
config of each list instead (the tests do, to keep compile time down).

Under the interpreter (TRITON_INTERPRET=1, CPU tensors) small fixed blocks
keep the numpy emulation fast while still giving every test several blocks.

The candidates are the tiles FlashAttention-style Triton kernels use on
Ampere and Hopper (each line says what it is for); the autotuner measures them
at run time on the GPU at hand. On an H100 the autotuned kernels gave the
figures of bench/results/triton-gpu.md; which config won each key was not
recorded (bench/dev/triton_gpu.py now records it), and no Ampere GPU has
measured them.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import triton

# (BLOCK_M, BLOCK_N, num_warps, num_stages)
FWD = [
    (128, 64, 4, 3),    # the usual winner for head dim <= 128 (fits 2 CTAs per SM at E=64)
    (128, 128, 8, 3),   # long sequences, head dim 64: fewer K/V reloads
    (128, 32, 4, 4),    # head dim 256: small K/V tiles, deeper pipeline
    (64, 64, 4, 3),     # few query rows (short Lq, many programs needed)
    (128, 64, 8, 3),    # head dim 128-256 on Ampere
]
DKDV = [
    (64, 128, 8, 3),    # keys in registers x 128: fewest Q/dO reloads, head dim <= 128
    (32, 128, 4, 3),    # as the Triton tutorial (Hopper, head dim 64/128)
    (64, 64, 4, 3),     # head dim 256, or Ampere's smaller shared memory
    (32, 64, 4, 2),     # head dim 256, smallest
]
DQ = [
    (128, 64, 8, 3),    # head dim <= 128
    (128, 32, 4, 3),    # as the Triton tutorial
    (64, 64, 4, 3),     # head dim 256
    (64, 32, 4, 2),     # head dim 256, smallest
]
# Short queries (Lq <= SHORT_QUERY_ROWS): one 16-row block, keys split across programs.
SHORT_QUERY_ROWS = 16
SHORT = (16, 128, 4, 3)
SHORT_WIDE = (16, 64, 4, 3)  # head dim 256

INTERPRETER = (32, 32, 4, 1)
INTERPRETER_LONG = (128, 128, 4, 1)  # sequences over 256: the interpreter's cost is per block


def short(d_pad: int, interpret: bool) -> Tuple[int, int, int, int]:
    """The short-query (split keys) config."""
    if interpret:
        return (16, 64, 4, 1)
    return SHORT if d_pad <= 128 else SHORT_WIDE


def _fits(cfg: Tuple[int, int, int, int], kind: str, d_pad: int, elem: int) -> bool:
    """Rough shared-memory estimate (bytes) of a config, against the H100's 227 KiB
    (Ampere's 163/99 KiB configs are dropped by the autotuner when they fail)."""
    bm, bn, _, stages = cfg
    if kind == "fwd":  # K and V tiles per stage, Q once
        need = stages * 2 * bn * d_pad * elem + bm * d_pad * elem
    elif kind == "dkdv":  # Q and dO tiles per stage, K and V once
        need = stages * 2 * bm * d_pad * elem + 2 * bn * d_pad * elem
    else:  # dq: K and V tiles per stage, Q and dO once
        need = stages * 2 * bn * d_pad * elem + 2 * bm * d_pad * elem
    if d_pad >= 256 and bm * bn > 64 * 64 and kind != "fwd":
        return False  # the register tiles (BLOCK x 256 fp32 accumulators) would spill
    return need <= 200 * 1024


def autotune_enabled() -> bool:
    return os.environ.get("EFFATTN_TRITON_AUTOTUNE", "1") != "0"


def configs(kind: str, d_pad: int, elem: int) -> List[Tuple[int, int, int, int]]:
    table = {"fwd": FWD, "dkdv": DKDV, "dq": DQ}[kind]
    fitting = [c for c in table if _fits(c, kind, d_pad, elem)]
    return fitting or [table[-1]]


_AUTOTUNED: Dict[tuple, object] = {}


def launcher(kernel, kind: str, d_pad: int, elem: int, interpret: bool, long: bool = False):
    """(callable kernel, fixed meta-parameters or None).

    Autotuned: returns a triton.autotune wrapper (one per kernel and head-dim
    class) and None; otherwise the plain kernel and the config to pass."""
    if interpret:
        bm, bn, w, s = INTERPRETER_LONG if long else INTERPRETER
        return kernel, dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
    cands = configs(kind, d_pad, elem)
    if not autotune_enabled() or len(cands) == 1:
        bm, bn, w, s = cands[0]
        return kernel, dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
    key = (kind, id(kernel), d_pad, elem)
    if key not in _AUTOTUNED:
        _AUTOTUNED[key] = triton.autotune(
            configs=[triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s)
                     for bm, bn, w, s in cands],
            key=["L_BUCKET", "S_BUCKET", "HEAD_DIM_PAD", "HEAD_DIM_V_PAD", "MASK_KIND",
                 "HAS_KEY_LENGTHS", "HAS_QUERY_LENGTHS", "PRECISION", "USE_TMA"],
        )(kernel)
    return _AUTOTUNED[key], None
