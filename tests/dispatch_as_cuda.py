"""Run by tests/test_ops.py in a child process: TorchDynamo over effattn's
backend selection as it runs for CUDA tensors, on a machine without a GPU.

The spec reports device cuda:0 and the driver queries answer as an H100
would (or a GPU of another compute capability: --capability 7.5); what
dynamo itself asks of the CUDA runtime while tracing (RNG state, stream
capture, the current stream, Triton capability) is answered too. The
tensors stay on the CPU and nothing runs on a device: only the dispatch code
(availability, compute capability, head dims, determinism, the walk to the
reference) is traced. Prints one JSON object: per case, the backend eager
dispatch picks and dynamo's graph-break count and reasons (or why a named
backend is unavailable in this build).
"""
import argparse
import json
import types
import warnings

import torch

parser = argparse.ArgumentParser()
parser.add_argument("--capability", default="9.0", help="the pretend GPU's compute capability (9.0: an H100)")
# Imported (bench/overhead.py's cuda_host child) it is an H100 and leaves the importer's argv alone.
CAPABILITY = parser.parse_args().capability if __name__ == "__main__" else "9.0"
MAJOR, MINOR = (int(x) for x in CAPABILITY.split("."))

# Driver queries, opaque to dynamo as the real ones are (a call inside traced code
# is a graph break unless effattn makes it a constant); is_available is a constant
# to dynamo anyway.
opaque = torch._dynamo.disable
torch.cuda.is_available = lambda: True
torch.cuda.device_count = opaque(lambda: 1)
torch.cuda.current_device = opaque(lambda: 0)
torch.cuda.get_device_capability = opaque(lambda index=None: (MAJOR, MINOR))
torch.cuda.get_device_properties = opaque(lambda index=None: types.SimpleNamespace(
    major=MAJOR, minor=MINOR, multi_processor_count=132, shared_memory_per_block_optin=232448,
    name=f"sm_{MAJOR}{MINOR} (pretend)"))
torch.cuda.get_rng_state = lambda *args, **kwargs: torch.zeros(16, dtype=torch.uint8)
torch.cuda.set_rng_state = lambda *args, **kwargs: None
import torch.cuda.graphs  # noqa: E402

torch.cuda.graphs._cuda_isCurrentStreamCapturing = lambda: False
torch.accelerator.is_available = lambda: False  # dynamo then does not ask for the current stream

import effattn  # noqa: E402, F401
from effattn import spec as spec_module  # noqa: E402
from effattn.backends import PRIORITY, select  # noqa: E402

spec_module.AttentionSpec.device = property(lambda self: torch.device("cuda", 0))
spec_module.AttentionSpec.device_type = property(lambda self: "cuda")


def picker(backend, mask_grad=False):
    def pick(q, k, v, lengths, mask):
        spec = spec_module.make_spec(q, k, v, mask if mask_grad else None, 0.0, not mask_grad, None, True,
                                     key_lengths=lengths)
        return torch.full((), PRIORITY.index(select(spec, backend)))  # the choice, as a tensor
    return pick


def main():
    dtype = torch.bfloat16 if MAJOR >= 8 else torch.float16  # (bf16 needs 8.0 in every GPU kernel)
    q = torch.randn(2, 4, 30, 64, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 26, 64, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 2, 26, 64, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([26, 10])
    mask = torch.zeros(30, 26, requires_grad=True)
    warnings.simplefilter("ignore")  # the reference fallback's warning (eager only)
    results = {}
    for case, fn, deterministic in (("auto", picker("auto"), False),
                                    ("auto, deterministic", picker("auto"), True),
                                    ("cuda", picker("cuda"), False),
                                    ("triton", picker("triton"), False),
                                    ("walk to the reference", picker("auto", mask_grad=True), False)):
        torch.use_deterministic_algorithms(deterministic)
        torch._dynamo.reset()
        try:
            eager = fn(q, k, v, lengths, mask)
        except RuntimeError as e:  # a backend this build or machine lacks (effattn's own message)
            results[case] = dict(unavailable=str(e))
            continue
        index = int(eager.item())
        explained = torch._dynamo.explain(fn)(q, k, v, lengths, mask)
        results[case] = dict(picked=PRIORITY[index].name, graph_breaks=explained.graph_break_count,
                             reasons=[str(r.reason)[:300] for r in explained.break_reasons])
    print(json.dumps(results))


if __name__ == "__main__":
    main()
