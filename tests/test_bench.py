"""The CPU benchmark runs end to end (a smoke run at tiny sizes: it checks the
script and its outputs, not the speed; timings live in bench/results/)."""
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
