"""What the shared matrix (test_attention.py) does not reach in the Triton
backend: the split-keys path for short queries, TF32 by default, the op
registration, and, on a GPU only, torch.compile, autotuning, long sequences
and the no-(L x S) memory promise. The Triton kernels run on the GPU when
there is one, else on the CPU under Triton's interpreter (conftest sets it)."""
import itertools
import math

import pytest
import torch

import effattn
from conftest import BackendCase, check_against_oracle, make_qkv, on_device, run_script
from effattn.backends import BY_NAME
from effattn.backends import triton as triton_backend
from effattn.spec import make_spec

_REASONS = BY_NAME["triton"].unavailable_reasons()
pytestmark = pytest.mark.skipif(bool(_REASONS), reason="; ".join(_REASONS))

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
TRITON = BackendCase("triton", DEVICE)
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (torch.compile and timing-sized shapes)")


@pytest.fixture(autouse=True)
def _exact_fp32():
    saved = triton_backend.get_float32_precision()
    triton_backend.set_float32_precision("ieee")
    yield
    triton_backend.set_float32_precision(saved)


@pytest.mark.parametrize("L,dtype,extra", [
    (1, torch.float32, "none"), (16, torch.bfloat16, "none"), (5, torch.float32, "lengths"),
    (16, torch.float32, "mask"), (1, torch.bfloat16, "window"), (5, torch.float16, "mask")])
def test_short_queries_split_keys(L, dtype, extra):
    """Lq <= 16 over many keys: the keys are split across programs and merged by LSE."""
    from effattn.triton import ops
    S = 1100
    assert ops._num_splits(2, S, torch.device(DEVICE)) > 1  # the path under test is taken
    q, k, v = make_qkv(B=1, Hq=2, L=L, S=S, E=40, dtype=dtype)
    kw = {}
    if extra == "lengths":
        kw["key_lengths"] = torch.tensor([700])
    elif extra == "mask":
        kw["attn_mask"] = torch.rand(1, 2, L, S, generator=torch.Generator().manual_seed(4)) > 0.5
    elif extra == "window":
        kw.update(window=(None, 600), is_causal=False)
    check_against_oracle(q, k, v, TRITON, **kw)


TMA_CASES = {
    "dense": (dict(E=64), {}),
    "causal_gqa_bf16": (dict(Hq=4, Hkv=2, E=32, dtype=torch.bfloat16), dict(is_causal=True, enable_gqa=True)),
    "lengths_window": (dict(E=64), dict(key_lengths=torch.tensor([300, 170]), window=(None, 150))),
    "mask_blhe_fp16": (dict(E=32, dtype=torch.float16, layout="blhe"),
                       dict(attn_mask=torch.rand(1, 1, 300, 300, generator=torch.Generator().manual_seed(3)) > 0.3)),
    "value_dim": (dict(E=32, Ev=64), {}),
}


@pytest.mark.parametrize("case", TMA_CASES)
def test_tensor_descriptor_loads(case, monkeypatch):
    """effattn.config.triton_tma = "1" (opt-in): the forward's interior K/V blocks through
    tensor descriptors, as exact as the plain loads; and the path is really
    taken (300 keys leave interior blocks)."""
    from effattn.triton import ops
    monkeypatch.setattr(effattn.config, "triton_tma", "1")
    taken = []
    real = ops._use_tma
    monkeypatch.setattr(ops, "_use_tma", lambda *a: taken.append(real(*a)) or taken[-1])
    shape, kw = TMA_CASES[case]
    q, k, v = make_qkv(**{"B": 2, "Hq": 2, "L": 300, "S": 300, **shape})
    check_against_oracle(q, k, v, TRITON, **kw)
    assert taken and all(taken), taken


def test_tensor_descriptor_loads_decline_unaligned_strides(monkeypatch):
    from effattn.triton import ops
    tma = triton_backend.TMA
    q, k, v = make_qkv(B=1, Hq=2, L=40, S=40, E=16, layout="strided", requires_grad=False)  # rows of 21
    assert not ops._use_tma(q, k, v, 16, 16, tma)
    q, k, v = make_qkv(B=1, Hq=2, L=40, S=40, E=40, requires_grad=False)  # not a power of two
    assert not ops._use_tma(q, k, v, 64, 64, tma)
    q, k, v = make_qkv(B=1, Hq=2, L=40, S=40, E=16, requires_grad=False)
    assert ops._use_tma(q, k, v, 16, 16, tma)  # the control: aligned and opted in
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:  # torch.compile tracing the op's body: no device-side descriptors
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        assert not ops._use_tma(fq, fk, fv, 16, 16, tma)
    assert not ops._use_tma(q, k, v, 16, 16, 0)  # not opted in
    # the config is what sets the variant's bit, and effattn.backends names it
    monkeypatch.setattr(effattn.config, "triton_tma", "1")
    assert triton_backend.TritonBackend().variant_bits(make_spec(q, k, v)) & tma
    assert "tensor-descriptor" in effattn.backends(q, k, v).variants["triton"]


# Shared memory per block: H100 (sm_90), A100 (sm_80), RTX 30xx/40xx (sm_86/89).
SMEM_LIMITS = {"sm_90": 232448, "sm_80": 166912, "sm_86": 101376}


@pytest.mark.parametrize("gpu", SMEM_LIMITS)
@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq"])
def test_configs_fit_the_gpus_shared_memory(kind, gpu):
    """Every kernel has configs whose shared memory (the sm_90 allocation, an
    upper bound on sm_80/86: bench/dev/triton_aot.py) fits each GPU, at every
    head dim and dtype size; the short-query config too. Before, the short
    path and head dim 256 asked 99 KB GPUs for 106-168 KB."""
    from effattn.triton import configs
    limit = SMEM_LIMITS[gpu]
    for d_pad, elem, masked in itertools.product((16, 32, 64, 128, 256), (2, 4), (False, True)):
        case = (d_pad, elem, masked)
        cands = configs.configs(kind, d_pad, elem, limit, masked)
        assert cands and all(configs.smem_bytes(c, kind, d_pad, elem, masked) <= limit for c in cands), case
        if kind != "dkdv":
            short = configs.short(d_pad, elem, False, limit, masked)
            assert configs.smem_bytes(short, kind, d_pad, elem, masked) <= limit, (case, short)


@pytest.mark.parametrize("arch,kernels,head_dim", [(80, "dkdv,dq", 128), (90, "fwd", 256)])
def test_masked_configs_fit_when_compiled(arch, kernels, head_dim):
    """What configs.py picks for a float32 mask, compiled for the GPU by Triton and ptxas
    (bench/dev/triton_aot.py, no GPU needed), fits the GPU's shared memory. Before the
    mask's pipelined tiles were counted these needed 193 KB (dK/dV) and 180 KB (dQ) of an
    A100's 163, and 240 KB (the forward at head dim 256) of an H100's 227."""
    limit = {80: SMEM_LIMITS["sm_80"], 90: SMEM_LIMITS["sm_90"]}[arch]
    stdout = run_script("../bench/dev/triton_aot.py", "--variants", "--kernels", kernels, "--arch", str(arch),
                        "--fit", str(limit), "--only", f"float mask (fp32)@{head_dim}", timeout=600)
    rows = [line for line in stdout.splitlines() if "float mask (fp32)" in line]
    assert len(rows) == len(kernels.split(",")), stdout
    for row in rows:
        shared_kb = row.split("|")[6].strip()
        assert shared_kb.isdigit() and int(shared_kb) * 1024 <= limit, row


@pytest.mark.skipif(GPU, reason="forces the interpreter's blocks (the GPU's come from configs.configs)")
def test_smallest_blocks(monkeypatch):
    # The 16 x 16 tiles of the smallest configs (float32 at head dim 256 on 99 KB GPUs), forward and
    # backward, under the interpreter: the kernels are the same for every block size.
    from effattn.triton import configs
    monkeypatch.setattr(configs, "INTERPRETER", (16, 16, 4, 1))
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, L=37, S=45, E=24)
    check_against_oracle(q, k, v, TRITON, is_causal=True, enable_gqa=True, key_lengths=torch.tensor([45, 20]))


def _launch_configs(kind):
    """Every config a GPU may launch for a kernel: its autotune list, the additions for
    smaller shared memory, and (forward, dQ) the short-query configs."""
    from effattn.triton import configs
    table = {"fwd": configs.FWD, "dkdv": configs.DKDV, "dq": configs.DQ}[kind] + configs.SMALLER_SMEM[kind]
    return [("tiled", c) for c in table] + ([("short", c) for c in configs.SHORT] if kind != "dkdv" else [])


@pytest.mark.parametrize("kind,path,config", [
    (kind, path, config) for kind in ("fwd", "dkdv", "dq") for path, config in _launch_configs(kind)],
    ids=lambda x: "-".join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_every_config_a_gpu_may_launch(kind, path, config, monkeypatch):
    """The kernels are correct with every config of the lists, not only the first (which
    the GPU tests otherwise fix) or the interpreter's square blocks: the autotuner may
    pick any of them. Rectangular tiles move the causal diagonal and the window's edges
    across block boundaries; L < S and L > S, lengths, GQA, a mask. On a GPU each config
    is compiled and run as the autotuner would, in bf16; under the interpreter (float32)
    only the block shape matters."""
    from effattn.triton import configs
    launcher = configs.launcher
    block_m, block_n, warps, stages = config
    dtype = torch.bfloat16 if GPU else torch.float32

    def forced_launcher(kernel, k, *args, **kwargs):
        if k != kind:
            return launcher(kernel, k, *args, **kwargs)
        return kernel, dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)

    if path == "tiled":
        monkeypatch.setattr(configs, "launcher", forced_launcher)
        q, k, v = make_qkv(B=2, Hq=2, Hkv=1, L=150, S=200, E=32, dtype=dtype)
        check_against_oracle(q, k, v, TRITON, grads=kind != "fwd", is_causal=True, enable_gqa=True,
                             key_lengths=torch.tensor([200, 111]), query_lengths=torch.tensor([140, 150]))
        q, k, v = make_qkv(B=2, Hq=2, L=200, S=150, E=24, dtype=dtype)
        mask = torch.rand(200, 150, generator=torch.Generator().manual_seed(6)) > 0.2
        check_against_oracle(q, k, v, TRITON, grads=kind != "fwd", window=(40, 25), attn_mask=mask,
                             key_lengths=torch.tensor([150, 97]))
    else:  # split keys: forward and dQ take the short config
        monkeypatch.setattr(configs, "short", lambda *a, **kw: config)
        from effattn.triton import ops
        assert ops._num_splits(2, 700, torch.device(DEVICE)) > 1  # the path under test is taken
        q, k, v = make_qkv(B=1, Hq=2, L=5, S=700, E=32, dtype=dtype)
        check_against_oracle(q, k, v, TRITON, grads=kind != "fwd", is_causal=True,
                             key_lengths=torch.tensor([650]), window=(600, None))


def test_backend_says_when_torch_cannot_launch_interpreted_kernels(monkeypatch):
    """torch 2.11's wrap_triton rejects interpreted kernels (checked with torch 2.11.0 and
    Triton 3.6): under TRITON_INTERPRET=1 the backend then declares itself unavailable,
    in words, instead of failing inside a launch."""
    import torch.library

    def reject(kernel):
        raise RuntimeError("wrap_triton only works on functions annotated with triton.jit or triton.autotune")

    assert triton_backend._interpreter_problem() == ""  # this torch launches them (or the kernels are JIT)
    monkeypatch.setattr(torch.library, "wrap_triton", reject)
    assert "needs a newer torch" in triton_backend._interpreter_problem()


def test_fixed_configs_on_hopper_are_the_gpu_tested_ones():
    # EFFATTN_TRITON_AUTOTUNE=0 takes the first config: on an H100 these ran the GPU tests.
    from effattn.triton import configs
    first = {k: {d: configs.configs(k, d, 2, SMEM_LIMITS["sm_90"])[0] for d in (64, 128, 256)}
             for k in ("fwd", "dkdv", "dq")}
    assert first == {"fwd": {64: (128, 64, 4, 3), 128: (128, 64, 4, 3), 256: (128, 32, 4, 4)},
                     "dkdv": {64: (64, 128, 8, 3), 128: (64, 128, 8, 3), 256: (32, 64, 4, 2)},
                     "dq": {64: (128, 64, 8, 3), 128: (128, 64, 8, 3), 256: (64, 32, 4, 2)}}
    assert configs.short(128, 2, False, SMEM_LIMITS["sm_90"]) == (16, 128, 4, 3)
    assert configs.short(256, 2, False, SMEM_LIMITS["sm_90"]) == (16, 64, 4, 3)


def test_short_query_that_sees_nothing_in_some_splits():
    # key_lengths end inside the first split: the other splits see no key (lse -inf, weight 0)
    q, k, v = make_qkv(B=2, Hq=1, L=3, S=1200, E=16)
    check_against_oracle(q, k, v, TRITON, key_lengths=torch.tensor([10, 0]))


def test_float32_uses_tf32_by_default_and_ieee_on_request():
    q, k, v = on_device(DEVICE, *make_qkv(B=1, Hq=2, L=64, S=64, E=32, requires_grad=False))
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    triton_backend.set_float32_precision("tf32")
    assert triton_backend.get_float32_precision() == "tf32"
    tf32 = effattn.attention(q, k, v, backend="triton")
    triton_backend.set_float32_precision("ieee")
    ieee = effattn.attention(q, k, v, backend="triton")
    assert (ieee.double() - ref).abs().max() < 1e-5
    assert (tf32.double() - ref).abs().max() < 5e-3
    with pytest.raises(ValueError, match="'tf32' or 'ieee'"):
        triton_backend.set_float32_precision("fp16")


def test_head_dim_over_256_is_declined_with_a_reason():
    q, k, v = on_device(DEVICE, *make_qkv(B=1, Hq=1, L=4, S=4, E=264, requires_grad=False))
    reasons = effattn.backends(q, k, v)["triton"]
    assert any("head dims up to 256" in r for r in reasons), reasons


def test_float64_is_declined_with_a_reason():
    q, k, v = on_device(DEVICE, *make_qkv(B=1, Hq=1, L=4, S=4, E=16, dtype=torch.float64))
    assert any("float64" in r for r in effattn.backends(q, k, v)["triton"])


def test_ops_are_registered_as_custom_ops():
    from effattn.triton import ops  # noqa: F401  (registers them)
    assert hasattr(torch.ops.effattn, "triton_fwd") and hasattr(torch.ops.effattn, "triton_bwd")
    q, k, v = on_device(DEVICE, *make_qkv(B=1, Hq=2, L=20, S=24, E=16))
    out, lse = torch.ops.effattn.triton_fwd(q, k, v, None, None, None, 0.25, None, 0, triton_backend.FP32_IEEE)
    assert out.shape == (1, 2, 20, 16) and lse.shape == (1, 2, 20) and lse.dtype == torch.float32


# ---------------------------------------------------------------- GPU only
@needs_gpu
def test_is_the_auto_backend_for_cuda_tensors():
    q, k, v = on_device("cuda", *make_qkv(B=1, Hq=2, L=20, S=24, E=64, dtype=torch.bfloat16))
    assert effattn.backends(q, k, v).usable()[0] in ("cuda", "triton")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_long_sequences_on_gpu(dtype, causal):
    check_against_oracle(*make_qkv(B=1, Hq=2, L=2500, S=2500, E=128, dtype=dtype), TRITON, is_causal=causal)


@needs_gpu
def test_autotuned_launch_matches(monkeypatch):
    monkeypatch.setenv("EFFATTN_TRITON_AUTOTUNE", "1")
    check_against_oracle(*make_qkv(B=2, Hq=4, L=700, S=900, E=64, dtype=torch.bfloat16), TRITON,
                         is_causal=True, key_lengths=torch.tensor([900, 333]))


@needs_gpu
def test_float32_gradients_at_large_logits():
    """Peaked softmax (scale 2 at E = 72: logits of std ~17, |lse| ~ 100) in exact float32.
    The backward's recomputed scores must round as the forward's did, or P drifts from
    the saved lse and the gradients lose the softmax's normalisation. Under the
    interpreter they do not (numpy rounds Q K^T and K Q^T differently): dv is 5x math's
    error there, so this runs on a GPU only, against 2x math with no floor."""
    q, k, v = make_qkv(B=2, Hq=2, L=130, S=97, E=72, dtype=torch.float32, seed=5)
    check_against_oracle(q, k, v, TRITON, floor=False, scale=2.0)


@needs_gpu
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph_forward_and_backward(dynamic):
    """Compiled (inductor, autotuned launches) equals eager, forward bitwise and
    gradients to rounding; with dynamic shapes two lengths share one graph."""
    torch._dynamo.reset()

    def f(q, k, v, lengths):
        return effattn.attention(q, k, v, is_causal=True, enable_gqa=True, key_lengths=lengths)

    compiled_f = torch.compile(f, fullgraph=True, dynamic=dynamic)
    for step, (L, S) in enumerate(((300, 260), (333, 410)) if dynamic else ((300, 260),)):
        if step:  # the second length must reuse the first graph
            compiled_f = torch.compiler.set_stance("fail_on_recompile")(compiled_f)
        q, k, v = on_device("cuda", *make_qkv(B=2, Hq=4, Hkv=2, L=L, S=S, E=64, dtype=torch.bfloat16))
        lengths = torch.tensor([S, 100], device="cuda")
        eager = f(q, k, v, lengths)
        eager.float().square().sum().backward()
        grads = [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        compiled = compiled_f(q, k, v, lengths)
        compiled.float().square().sum().backward()
        torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
        for g, t in zip(grads, (q, k, v)):
            torch.testing.assert_close(t.grad, g, atol=1e-2, rtol=1e-2)


# The tensors each kernel writes, as torch.compile must find them in its IR (else it
# assumes every argument is written, and copies q, k and v before the launch).
KERNEL_WRITES = {"attn_fwd_kernel": ["LSE", "O"], "merge_splits_kernel": ["LSE", "O"],
                 "bwd_preprocess_kernel": ["DELTA", "LSE2"], "bwd_dkdv_kernel": ["DK", "DV"],
                 "bwd_dq_kernel": ["DQ"]}


@pytest.mark.skipif(GPU, reason="on a GPU test_torch_compile_fullgraph_forward_and_backward compiles and runs "
                                "the kernels for real")
def test_compile_traces_the_kernels_and_its_graphs_run_interpreted():
    """torch.compile(effattn.attention, fullgraph=True) on the Triton backend without a
    GPU: tests/triton_compiled_on_cpu.py, in a child process, traces the real
    @triton.jit kernels into the graphs (a stub driver answers torch's IR analysis
    as sm_90), then runs the compiled graphs with each kernel interpreted, against
    the float64 oracle: causal, GQA, lengths, masks, window, a strided layout,
    split keys, gradients through the LSE, dynamic shapes (two lengths, one
    graph) and attention_stats with its output. Eager launches fail in that process, so no case passes by falling back.
    Inductor's code generation is left to the GPU test."""
    import json
    results = json.loads(run_script("triton_compiled_on_cpu.py").strip().splitlines()[-1])
    assert len(results) == 7, list(results)
    for case, got in results.items():
        assert got["result"] == "ok", f"{case}:\n{got['result']}"
        assert len(got["graphs"]) == 2, f"{case}: {len(got['graphs'])} graphs (a recompile?)"
        forward, backward = ([name for name, _ in graph] for graph in got["graphs"])
        split = "split keys" in case
        assert forward == ["attn_fwd_kernel"] + (["merge_splits_kernel"] if split else []), (case, forward)
        assert backward == ["bwd_preprocess_kernel", "bwd_dkdv_kernel", "bwd_dq_kernel"], (case, backward)
        stats = case.startswith("attention statistics")  # the forward's third output
        for name, writes in got["graphs"][0] + got["graphs"][1]:
            want = sorted(KERNEL_WRITES[name] + ["STATS_OUT"]) if stats and name == "attn_fwd_kernel" \
                else KERNEL_WRITES[name]
            assert writes == want, f"{case}: torch.compile finds {name} writing {writes}"


@needs_gpu
@pytest.mark.parametrize("extra", ["causal", "key_padding", "mask"])
def test_no_seq_by_seq_allocation_on_gpu(extra):
    """Peak memory of forward+backward stays O(L): far below one (L, S) fp32 tensor."""
    B, H, L, E = 1, 4, 8192, 64
    q, k, v = (torch.randn(B, H, L, E, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    kw = {"causal": dict(is_causal=True),
          "key_padding": dict(key_lengths=torch.tensor([5000], device="cuda")),
          "mask": dict(attn_mask=torch.arange(L, device="cuda").view(1, 1, 1, L) < 6000)}[extra]
    effattn.attention(q, k, v, **kw).sum().backward()  # warm-up (compiles, autotunes)
    torch.cuda.synchronize()
    for t in (q, k, v):
        t.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = effattn.attention(q, k, v, **kw)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    extra_bytes = torch.cuda.max_memory_allocated() - base
    io_bytes = 5 * q.numel() * q.element_size()  # out, grad_out, dq, dk, dv
    one_scores = B * H * L * L * 4
    assert extra_bytes < io_bytes + 4 * B * H * L * 4 + (1 << 20), (extra_bytes, io_bytes)
    assert extra_bytes < one_scores / 8


@needs_gpu
def test_one_query_over_a_million_keys():
    """Attention pooling at scale: one query, 2**20 keys (split over the GPU)."""
    S = 1 << 20
    q, k, v = (torch.randn(1, 1, n, 64, device="cuda", dtype=torch.bfloat16) for n in (1, S, S))
    out, lse = effattn.attention(q, k, v, return_lse=True)
    ref_lse = torch.logsumexp((q.float() @ k.float().transpose(-1, -2)) / math.sqrt(64), -1)
    ref = torch.softmax((q.float() @ k.float().transpose(-1, -2)) / math.sqrt(64), -1) @ v.float()
    assert (lse - ref_lse).abs().max() < 1e-3
    assert (out.float() - ref).abs().max() < 1e-2
