"""The custom ops as PyTorch sees them: opcheck (schema, fake, autograd
registration, AOT dispatch), gradcheck in float64, torch.compile without
graph breaks, the backend report, and the no-(L x S)-allocation promise."""
import os

import pytest
import torch

import torch.nn.attention.bias  # noqa: F401  (SDPA's causal mask objects)

import effattn
from effattn.backends import BY_NAME
from conftest import cpu_variant, largest_allocation, make_qkv, run_script


def _op_args(B=2, Hq=4, Hkv=2, L=19, S=23, E=8, Ev=8, dtype=torch.float64, mask=None, lengths=False,
             window=(None, None), layout="bhle"):
    """The op layer's arguments (effattn/ops.py): the band's sides (None: unbounded)."""
    q, k, v = make_qkv(B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=E, Ev=Ev, dtype=dtype, layout=layout)
    m = None
    if mask == "bool":
        m = (torch.rand(1, 1, L, S) > 0.3).expand(B, Hq, L, S)
    elif mask == "float":
        m = torch.randn(B, 1, L, S, dtype=dtype).expand(B, Hq, L, S)
    kl = torch.tensor([S, S // 2]) if lengths else None
    ql = torch.tensor([L - 3, L]) if lengths else None
    return (q, k, v, m, kl, ql, 0.3, window[0], window[1], cpu_variant())


OPCHECK_CASES = {
    "plain": dict(),
    "causal_gqa_lengths": dict(window=(None, 0), lengths=True),
    "bool_mask": dict(mask="bool"),
    "float_mask_window": dict(mask="float", window=(4, 2)),
    "negative_band": dict(window=(None, -5)),  # bottom-right causal with L > S
    "blhe_float32": dict(layout="blhe", dtype=torch.float32),
    "bf16": dict(dtype=torch.bfloat16, window=(None, 0)),
    "value_dim": dict(Ev=12),
}


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck_fwd(case):
    torch.library.opcheck(torch.ops.effattn.fwd.default, _op_args(**OPCHECK_CASES[case]))


@pytest.mark.parametrize("case", ["plain", "causal_gqa_lengths", "float_mask_window", "blhe_float32"])
def test_opcheck_bwd(case):
    args = _op_args(**OPCHECK_CASES[case])
    q, k, v = (t.detach() for t in args[:3])
    out, lse = torch.ops.effattn.fwd(q, k, v, *args[3:])
    grad_out = torch.randn_like(out)
    grad_lse = torch.randn_like(lse)
    for gl in (None, grad_lse):
        torch.library.opcheck(torch.ops.effattn.bwd.default, (grad_out, gl, q, k, v, out, lse, *args[3:]),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


GRADCHECK_CASES = {
    "plain": dict(),
    "causal_gqa": dict(is_causal=True, enable_gqa=True),
    "lengths_window": dict(key_lengths=torch.tensor([9, 4]), query_lengths=torch.tensor([7, 11]), window=(3, 1)),
    "causal_lower_right": dict(attn_mask="causal_lower_right"),
    "float_mask": dict(attn_mask=torch.randn(1, 1, 11, 13, dtype=torch.float64)),
    "bool_mask_empty_rows": dict(attn_mask=torch.arange(13).view(1, 1, 1, 13) < torch.tensor([0, 6]).view(2, 1, 1, 1)),
}


@pytest.mark.parametrize("case", GRADCHECK_CASES)
def test_gradcheck_float64(case):
    kw = GRADCHECK_CASES[case]
    if kw.get("attn_mask") == "causal_lower_right":
        kw = dict(attn_mask=torch.nn.attention.bias.causal_lower_right(11, 13))
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2 if kw.get("enable_gqa") else 4, L=11, S=13, E=8, dtype=torch.float64)

    def f(q, k, v):
        out, lse = effattn.attention(q, k, v, backend="cpu", return_lse=True, **kw)
        return out, torch.where(torch.isinf(lse), 0, lse)  # -inf lse of empty rows has no gradient

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_compile_fullgraph_forward_backward():
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, L=33, S=41, E=16, layout="blhe")
    kl = torch.tensor([41, 20])
    mask = torch.randn(33, 41)

    def f(q, k, v):
        out = effattn.attention(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True, key_lengths=kl,
                                window=(8, None))
        return out.float().square().sum()

    compiled = torch.compile(f, fullgraph=True)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    loss_eager = f(q2, k2, v2)
    grads_eager = torch.autograd.grad(loss_eager, (q2, k2, v2))
    torch.testing.assert_close(loss, loss_eager)
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b)


def test_compile_no_graph_breaks_explained():
    q, k, v = make_qkv(B=1, Hq=2, L=16, S=16, E=8, requires_grad=False)
    explanation = torch._dynamo.explain(lambda q, k, v: effattn.attention(q, k, v, is_causal=True))(q, k, v)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert "effattn.fwd" in str(explanation.graphs[0].graph)


def test_compile_walks_every_backend_without_graph_breaks():
    """Dispatch runs inside compiled code: every backend's checks (GPU ones included:
    Triton's and CUDA's availability, compute capability) must be constants to the
    compiler. A mask that requires grad makes the walk go past every fused backend."""
    import warnings
    torch._dynamo.reset()
    q, k, v = make_qkv(B=1, Hq=2, L=16, S=16, E=16)
    mask = torch.zeros(16, 16, requires_grad=True)

    def f(q, k, v, mask):
        return effattn.attention(q, k, v, attn_mask=mask)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the eager call warns about the reference fallback
        eager = f(q, k, v, mask)
        compiled = torch.compile(f, fullgraph=True)(q, k, v, mask)
    torch.testing.assert_close(compiled, eager)


def test_compile_dispatch_for_cuda_tensors_without_graph_breaks():
    """The dispatcher's CUDA-only checks (compute capability, compiled head dims,
    determinism) traced by dynamo on this machine: tests/dispatch_as_cuda.py, in a
    child process, makes the spec report cuda:0 and the driver answer as an H100
    would, with the driver queries opaque (a graph break unless effattn makes them
    constants). The GPU's own compile test is in test_triton.py."""
    import json
    pytest.importorskip("triton")
    stdout = run_script("dispatch_as_cuda.py", timeout=600)  # (no interpreter: the GPU's backend list)
    results = json.loads(stdout.strip().splitlines()[-1])
    # and as a T4 (compute capability 7.5) would: effattn's kernels decline, PyTorch's
    # memory-efficient kernel serves (float16; bfloat16 needs 8.0 there); in a build with the
    # Turing tiles (CI's), the cuda backend serves
    from effattn.backends.cuda import sm75_kernels_compiled
    t4 = json.loads(run_script("dispatch_as_cuda.py", "--capability", "7.5", timeout=600).strip().splitlines()[-1])
    t4_auto = "cuda" if sm75_kernels_compiled() else "sdpa_efficient"
    for case in ("auto", "auto, deterministic"):
        assert t4[case].get("picked") == (t4_auto if case == "auto" else "reference"), (case, t4[case])
        assert t4[case]["graph_breaks"] == 0, (case, t4[case]["reasons"])
    expected = {"auto": ("triton", "cuda"), "auto, deterministic": ("triton",), "cuda": ("cuda",),
                "triton": ("triton",), "walk to the reference": ("reference",)}
    for case, want in expected.items():
        got = results[case]
        if case == "cuda" and "unavailable" in got and "without its CUDA kernels" in got["unavailable"]:
            continue  # an EFFATTN_CPU_ONLY build
        assert got.get("picked") in want, (case, got)
        assert got["graph_breaks"] == 0, (case, got["reasons"])


def test_backends_report():
    rep = effattn.backends()
    assert rep["cpu"] == [] and rep["reference"] == []
    assert "cpu: ok" in str(rep)
    q, k, v = make_qkv(requires_grad=False)
    rep = effattn.backends(q, k, v, attn_mask=torch.zeros(37, 45, requires_grad=True))
    assert any("gradient of attn_mask" in r for r in rep["cpu"])
    assert rep.usable() == ["reference"]
    rep = effattn.backends(q, k, v, is_causal=True)
    # the CPU kernel first; Triton takes CPU tensors only under its interpreter (as in CI)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and not BY_NAME["triton"].unavailable_reasons()
    # (sdpa_efficient serves CPU tensors when asked for by name, and says that auto passes it over)
    assert rep.usable() == (["cpu", "triton", "sdpa_efficient", "reference"] if interpreted
                            else ["cpu", "sdpa_efficient", "reference"])
    assert "auto picks it only on CUDA GPUs below compute capability 8.0" in rep.variants["sdpa_efficient"]
    if not interpreted:
        assert any("cuda" in r.lower() for r in rep["triton"]), rep["triton"]


def test_cuda_build_serves_every_head_dim():
    # What the extension says it compiled (no GPU needed to ask): each head dim
    # goes to the smallest kernel tile that holds it (forward and backward, both dtypes).
    from effattn.backends import cuda
    if cuda.compiled_variants() == 0:
        pytest.skip("effattn was built without its CUDA kernels")
    if cuda.compiled_variants() & 0x3F != 0x3F:
        pytest.skip("a build of selected head dims (EFFATTN_CUDA_HEAD_DIMS)")
    for E, tile in ((8, 32), (40, 64), (96, 96), (128, 128), (160, 192), (200, 256), (256, 256), (257, 0)):
        assert cuda.kernel_head_dim(E) == tile, E


def test_auto_falls_back_to_reference_with_a_warning():
    q, k, v = make_qkv(requires_grad=False)
    mask = torch.zeros(37, 45, requires_grad=True)
    with pytest.warns(UserWarning, match=r"cpu: does not support the gradient of attn_mask.*reference"):
        out = effattn.attention(q, k, v, attn_mask=mask)
    out.sum().backward()
    assert mask.grad is not None and mask.grad.shape == mask.shape


def test_auto_picks_the_cpu_kernel(monkeypatch):
    calls = []
    from effattn.backends import BY_NAME
    orig = BY_NAME["cpu"].forward
    monkeypatch.setattr(BY_NAME["cpu"], "forward", lambda spec: calls.append(spec) or orig(spec))
    q, k, v = make_qkv(requires_grad=False)
    effattn.attention(q, k, v, key_lengths=torch.tensor([3, 45]), window=(4, 4))
    assert len(calls) == 1


@pytest.mark.parametrize("opts", [dict(), dict(is_causal=True), dict(key_lengths=torch.tensor([1000, 300])),
                                  dict(window=(16, 16)), dict(attn_mask="key_padding"),
                                  dict(enable_gqa=True)])
def test_no_seq_by_seq_allocation(opts):
    """Forward + backward allocate nothing near the size of one (L, S) score matrix."""
    B, Hq, L, S, E = 2, 4, 1000, 1000, 16
    q, k, v = make_qkv(B=B, Hq=Hq, Hkv=2 if opts.get("enable_gqa") else Hq, L=L, S=S, E=E)
    if opts.get("attn_mask") == "key_padding":
        opts = dict(attn_mask=torch.arange(S).view(1, 1, 1, S) < torch.tensor([S, S // 3]).view(B, 1, 1, 1))

    def step():
        out = effattn.attention(q, k, v, backend="cpu", **opts)
        out.backward(torch.ones_like(out))

    one_score_matrix = L * S * 4  # a single (L, S) float32 matrix; naive math allocates B*H of these
    biggest = largest_allocation(step)
    io = B * Hq * L * E * 4
    assert biggest <= max(io * 2, one_score_matrix // 4), (biggest, one_score_matrix)
    # and the check can fail: the reference math does allocate (B, H, L, S)
    ref_biggest = largest_allocation(lambda: effattn.attention(q, k, v, backend="reference", **opts))
    assert ref_biggest >= one_score_matrix


def _cuobjdump():
    """cuobjdump from the CUDA toolkit, or the one Triton ships; None if neither is there."""
    import shutil
    found = [shutil.which("cuobjdump"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    try:
        import triton.backends.nvidia
        found.append(os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((f for f in found if f and os.access(f, os.X_OK)), None)


def test_hopper_kernels_fit_their_registers():
    # The Hopper kernels hold whole accumulator tiles in registers (the backward
    # at D = 128 uses 252 of 255): an edit that tips one into spilling (local
    # memory) would slow it down silently. Read from the built module itself.
    import re
    import subprocess
    import effattn._C
    from effattn.backends import cuda
    if not cuda.sm90_kernels_compiled():
        pytest.skip("effattn was built without its Hopper kernels (no 9.0a in the arch list)")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's) to read the kernels' resource usage")
    out = subprocess.run([tool, "--dump-resource-usage", effattn._C.__file__], capture_output=True, text=True,
                         check=True).stdout
    usage = dict(re.findall(r"Function (\S*sm90_kernel\S*):\s*\n\s*(REG:.*)", out))
    assert len(usage) >= 8, f"expected the Hopper forward and backward x 2 dtypes x 2 head dims, got {list(usage)}"
    for name, res in usage.items():
        assert "STACK:0 " in res and "LOCAL:0 " in res, f"{name} spills: {res}"


def test_generated_cuda_files_are_current():
    # csrc/cuda's generated files (kernel instantiations, the wgmma wrappers) are
    # what generate_kernels.py writes now: an edit of either side alone fails here.
    import importlib.util
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "cuda")
    spec = importlib.util.spec_from_file_location("generate_kernels", os.path.join(root, "generate_kernels.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    files = gen.generated_files()
    assert "wgmma.h" in files and any(p.startswith("instantiations/fwd_") for p in files)
    for rel, text in files.items():
        with open(os.path.join(root, rel)) as f:
            assert f.read() == text, f"csrc/cuda/{rel} differs from generate_kernels.py's output: rerun it"
    on_disk = {f"instantiations/{n}" for n in os.listdir(os.path.join(root, "instantiations"))}
    assert on_disk == {p for p in files if p.startswith("instantiations/")}, "stale instantiation files"


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_double_backward_is_an_error_not_a_silent_zero(backend):
    # A gradient penalty through attention: gradients taken with create_graph=True
    # are right, and differentiating them again raises an error naming effattn
    # (before, they carried no graph, so the penalty's part was silently dropped).
    dtype = torch.float64 if backend == "cpu" else torch.float32  # triton: no float64
    q, k, v = make_qkv(B=1, Hq=2, L=9, S=9, E=8, dtype=dtype)
    reasons = effattn.backends(q, k, v)[backend]
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))
    w = torch.randn(8, 8, dtype=dtype, requires_grad=True)
    out = effattn.attention(q, k, v, backend=backend)
    dq, = torch.autograd.grad(out.sum(), q, create_graph=True)
    ref = effattn.attention(q, k, v, backend="reference")
    dq_ref, = torch.autograd.grad(ref.sum(), q)
    torch.testing.assert_close(dq.detach(), dq_ref, atol=1e-4 if backend == "triton" else 1e-7, rtol=1e-4)
    assert dq.requires_grad
    with pytest.raises(RuntimeError, match="effattn: attention's backward is not itself differentiable"):
        (dq.pow(2).sum() + (q @ w).sum()).backward()
