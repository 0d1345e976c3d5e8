"""Bad input gets a ValueError/RuntimeError naming the tensor, the dimension
and what was expected; never a crash, a hang or a silently wrong result."""
import pytest
import torch

import effattn
from conftest import cpu_variant


def qkv(B=2, H=4, L=8, S=10, E=16, dtype=torch.float32):
    return (torch.randn(B, H, L, E, dtype=dtype), torch.randn(B, H, S, E, dtype=dtype),
            torch.randn(B, H, S, E, dtype=dtype))


q, k, v = qkv()
CASES = [
    # (description, call kwargs, exception, regex the message must match)
    ("head dim", dict(key=torch.randn(2, 4, 10, 8)), ValueError, r"key\.size\(-1\) = 8 .*query\.size\(-1\) = 16"),
    ("value length", dict(value=torch.randn(2, 4, 9, 16)), ValueError, r"value\.size\(-2\) = 9 .*key\.size\(-2\) = 10"),
    ("batch", dict(key=torch.randn(3, 4, 10, 16), value=torch.randn(3, 4, 10, 16)), ValueError, r"key\.size\(0\) = 3 .*query\.size\(0\) = 2"),
    ("heads without gqa", dict(key=torch.randn(2, 2, 10, 16), value=torch.randn(2, 2, 10, 16)), ValueError, r"key\.size\(-3\) = 2 .*query\.size\(-3\) = 4.*enable_gqa"),
    ("gqa not a multiple", dict(key=torch.randn(2, 3, 10, 16), value=torch.randn(2, 3, 10, 16), enable_gqa=True), ValueError, r"multiple.*key\.size\(-3\) = 3"),
    ("k/v heads differ", dict(value=torch.randn(2, 2, 10, 16), enable_gqa=True), ValueError, r"key\.size\(-3\) = 4 and value\.size\(-3\) = 2"),
    ("ranks", dict(key=torch.randn(4, 10, 16)), ValueError, r"same number of dims"),
    ("1-d", dict(query=torch.randn(16)), ValueError, r"query must have at least 2 dims"),
    ("dtype mismatch", dict(key=k.double()), ValueError, r"key has dtype torch.float64 but query has torch.float32"),
    ("integer dtype", dict(query=q.long(), key=k.long(), value=v.long()), ValueError, r"query dtype must be one of"),
    ("not a tensor", dict(value=[1, 2]), ValueError, r"value must be a torch.Tensor"),
    ("mask shape", dict(attn_mask=torch.ones(8, 9, dtype=torch.bool)), ValueError, r"attn_mask of shape \(8, 9\) does not broadcast to \(2, 4, 8, 10\)"),
    ("mask dtype", dict(attn_mask=torch.ones(8, 10, dtype=torch.int64)), ValueError, r"attn_mask dtype must be bool, float32 or the dtype of query"),
    ("mask dtype f16", dict(attn_mask=torch.ones(8, 10, dtype=torch.float16)), ValueError, r"attn_mask dtype"),
    ("negative key length", dict(key_lengths=torch.tensor([3, -1])), ValueError, r"key_lengths must be >= 0"),
    ("key length too large", dict(key_lengths=torch.tensor([3, 11])), ValueError, r"key_lengths must be <= key\.size\(-2\) = 10"),
    ("query length too large", dict(query_lengths=torch.tensor([9, 1])), ValueError, r"query_lengths must be <= query\.size\(-2\) = 8"),
    ("lengths shape", dict(key_lengths=torch.tensor([3, 4, 5])), ValueError, r"key_lengths must have shape \(2,\)"),
    ("lengths dtype", dict(key_lengths=torch.tensor([3.0, 4.0])), ValueError, r"key_lengths must have an integer dtype"),
    ("negative window", dict(window=(-2, 3)), ValueError, r"window left size must be >= 0"),
    ("window not a pair", dict(window=5), ValueError, r"window must be a pair"),
    ("window float", dict(window=(1.5, None)), ValueError, r"window left size must be an int"),
    ("dropout", dict(dropout_p=0.1), NotImplementedError, r"no backend can serve this call: cpu: does not support dropout"),
    ("dropout range", dict(dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\]"),
    ("scale", dict(scale=float("nan")), ValueError, r"scale must be a finite"),
    ("backend name", dict(backend="cudnn"), ValueError, r"unknown backend 'cudnn'"),
]


ENTRIES = {"attention": effattn.attention, "attention_stats": effattn.diagnostics.attention_stats}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("desc,kw,exc,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input(entry, desc, kw, exc, pattern):
    """Every public entry that takes attention's arguments gives the same errors."""
    args = dict(query=q, key=k, value=v)
    args.update(kw)
    with pytest.raises(exc, match=pattern):
        ENTRIES[entry](**args)


def test_device_mismatch():
    meta = torch.empty(2, 4, 10, 16, device="meta")
    with pytest.raises(ValueError, match=r"key is on meta but query is on cpu"):
        effattn.attention(q, meta, v)


def test_backend_that_cannot_serve_says_why():
    with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot serve this call: .*gradient of attn_mask"):
        effattn.attention(q, k, v, attn_mask=torch.zeros(8, 10, requires_grad=True), backend="cpu")


def test_raw_op_checks_lengths_too():
    # The ops can be called directly: the C++ side checks what Python would have.
    isa = cpu_variant()
    with pytest.raises(RuntimeError, match=r"key_lengths\[1\] = 11 is outside \[0, 10\]"):
        torch.ops.effattn.fwd(q, k, v, None, torch.tensor([3, 11]), None, 0.25, None, None, isa)
    with pytest.raises(RuntimeError, match=r"key\.size\(3\) = 8 but expected 16"):
        torch.ops.effattn.fwd(q, torch.randn(2, 4, 10, 8), v, None, None, None, 0.25, None, None, isa)
    with pytest.raises(RuntimeError, match=r"contiguous last dimension"):
        torch.ops.effattn.fwd(q.transpose(-1, -2).contiguous().transpose(-1, -2).contiguous().transpose(2, 3),
                              k, v, None, None, None, 0.25, None, None, isa)


def _raw_ops(family):
    """(fwd, bwd, variant) of an op family: the C++ ops effattn::fwd/bwd, or the Triton
    ops; both take the same arguments (effattn/ops.py)."""
    if family == "cpp":
        return torch.ops.effattn.fwd, torch.ops.effattn.bwd, cpu_variant()
    pytest.importorskip("triton")
    from effattn.triton import ops as triton_ops  # noqa: F401 (registers the ops)
    return torch.ops.effattn.triton_fwd, torch.ops.effattn.triton_bwd, 0


def _raw_backward_args(variant, **change):
    out, lse = torch.ops.effattn.fwd(q, k, v, None, None, None, 0.25, None, None, cpu_variant())
    args = dict(grad_out=torch.randn_like(out), grad_lse=None, q=q, k=k, v=v, out=out, lse=lse, mask=None,
                key_lengths=None, query_lengths=None, scale=0.25, window_left=None, window_right=None,
                variant=variant)
    args.update(change)
    return list(args.values())


@pytest.mark.parametrize("family", ["cpp", "triton"])
@pytest.mark.parametrize("change,pattern", [
    # a wrong-sized lse or grad_lse was read out of bounds (a crash at size 0)
    (dict(lse=torch.zeros(2, 4, 7)), r"lse\.size\(2\) = 7 but expected 8"),
    (dict(lse=torch.zeros(0, 4, 8)), r"lse\.size\(0\) = 0 but expected 2"),
    (dict(lse=torch.zeros(2, 4, 8, 1)), r"lse must be 3-D \(batch, heads, seq\), got 4 dims"),
    (dict(grad_lse=torch.zeros(2, 3, 8)), r"grad_lse\.size\(1\) = 3 but expected 4"),
    (dict(grad_lse=torch.zeros(2, 4, 8, dtype=torch.int32)), r"grad_lse must have a floating-point dtype"),
    (dict(grad_out=torch.zeros(2, 4, 8, 15)), r"grad_out\.size\(3\) = 15 but expected 16"),
], ids=["lse length", "lse batch", "lse rank", "grad_lse heads", "grad_lse dtype", "grad_out dim"])
def test_raw_backward_checks_its_tensors(family, change, pattern):
    fwd, bwd, variant = _raw_ops(family)
    with pytest.raises(RuntimeError, match=pattern):
        bwd(*_raw_backward_args(variant, **change))


@pytest.mark.parametrize("family", ["cpp", "triton"])
def test_raw_ops_check_devices(family):
    # A meta tensor among CPU ones reaches the fake kernels (effattn/ops.py) or the Triton
    # op's check; a CPU one among CUDA ones the C++ check (tests/test_cuda.py).
    fwd, bwd, variant = _raw_ops(family)
    meta = torch.empty(2, dtype=torch.int64, device="meta")
    with pytest.raises(RuntimeError, match=r"key_lengths is on meta but query is on cpu"):
        fwd(q, k, v, None, meta, None, 0.25, None, None, variant)
    with pytest.raises(RuntimeError, match=r"lse is on meta but query is on cpu"):
        bwd(*_raw_backward_args(variant, lse=torch.empty(2, 4, 8, device="meta")))


def _forward_op(name):
    """A forward op by name, with its variant: the C++ fwd / fwd_stats or the Triton ones."""
    if name.startswith("triton"):
        pytest.importorskip("triton")
        from effattn.triton import ops as triton_ops  # noqa: F401 (registers the ops)
        return getattr(torch.ops.effattn, name), 0
    return getattr(torch.ops.effattn, name), cpu_variant()


@pytest.mark.parametrize("name", ["fwd", "fwd_stats", "triton_fwd", "triton_fwd_stats"])
@pytest.mark.parametrize("change,pattern", [
    (dict(k=torch.randn(2, 4, 10, 8)), r"key\.size\(3\) = 8 but expected 16"),
    (dict(v=torch.randn(2, 4, 9, 16)), r"value\.size\(2\) = 9 but expected 10"),
    (dict(k=torch.randn(3, 4, 10, 16), v=torch.randn(3, 4, 10, 16)), r"key\.size\(0\) = 3 but expected 2"),
    (dict(k=torch.randn(2, 3, 10, 16), v=torch.randn(2, 3, 10, 16)), r"query heads \(4\) must be a multiple of"),
    (dict(q=torch.randn(2, 4, 16, 8).transpose(2, 3)), r"query must have a contiguous last dimension"),
    (dict(q=torch.randn(4, 8, 16)), r"query must be 4-D"),
    (dict(k=k.double(), v=v.double()), r"same dtype"),
    (dict(mask=torch.ones(2, 4, 8, 9, dtype=torch.bool)),
     r"attn_mask must be a 4-D broadcast view of \(2, 4, 8, 10\)|attn_mask\.size\(3\) = 9 but expected 10"),
    (dict(mask=torch.ones(2, 4, 8, 10, dtype=torch.int32)), r"attn_mask must be bool, float32 or the dtype of query"),
    (dict(key_lengths=torch.tensor([3.0, 4.0])), r"key_lengths must be int64"),
    (dict(query_lengths=torch.tensor([3, 4, 5])), r"query_lengths must (be int64 of|have) shape \(2,\)"),
], ids=["head dim", "value length", "batch", "heads", "stride", "rank", "dtype", "mask shape", "mask dtype",
        "lengths dtype", "lengths shape"])
def test_raw_forward_ops_check_their_tensors(name, change, pattern):
    """Called directly, every forward op refuses inconsistent tensors with a RuntimeError naming
    the argument (the C++ ops in csrc/host_params.h, the Triton ones in effattn/ops.py), never a
    crash or an out-of-bounds read."""
    op, variant = _forward_op(name)
    args = dict(q=q, k=k, v=v, mask=None, key_lengths=None, query_lengths=None)
    args.update(change)
    with pytest.raises(RuntimeError, match=pattern):
        op(*args.values(), 0.25, None, None, variant)


@pytest.mark.parametrize("name", ["fwd", "fwd_stats"])
def test_raw_cpu_ops_refuse_an_unknown_variant(name):
    op, _ = _forward_op(name)
    with pytest.raises(RuntimeError, match=r"kernel variant 99 \(unknown\) is not in this build"):
        op(q, k, v, None, None, None, 0.25, None, None, 99)
