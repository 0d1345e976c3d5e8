"""The C++ CPU kernel (csrc/cpu): tiled online-softmax forward, recompute backward,
compiled once per instruction set; the variant is effattn.config.cpu_isa."""
from __future__ import annotations

import torch

from .. import config, ops, spec as S
from .base import Backend

# Isa values (csrc/cpu/kernels.h): the ops' `variant` argument for this backend.
ISAS = ("baseline", "avx2", "avx512", "avx2_wide")
_AUTO_CHOICES = ("avx512", "avx2", "baseline")  # widest first; avx2_wide never by default


def runnable_isas():
    """Names of the variants this build holds and this CPU runs."""
    if ops.LOAD_ERROR:
        return ()
    bits = torch.ops.effattn.cpu_isas()
    return tuple(name for i, name in enumerate(ISAS) if bits >> i & 1)


_RUNNABLE = runnable_isas()  # read once: a constant, also under torch.compile


class CpuBackend(Backend):
    name = "cpu"
    devices = ("cpu",)
    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    features = (S.CAUSAL | S.CAUSAL_LOWER_RIGHT | S.WINDOW | S.NEGATIVE_BAND | S.KEY_LENGTHS | S.QUERY_LENGTHS
                | S.BOOL_MASK | S.FLOAT_MASK | S.MASK_BROADCAST | S.GQA | S.VALUE_HEAD_DIM | S.RETURN_LSE
                | S.STATS)

    def __init__(self):
        self._isa = (None, "", 0)  # (config value, name, Isa value), for the hot path

    def unavailable_reasons(self):
        return [ops.LOAD_ERROR] if ops.LOAD_ERROR else []

    def isa(self):
        """(name, Isa value) of the configured variant; ValueError if it cannot run here."""
        want = config.cpu_isa
        if want is not self._isa[0]:
            config.checked("cpu_isa", want)  # a known name
            name = next(n for n in _AUTO_CHOICES if n in _RUNNABLE) if want == "auto" else want
            if name not in _RUNNABLE:
                raise ValueError(f"effattn.config.cpu_isa = {want!r}: that variant does not run here (this build "
                                 f"and CPU run {', '.join(_RUNNABLE)}; avx2_wide needs a build with "
                                 "EFFATTN_UNVERIFIED=1)")
            self._isa = (want, name, ISAS.index(name))
        return self._isa[1], self._isa[2]

    def variant(self, spec):
        return self.isa()[0]

    def forward(self, spec):
        return ops.CPP(spec, self.isa()[1])
