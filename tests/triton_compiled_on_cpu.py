"""Run by tests/test_triton.py in a child process, with TRITON_INTERPRET unset:
``torch.compile(effattn.attention, fullgraph=True)`` on the Triton backend,
traced as it is for a GPU and then run on the CPU.

Tracing. The kernels are the real ``@triton.jit`` functions (not the
interpreter's), so ``torch.library.triton_op`` turns each launch into a
``triton_kernel_wrapper_functional`` node of the forward and backward graphs,
after torch reads the kernel's Triton IR to learn which tensors it writes.
Building that IR asks Triton's driver for the target: a stub driver answers
sm_90. Nothing is compiled to machine code, and a kernel launched outside a
compiled graph (a graph break, or an eager call) fails, so no case can pass
by falling back to eager.

Running. While a compiled graph runs, each kernel in torch's kernel side
table is run by Triton's interpreter instead: the graph's own arguments,
grid and (for an autotuned kernel) its first config.

What inductor would do with the graph (code generation, autotuning, the
launch on a GPU) is not covered: that is tests/test_triton.py's GPU test.

Prints one JSON object: per case, "ok" or the error, and the kernels of each
compiled graph with the tensors torch found each one writes. CASE=<prefix>
runs only the cases whose names start with it.

It leans on Triton's interpreter internals (InterpretedFunction, _patch_lang)
and torch's kernel side table, so tests/test_triton.py runs it on machines
without a GPU only. Checked with torch 2.14.1 / Triton 3.8 (CI) and torch
2.11.0 / Triton 3.6, the GPU machine's (bench/dev/gpu_stack_on_cpu.sh; that
interpreter needs numpy < 2).
"""
import json
import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)
os.environ["EFFATTN_TEST_TRITON_INTERPRET"] = "0"  # conftest must not turn the interpreter on

import torch  # noqa: E402
import triton  # noqa: E402
from torch._functorch.aot_autograd import aot_module_simplified  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction, _patch_lang  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class StubDriver:
    """What torch's kernel analysis asks of Triton's driver; anything else fails."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def __getattr__(self, name):
        raise RuntimeError(f"no GPU here: the stub driver has no {name!r} (a kernel launched outside a graph?)")


triton.runtime.driver.set_active(StubDriver())

import effattn  # noqa: E402
import effattn.triton.ops  # noqa: E402, F401  (the @triton.jit kernels, as on a GPU)
from effattn import reference  # noqa: E402
from effattn.backends import BY_NAME  # noqa: E402
from effattn.backends import triton as triton_backend  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import conftest  # noqa: E402

BY_NAME["triton"].devices = ("cuda", "cpu")  # the compiled graphs run on the CPU here
triton_backend.set_float32_precision("ieee")  # the interpreter computes in float32 (and tf32 is a GPU notion)


def _name(kernel):
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    return fn.__name__


class _Interpreted:
    """Stands in for a side-table kernel while a graph runs: launches its Python
    body under the interpreter with the graph's arguments (an autotuner's first config)."""

    def __init__(self, kernel):
        self.tuner = kernel if isinstance(kernel, Autotuner) else None
        self.fn = kernel.fn if self.tuner else kernel  # what torch reads: .fn.__name__, .configs, .arg_names
        self.configs = kernel.configs if self.tuner else []
        self.arg_names = self.fn.arg_names
        self.body = InterpretedFunction(self.fn.fn)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.tuner:
                kwargs.update(self.tuner.configs[0].kwargs)
            for launch_option in ("num_warps", "num_stages", "num_ctas"):
                kwargs.pop(launch_option, None)
            return self.body[grid](*args, **kwargs)
        return launch


def _call_helper(helper, *args, **kwargs):
    """A @triton.jit helper called from interpreted code. (InterpretedFunction's
    own __call__ patches triton.language for the interpreter and never restores
    it, which would break every later kernel analysis in this process.)"""
    body = InterpretedFunction(helper.fn).rewrite()
    scope = _patch_lang(helper.fn)
    try:
        return body(*args, **kwargs)
    finally:
        scope.restore()


class interpreted_kernels:
    """Swaps every kernel in torch's side table for _Interpreted, and lets the
    kernels' @triton.jit helpers (and tl's) be called from interpreted code."""

    def __enter__(self):
        table = kernel_side_table.id_to_kernel
        self.saved = dict(table)
        for idx, kernel in self.saved.items():
            if isinstance(kernel, (Autotuner, JITFunction)):
                table[idx] = _Interpreted(kernel)
        self.call = JITFunction.__call__
        JITFunction.__call__ = _call_helper
        os.environ["TRITON_INTERPRET"] = "1"

    def __exit__(self, *exc):
        os.environ.pop("TRITON_INTERPRET", None)
        JITFunction.__call__ = self.call
        kernel_side_table.id_to_kernel.update(self.saved)


GRAPHS = []  # per compiled graph: [(kernel name, tensors it writes), ...]


def _record(gm):
    kernels = []
    for node in gm.graph.nodes:
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            kernels.append([_name(kernel), sorted(node.kwargs["tensors_to_clone"])])
    GRAPHS.append(kernels)


def _compiler(gm, example_inputs):
    _record(gm)

    def run(args):
        with interpreted_kernels():
            return gm(*args)
    run._boxed_call = True
    return run


def aot_interpreted(gm, example_inputs):
    return aot_module_simplified(gm, example_inputs, fw_compiler=_compiler, bw_compiler=_compiler)


EAGER = effattn.attention


def compiled_attention(**compile_kw):
    return torch.compile(EAGER, fullgraph=True, backend=aot_interpreted, **compile_kw)


def check(q, k, v, **kw):
    """conftest's oracle check (2 x float32 math + floor, forward and gradients)
    with effattn.attention compiled."""
    conftest.check_against_oracle(q, k, v, conftest.BackendCase("triton", "cpu"), **kw)


def check_lse_gradients(q, k, v, **kw):
    """return_lse=True and a loss on both outputs (the backward's dLSE path):
    compiled effattn against the float64 oracle, bounded by float32 math."""
    runs = []
    for call, dtype, extra in ((effattn.attention, torch.float32, dict(backend="triton")),
                               (reference.attention, torch.float64, {}),
                               (reference.attention, torch.float32, {})):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        out, lse = call(*leaves, return_lse=True, **kw, **extra)
        gen = torch.Generator().manual_seed(2)
        g_out, g_lse = torch.randn(out.shape, generator=gen), torch.randn(lse.shape, generator=gen)
        ((out * g_out.to(dtype)).sum() + (lse * g_lse.to(dtype)).sum()).backward()
        runs.append([t.detach() for t in (out, lse, *(leaf.grad for leaf in leaves))])
    for name, got, oracle, same_precision in zip(("out", "lse", "dq", "dk", "dv"), *runs):
        conftest.assert_bound(name, got, same_precision, oracle, torch.float32)


def cases():
    mk = conftest.make_qkv
    gen = torch.Generator().manual_seed(3)
    yield "causal, GQA, key lengths", lambda: check(
        *mk(B=2, Hq=4, Hkv=2, L=40, S=33, E=16), is_causal=True, enable_gqa=True,
        key_lengths=torch.tensor([33, 10]))
    yield "float mask, query lengths, window, head dim 24", lambda: check(
        *mk(B=2, Hq=2, L=37, S=45, E=24), attn_mask=torch.randn(1, 1, 37, 45, generator=gen),
        query_lengths=torch.tensor([37, 20]), window=(10, 5))
    yield "bool mask, (B, L, H, E) layout, value dim 32", lambda: check(
        *mk(B=2, Hq=2, L=30, S=50, E=16, Ev=32, layout="blhe"),
        attn_mask=torch.rand(30, 50, generator=gen) > 0.3)
    yield "3 queries over 600 keys (split keys, merged by LSE)", lambda: check(
        *mk(B=1, Hq=2, L=3, S=600, E=16), key_lengths=torch.tensor([500]))
    yield "return_lse, gradient through the LSE", lambda: check_lse_gradients(
        *mk(B=2, Hq=2, L=20, S=28, E=16), is_causal=True, key_lengths=torch.tensor([28, 9]))
    yield "dynamic=True, two lengths through one graph", dynamic_case
    yield "attention statistics with the output (attention_stats), causal, key lengths", stats_case


def stats_case():
    """effattn.diagnostics.attention_stats(..., return_output=True) compiled: the stats kernel's
    extra output, the stats against the float64 softmax, out and its gradients against the oracle."""
    from effattn.diagnostics import attention_stats
    from effattn.reference import reference_forward

    kl = torch.tensor([33, 10])
    kw = dict(is_causal=True, key_lengths=kl)
    fn = torch.compile(lambda q, k, v: attention_stats(q, k, v, backend="triton", return_output=True, **kw),
                       fullgraph=True, backend=aot_interpreted)
    q, k, v = conftest.make_qkv(B=2, Hq=2, L=40, S=33, E=16)
    out, stats = fn(q, k, v)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    leaves32 = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out64 = reference.attention(*leaves64, compute_dtype=torch.float64, **kw)
    out32 = reference.attention(*leaves32, **kw)
    out64.backward(g.double())
    out32.backward(g)
    conftest.assert_bound("out", out.detach(), out32.detach(), out64.detach(), torch.float32)
    for name, a, b, c in zip(("dq", "dk", "dv"), (q, k, v), leaves32, leaves64):
        conftest.assert_bound(name, a.grad, b.grad, c.grad, torch.float32)
    spec = effattn.make_spec(*(t.detach() for t in leaves64), return_stats=True, **kw)
    want = reference_forward(spec, torch.float64)[2]
    torch.testing.assert_close(stats.entropy.double(), want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.max_weight.double(), want[1], rtol=1e-5, atol=1e-6)


def dynamic_case():
    fn = compiled_attention(dynamic=True)
    graphs = len(GRAPHS)
    for L, S in ((40, 33), (52, 71)):
        effattn.attention = fn
        check(*conftest.make_qkv(B=2, Hq=2, L=L, S=S, E=16), is_causal=True, key_lengths=torch.tensor([S, 7]))
    assert len(GRAPHS) - graphs == 2, f"recompiled: {len(GRAPHS) - graphs} graphs for two lengths"


def main():
    results = {}
    only = os.environ.get("CASE")
    for name, run in cases():
        if only and not name.startswith(only):
            continue
        torch._dynamo.reset()
        effattn.attention = compiled_attention()
        first = len(GRAPHS)
        try:
            run()
            results[name] = dict(result="ok", graphs=GRAPHS[first:])
        except BaseException:  # pytest.skip included: every case here must be served
            results[name] = dict(result=traceback.format_exc()[-3000:], graphs=GRAPHS[first:])
        finally:
            effattn.attention = EAGER
    print(json.dumps(results))


if __name__ == "__main__":
    main()
