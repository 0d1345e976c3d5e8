"""Calls from several Python threads at once give the serial results: the kernels keep no state
between calls (scratch is per call and per work item), and the dispatch's caches are read-only
after import. Forward and backward, mixed shapes, dtypes and options, with torch's intra-op
threads at 1 and at every core. The cpu backend is deterministic for a given thread count, so
"the same" is bit for bit."""
import threading

import pytest
import torch

import effattn
from conftest import make_qkv

CASES = [
    dict(shape=(2, 4, 97, 130, 16), dtype=torch.float32, kw=dict(is_causal=True)),
    dict(shape=(1, 2, 300, 300, 64), dtype=torch.bfloat16, kw=dict(window=(32, 8))),
    dict(shape=(3, 2, 33, 65, 40), dtype=torch.float64, kw=dict(key_lengths=torch.tensor([65, 0, 20]))),
    dict(shape=(2, 4, 1, 513, 72), dtype=torch.float16, kw=dict(attn_mask=torch.randn(2, 1, 1, 513))),
    dict(shape=(2, 2, 128, 128, 16), dtype=torch.float32, kw=dict(stats=True)),
]


def _inputs(case, seed):
    B, H, L, S, E = case["shape"]
    return make_qkv(B=B, Hq=H, L=L, S=S, E=E, dtype=case["dtype"], seed=seed)


def _step(case, q, k, v):
    """Forward (or forward + stats) and backward: the outputs and the three gradients."""
    kw = dict(case["kw"])
    if kw.pop("stats", False):
        out, stats = effattn.diagnostics.attention_stats(q, k, v, backend="cpu", return_output=True, **kw)
        extra = [stats.entropy, stats.max_weight]
    else:
        out, lse = effattn.attention(q, k, v, backend="cpu", return_lse=True, **kw)
        extra = [lse]
    out.backward(torch.ones_like(out))
    return [out.detach(), *extra, q.grad, k.grad, v.grad]


@pytest.mark.parametrize("intra_op_threads", ["one", "all"])
def test_threads_get_the_serial_results(intra_op_threads):
    saved = torch.get_num_threads()
    torch.set_num_threads(1 if intra_op_threads == "one" else max(1, torch.get_num_threads()))
    try:
        jobs = [(case, seed) for seed in range(3) for case in CASES]  # 15 calls, each case thrice
        serial = [_step(case, *_inputs(case, seed)) for case, seed in jobs]
        results, errors = [None] * len(jobs), []
        start = threading.Barrier(len(jobs))

        def worker(i, case, seed):
            try:
                inputs = _inputs(case, seed)
                start.wait()  # every thread calls at once
                results[i] = _step(case, *inputs)
            except BaseException as exc:  # reported below, with the case
                errors.append((case["shape"], repr(exc)))

        threads = [threading.Thread(target=worker, args=(i, case, seed)) for i, (case, seed) in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not any(t.is_alive() for t in threads), "a call hung"
        assert not errors, errors
        for (case, seed), got, want in zip(jobs, results, serial):
            for i, (a, b) in enumerate(zip(got, want)):
                assert torch.equal(a, b), (case["shape"], seed, i)
    finally:
        torch.set_num_threads(saved)
