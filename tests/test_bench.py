"""The benchmarks run end to end (smoke runs at tiny sizes: they check the
scripts and their outputs, not the speed; timings live in bench/results/)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for peak memory")
def test_cpu_speed_quick(tmp_path):
    import cpu_speed

    out = tmp_path / "cpu.json"
    res = cpu_speed.main(["--quick", "--iters", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["machine"]["isa"] in ("baseline", "avx2", "avx512")
    for section in ("headline", "causal", "padded", "memory", "head_dim", "isa"):
        assert saved[section], section
    for row in saved["headline"]:
        assert row["effattn_fwd_ms"] > 0 and row["sdpa_fwdbwd_ms"] > 0
    # the peak of a padded forward+backward holds at least its output and gradients
    for row in saved["memory"]:
        assert row["peak_mib"] >= 0.5 * row["output_and_grads_mib"]
    assert (tmp_path / "cpu.md").read_text().count("|") > 50
    assert res["isa"][0]["isa"] == "baseline"


# ---------------------------------------------------------------------------
# bench/speed.py, memory.py, budget.py, crnn.py (issue 7): smoke runs at tiny sizes
# ---------------------------------------------------------------------------

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for peak memory")
META_KEYS = ("device", "device_name", "torch", "triton", "python", "effattn_commit", "date", "command")


def _check_meta(saved, device="cpu"):
    for key in META_KEYS:
        assert key in saved["meta"], key
    assert saved["meta"]["device"] == device


@linux_only
def test_speed_quick(tmp_path):
    import speed

    res = speed.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--methods", "effattn,naive,sdpa"])
    saved = json.loads((tmp_path / "speed-cpu-quick.json").read_text())
    _check_meta(saved)
    assert saved["methods"][0].startswith("effattn:")  # every usable effattn backend, first
    assert {"naive", "sdpa:flash", "sdpa:math"} <= set(saved["methods"])
    assert all(v["ok"] for k, v in saved["validation"].items()), saved["validation"]
    kinds = {(c["kind"], c["E"]) for c in saved["cells"]}
    assert {("dense", 64), ("causal", 64), ("dense", 128), ("padded", 64)} <= kinds
    for c in saved["cells"]:
        for r in c["rows"]:
            assert r["status"] == "ok", r  # every method runs every cell on the CPU
            assert r["ms"] > 0 and r["tflops"] > 0
    assert len(res["cells"]) == len(saved["cells"])
    assert (tmp_path / "speed-cpu-quick.md").read_text().count("|") > 20


def test_flops_formula():
    import common

    assert common.flops(2, 3, 5, 7, 11) == 4 * 2 * 3 * 5 * 7 * 11
    assert common.flops(2, 3, 5, 7, 11, causal=True) == 2 * 2 * 3 * 5 * 7 * 11
    assert common.flops(1, 1, 4, 4, 8, mode="fwd+bwd") == 3.5 * common.flops(1, 1, 4, 4, 8)
    assert common.flops(1, 1, 4, 4, 8, mode="bwd") == 2.5 * common.flops(1, 1, 4, 4, 8)
    assert common.padded_flops([4, 2], 1, 8) == common.flops(1, 1, 4, 4, 8) + common.flops(1, 1, 2, 2, 8)


def test_methods_come_from_effattn_backends():
    import common
    import effattn

    rt = common.Runtime("cpu")
    names = [m.name for m in common.all_methods(rt, __import__("torch").float32, include_flex=False)]
    usable = [n for n in effattn.backends().usable() if n != "reference"]
    assert [n for n in names if n.startswith("effattn:")] == [f"effattn:{n}" for n in usable]
    assert common.select_methods(common.all_methods(rt, __import__("torch").float32, include_flex=False),
                                 "naive,sdpa:math")[1].name == "sdpa:math"


@linux_only
def test_memory_quick(tmp_path):
    import memory

    memory.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--methods", "effattn,naive"])
    saved = json.loads((tmp_path / "memory-cpu-quick.json").read_text())
    _check_meta(saved)
    for c in saved["cells"]:
        for r in c["rows"]:
            assert r["status"] == "ok", r
            assert r["io_bytes"] > 0 and "extra_bytes" in r
    # the fresh-process measurement (the full CPU run's) works too
    r = memory.measure_subprocess(dict(method="effattn:cpu", kind="dense", B=1, H=2, L=256, E=32, dtype="float32"))
    assert r["io_bytes"] == 4 * 2 * 256 * 32 * 4 and r["peak_bytes"] > 0


def test_budget_search_finds_the_boundary():
    import budget

    cap, step = 1000.0, 8
    for peak_of in (lambda L: 100 + 0.9 * L, lambda L: 50 + 0.01 * L * L):  # linear (fused), quadratic (naive)
        def trial(L):
            p = peak_of(L)
            return dict(L=L, fits=p <= cap, status="ok" if p <= cap else "OOM", peak_bytes=p if p <= cap else None,
                        seconds=0.0)
        longest, trials, note = budget.search(trial, cap, step, 2048, 64, deadline=float("inf"))
        assert peak_of(longest) <= cap < peak_of(longest + step), (longest, [t["L"] for t in trials])
        assert len(trials) <= 12 and not note


@linux_only
def test_budget_quick(tmp_path):
    import budget

    budget.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--methods", "effattn,naive"])
    saved = json.loads((tmp_path / "budget-cpu-quick.json").read_text())
    _check_meta(saved)
    longest = {r["method"]: r for r in saved["longest"]}
    eff = next(r for n, r in longest.items() if n.startswith("effattn:"))
    assert eff["longest_L"] > longest["naive"]["longest_L"]  # O(L) vs O(L^2) memory
    assert 0 < eff["fraction_of_ceiling"] <= 1.0 + 1e-9
    assert all(r["fits"] for r in saved["batch_case"])


@linux_only
def test_crnn_quick(tmp_path):
    import crnn

    crnn.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--fit-seqs", "32"])
    saved = json.loads((tmp_path / "crnn-cpu-quick.json").read_text())
    _check_meta(saved)
    assert [r["variant"] for r in saved["timing"]] == ["none", "effattn", "naive", "loop"]
    assert all(r["status"] == "ok" and r["s_per_10"] > 0 for r in saved["timing"])
    assert "effattn_added_fraction" in saved["goals"]


@linux_only
def test_cuda_code_paths_with_fake_cuda(tmp_path, monkeypatch):
    """The GPU-only logic (do_bench call, allocator counters, the cap, in-process trials) run on
    CPU tensors through the fake-CUDA runtime: checks the code, not a GPU."""
    import budget
    import speed

    monkeypatch.setenv("EFFATTN_BENCH_FAKE_CUDA", "1")
    speed.main(["--quick", "--device", "cuda", "--out", str(tmp_path), "--methods", "effattn,sdpa:math",
                "--kinds", "padded"])
    saved = json.loads((tmp_path / "speed-cuda-quick.json").read_text())
    assert saved["meta"]["fake_cuda"] and saved["dtype"] == "bfloat16"
    assert all(r["status"] == "ok" for c in saved["cells"] for r in c["rows"])
    budget.main(["--quick", "--device", "cuda", "--out", str(tmp_path), "--methods", "naive"])
    saved = json.loads((tmp_path / "budget-cuda-quick.json").read_text())
    assert saved["longest"][0]["longest_L"] > 0


def test_diagnostics_overhead_quick(tmp_path):
    import diagnostics_overhead

    res = diagnostics_overhead.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "diagnostics-overhead-cpu-quick.json").read_text())
    _check_meta(saved)
    assert [r["model"] for r in saved["rows"]] == [r["model"] for r in res["rows"]]
    for row in saved["rows"]:
        assert row["plain_ms"] > 0 and row["GradientFlow_ms"] > 0 and row["check_ms"] > 0
        assert row["layers"] >= 3  # the recorder saw the models' layers
    assert saved["rows"][1]["sequences"] == 1  # the LSTM's input, through time


@linux_only
def test_attention_stats_bench_quick(tmp_path):
    import attention_stats

    attention_stats.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "attention-stats-cpu-quick.json").read_text())
    _check_meta(saved)
    assert len(saved["rows"]) == 4
    for row in saved["rows"]:
        assert row["forward_ms"] > 0 and row["forward+stats_ms"] > 0 and row["ratio"] > 0
    assert all("peak_growth_bytes" in r for r in saved["rows"] if r["dtype"] == "float32")

# ---------------------------------------------------------------------------
# bench/context_parallel.py (issue 20)
# ---------------------------------------------------------------------------

@linux_only
def test_context_parallel_quick(tmp_path):
    import context_parallel

    res = context_parallel.main(["--quick", "--procs", "1,2", "--cases", "causal", "--methods", "single,ring",
                                 "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "context-parallel-cpu-quick.json").read_text())
    _check_meta(saved)
    got = {(s["method"], s["P"]): s for s in saved["summary"]}
    assert set(got) == {("single", 1), ("ring", 1), ("ring", 2)}
    for s in got.values():
        assert s["fwd_ms"] > 0 and s["bwd_ms"] > 0 and s["validation_error"] < 1e-5
    # q, k, v, out and their gradients per rank halve with two ranks
    assert got[("ring", 2)]["io_bytes"] * 2 == got[("ring", 1)]["io_bytes"]
    ring2 = [r for r in saved["rows"] if r["method"] == "ring" and r["P"] == 2]
    assert all(r["traffic"]["forward_kv"] == 1 and r["traffic"]["backward_dkv"] == 1 for r in ring2)
    assert res["gpu_model"]["rows"] and (tmp_path / "context-parallel-cpu-quick.md").read_text().count("|") > 50


def test_context_parallel_gpu_model():
    """The scaling model's arithmetic: slower links and more KV heads need longer blocks to hide."""
    import context_parallel

    rows = context_parallel.gpu_model()["rows"]
    assert rows
    for r in rows:
        for phase in ("fwd", "bwd"):
            assert r[f"ib_{phase}_c"] >= r[f"nvlink_{phase}_c"]
        at = r["nvlink_at_c"]
        assert at["fwd_compute_us"] >= at["fwd_transfer_us"] and at["bwd_compute_us"] >= at["bwd_transfer_us"]
    by = {(r["E"], r["causal"], r["Hkv"] == r["H"]): r for r in rows}
    for (E, causal, mha), r in by.items():
        if mha and (E, causal, False) in by:
            assert r["ib_fwd_c"] >= by[(E, causal, False)]["ib_fwd_c"]


def test_overhead_quick(tmp_path):
    """bench/overhead.py end to end: its child processes (the CPU modes against SDPA, the CUDA
    host path with the driver's stand-ins and the launches stubbed) and its records."""
    from conftest import run_checked
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "overhead.py")
    run_checked([sys.executable, script, "--quick", "--out", str(tmp_path)], timeout=600)
    saved = json.loads((tmp_path / "overhead-cpu-quick.json").read_text())
    assert [r["mode"] for r in saved["cpu"]] == ["no_grad", "grad", "fwd_bwd"]
    assert all(r["effattn_us"] > 0 and r["sdpa_us"] > 0 for r in saved["cpu"])
    assert {h["what"] for h in saved["cuda_host"]} >= {"make_spec + select"}
    assert "effattn / SDPA" in (tmp_path / "overhead-cpu-quick.md").read_text()
