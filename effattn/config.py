"""Kernel variants, chosen in one place.

Each option is read once, from its environment variable, when effattn is
imported (the variable is the override; the default is what has been verified
to run). Backends read these attributes to name the variant a call runs
(``effattn.backends(q, k, v)`` shows it) and pass it down to the ops as an
argument: no kernel reads the environment. Change an option for the rest of
the process by assigning it (``effattn.config.cpu_isa = "avx2"``) or for a
block with ``effattn.config.override(cpu_isa="avx2")``; a value outside the
option's choices raises ValueError when a call reads it.
"""
from __future__ import annotations

import contextlib
import os

# option: (environment variable, default, choices)
OPTIONS = {
    # The CPU kernel's instruction-set variant (csrc/cpu/kernels.h): "auto" is the widest this
    # CPU runs; avx2_wide (the AVX-512 source on AVX2) is a test-only build (EFFATTN_UNVERIFIED=1).
    "cpu_isa": ("EFFATTN_CPU_ISA", "auto", ("auto", "baseline", "avx2", "avx512", "avx2_wide")),
    # The Triton kernels' float32 matmuls: TF32 tensor cores, or exact float32.
    "triton_fp32": ("EFFATTN_TRITON_FP32", "tf32", ("tf32", "ieee")),
    # The Triton forward's interior K/V loads through tensor descriptors (TMA, Hopper+); never run
    # on a GPU yet, so off by default.
    "triton_tma": ("EFFATTN_TRITON_TMA", "0", ("0", "1")),
    # The Triton forward's attention statistics (effattn.diagnostics.attention_stats) on CUDA
    # tensors: tested under Triton's interpreter and compiled for sm_90, never run on a GPU yet,
    # so off by default there (the interpreter always serves them).
    "triton_stats": ("EFFATTN_TRITON_STATS", "0", ("0", "1")),
    # The Hopper CUDA kernels (wgmma + TMA), built only with EFFATTN_UNVERIFIED=1: "1" where they
    # can run, "require" turns a call they cannot take into an error (for tests).
    "cuda_sm90": ("EFFATTN_CUDA_SM90", "0", ("0", "1", "require")),
    "cuda_sm90_bwd": ("EFFATTN_CUDA_SM90_BWD", "0", ("0", "1", "require")),
    # The CUDA backward's sm_80 tile set: by the GPU's shared memory, or forced.
    "cuda_bwd_tiles": ("EFFATTN_CUDA_BWD_TILES", "auto", ("auto", "large", "small")),
    # The CUDA kernels' Turing tiles (<= 64 KB of shared memory, float16, head dims <= 128), built
    # only with EFFATTN_UNVERIFIED=1 and 7.5 in the arch list: "auto" on GPUs below compute
    # capability 8.0; "force" on every GPU (to run a build whose only code is compute_75 PTX
    # through the driver's JIT on a newer GPU: csrc/cuda/dev/gpu_check.sh).
    "cuda_sm75": ("EFFATTN_CUDA_SM75", "auto", ("auto", "force")),
}

cpu_isa: str
triton_fp32: str
triton_tma: str
triton_stats: str
cuda_sm90: str
cuda_sm90_bwd: str
cuda_bwd_tiles: str
cuda_sm75: str

for _name, (_env, _default, _choices) in OPTIONS.items():
    globals()[_name] = os.environ.get(_env, _default) or _default


def checked(name: str, value: str) -> str:
    """``value`` (read as ``effattn.config.<name>``), checked against the option's choices.
    (The caller reads the attribute itself: torch.compile traces that, not globals().)"""
    env, _, choices = OPTIONS[name]
    if value not in choices:
        raise ValueError(f"effattn.config.{name} (environment {env}) = {value!r} is not one of "
                         f"{', '.join(choices)}")
    return value


@contextlib.contextmanager
def override(**options):
    """Sets options for the duration of a with-block."""
    saved = {}
    for name, value in options.items():
        if name not in OPTIONS:
            raise ValueError(f"effattn.config has no option {name!r}; options: {', '.join(OPTIONS)}")
        saved[name] = globals()[name]
        globals()[name] = value
    try:
        yield
    finally:
        globals().update(saved)
