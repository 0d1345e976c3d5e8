"""effattn: exact, memory-efficient attention for PyTorch.

    import effattn
    out = effattn.attention(q, k, v, is_causal=True)   # SDPA's signature
    print(effattn.backends())                           # what runs here
    mha = effattn.nn.MultiheadAttention(512, 8)        # modules: effattn.nn
    print(effattn.diagnostics.check(model, (x, y), loss_fn))  # where gradients die
    effattn.distributed.ring_attention(q, k, v)         # a sequence sharded across processes
"""
from . import ops  # noqa: F401  (loads effattn._C and registers fake/autograd)
from . import reference  # noqa: F401
from . import backends  # noqa: F401  (callable: effattn.backends(...))
from . import nn  # noqa: F401  (MultiheadAttention, AttentionPooling)
from . import diagnostics  # noqa: F401  (GradientFlow, check, Report; matplotlib only in Report.plot)
from . import distributed  # noqa: F401  (context parallel: ring_attention, shard, ...; cheap, guarded)
from .api import attention
from .spec import AttentionSpec, make_spec

__version__ = "0.1.0"
__all__ = ["attention", "backends", "nn", "diagnostics", "distributed", "reference", "AttentionSpec", "make_spec",
           "__version__"]
