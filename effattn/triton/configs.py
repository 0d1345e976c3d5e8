"""Launch configurations for the Triton kernels.

On a GPU the main kernels are autotuned (triton.autotune) over a short list
per kernel, pruned before autotuning to the configs whose shared memory fits
the GPU at hand (227 KB per block on Hopper, 163 KB on A100, 99 KB on
sm_86/89), so no config is compiled that cannot launch; the autotune key
buckets the sequence lengths to powers of two, so variable-length training
does not re-tune at every new length. ``EFFATTN_TRITON_AUTOTUNE=0`` uses the
first fitting config of each list instead (the tests do, to keep compile
time down).

The shared-memory estimate (``smem_bytes``) is what Triton allocates on
sm_90, to within 2 KB, for every config below at head dims 64, 128 and 256
(bench/dev/triton_aot.py compiles them without a GPU; Triton 3.8). On sm_80
and sm_86 Triton allocated less for every config checked
(bench/results/triton-compile-resources.md), so there the estimate is an
upper bound. A dense mask adds its tiles to the pipeline: stages - 1 tiles of
(BLOCK_M, BLOCK_N) in float32 for a float32 mask, measured on every kernel
and stage count; less for bool and 16-bit masks, which the estimate charges
the same (``masked``). Without that, the float32-mask backward picked for an
A100 needed 180-193 KB of its 163, the forward for an RTX 30xx/40xx 128 KB of
its 99, and the head-dim-256 forward 240 KB of an H100's 227: launch failures
once the autotuner had no other config (triton-compile-resources.md).

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

import functools
import os
from typing import Dict, List, Tuple

import torch
import triton

# (BLOCK_M, BLOCK_N, num_warps, num_stages)
FWD = [
    (128, 64, 4, 3),    # the usual winner for head dim <= 128 (fits 2 CTAs per SM at E=64)
    (128, 128, 8, 3),   # long sequences: fewer K/V reloads (the Triton tutorial's Hopper tile at E=128)
    (128, 32, 4, 4),    # head dim 256: small K/V tiles, deeper pipeline
    (64, 64, 4, 3),     # few query rows (short Lq, many programs needed)
    (128, 64, 8, 3),    # head dim 128-256: 8 warps halve the accumulator registers per thread
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
# Added on GPUs with less shared memory than Hopper (A100: 163 KB, sm_86/89: 99 KB per
# block), and wherever none of the lists above fits (float32 at head dim 256): two
# stages, smaller tiles.
SMALLER_SMEM = {
    "fwd": [(128, 64, 8, 2),    # head dim 128 on 99 KB
            (64, 32, 4, 2),     # head dim 256 on 99 KB; float32 at 256 on Hopper
            (32, 16, 4, 2)],    # float32 at 256 on 99 KB
    "dkdv": [(32, 32, 4, 2),    # head dim 256 on 99 KB; float32 at 256 on Hopper
             (16, 16, 4, 2)],   # float32 at 256 on 99 KB
    "dq": [(32, 32, 4, 2),
           (16, 16, 4, 2)],
}
# Short queries (Lq <= SHORT_QUERY_ROWS): one 16-row block, keys split across programs
# (forward and dQ). The first that fits the GPU's shared memory.
SHORT_QUERY_ROWS = 16
SHORT = [
    (16, 128, 4, 3),    # head dim <= 128 on Hopper / A100
    (16, 64, 4, 3),     # head dim 256 on Hopper
    (16, 64, 4, 2),     # 99 KB GPUs, head dim <= 128; A100 at 256
    (16, 32, 4, 2),     # 99 KB GPUs, head dim 256
    (16, 16, 4, 2),     # 99 KB GPUs, float32 at head dim 256
]

INTERPRETER = (32, 32, 4, 1)
INTERPRETER_LONG = (128, 128, 4, 1)  # sequences over 256: the interpreter's cost is per block

HOPPER_SMEM = 227 * 1024  # per block, opted in (sm_90); what the lists were written for


@functools.lru_cache(maxsize=None)
def _device_smem(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    if optin:
        return int(optin)
    # (a torch without the field) CUDA's documented per-block limits by compute capability
    return {(9, 0): 227, (8, 0): 163, (8, 7): 163}.get((props.major, props.minor), 99) * 1024


def smem_limit(device: torch.device) -> int:
    """Shared memory a block may use on ``device`` (bytes); the Hopper figure off the GPU."""
    if device.type != "cuda":
        return HOPPER_SMEM
    return _device_smem(device.index if device.index is not None else torch.cuda.current_device())


def smem_bytes(cfg: Tuple[int, int, int, int], kind: str, d_pad: int, elem: int, masked: bool = False) -> int:
    """Shared memory of a config as Triton allocates it on sm_90: the streamed
    tiles once per stage, the tiles a program keeps once, and with a dense
    mask its pipelined (BLOCK_M, BLOCK_N) tiles, charged as float32."""
    bm, bn, _, stages = cfg
    mask = (stages - 1) * bm * bn * 4 if masked else 0
    if kind == "fwd":  # K and V tiles per stage, Q once
        return (stages * 2 * bn + bm) * d_pad * elem + mask
    if kind == "dkdv":  # Q and dO tiles per stage, K and V once
        return (stages * 2 * bm + 2 * bn) * d_pad * elem + mask
    return (stages * 2 * bn + 2 * bm) * d_pad * elem + mask  # dq: K and V per stage, Q and dO once


def _fits(cfg: Tuple[int, int, int, int], kind: str, d_pad: int, elem: int, limit: int, masked: bool) -> bool:
    bm, bn, _, _ = cfg
    held = {"dkdv": bn, "dq": bm}.get(kind, 0)
    if d_pad >= 256 and held > 64:
        return False  # its fp32 accumulators (dK and dV, or dQ: rows x 256) would spill
    return smem_bytes(cfg, kind, d_pad, elem, masked) <= limit


def short(d_pad: int, elem: int, interpret: bool, limit: int = HOPPER_SMEM,
          masked: bool = False) -> Tuple[int, int, int, int]:
    """The short-query (split keys) config: the first that fits (forward and dQ alike)."""
    if interpret:
        return (16, 64, 4, 1)
    for cfg in SHORT:
        if all(smem_bytes(cfg, kind, d_pad, elem, masked) <= limit for kind in ("fwd", "dq")):
            return cfg
    return SHORT[-1]


def autotune_enabled() -> bool:
    return os.environ.get("EFFATTN_TRITON_AUTOTUNE", "1") != "0"


def configs(kind: str, d_pad: int, elem: int, limit: int = HOPPER_SMEM,
            masked: bool = False) -> List[Tuple[int, int, int, int]]:
    """The candidates that fit ``limit`` bytes of shared memory (with a dense
    mask's tiles if ``masked``), in list order (the first is the fixed
    config); if none does, the smallest."""
    table = {"fwd": FWD, "dkdv": DKDV, "dq": DQ}[kind]
    fitting = [c for c in table if _fits(c, kind, d_pad, elem, limit, masked)]
    if limit < HOPPER_SMEM or not fitting:
        table = table + SMALLER_SMEM[kind]
        fitting += [c for c in SMALLER_SMEM[kind] if _fits(c, kind, d_pad, elem, limit, masked)]
    return fitting or [min(table, key=lambda c: smem_bytes(c, kind, d_pad, elem, masked))]


_AUTOTUNED: Dict[tuple, object] = {}


def launcher(kernel, kind: str, d_pad: int, elem: int, interpret: bool, long: bool = False,
             limit: int = HOPPER_SMEM, masked: bool = False):
    """(callable kernel, fixed meta-parameters or None).

    Autotuned: returns a triton.autotune wrapper (one per kernel, head-dim
    class and shared-memory size) and None; otherwise the plain kernel and
    the config to pass."""
    if interpret:
        bm, bn, w, s = INTERPRETER_LONG if long else INTERPRETER
        return kernel, dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
    cands = configs(kind, d_pad, elem, limit, masked)
    if not autotune_enabled() or len(cands) == 1:
        bm, bn, w, s = cands[0]
        return kernel, dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
    key = (kind, id(kernel), d_pad, elem, limit, masked)
    if key not in _AUTOTUNED:
        _AUTOTUNED[key] = triton.autotune(
            configs=[triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s)
                     for bm, bn, w, s in cands],
            key=["L_BUCKET", "S_BUCKET", "HEAD_DIM_PAD", "HEAD_DIM_V_PAD", "MASK_KIND",
                 "HAS_KEY_LENGTHS", "HAS_QUERY_LENGTHS", "PRECISION", "USE_TMA"],
        )(kernel)
    return _AUTOTUNED[key], None
