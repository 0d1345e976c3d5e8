"""The runnable examples (examples/), run small: losses fall, every parameter
gets a finite non-zero gradient, and padding gets exactly zero attention; the
diagnostics examples show what their scenarios ask (gradients vanishing
geometrically through time, a dead ReLU named, the fix's loss falling)."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mean(xs):
    return sum(xs) / len(xs)


def assert_gradients_reach_everything(grad_norms):
    for name, g in grad_norms.items():
        assert math.isfinite(g) and g > 0, f"{name}: gradient norm {g}"


@pytest.fixture(scope="module")
def crnn():
    return load("crnn_attention")


def test_crnn_trains_and_compares(crnn):
    res = crnn.main(["--seq", "200", "--batch", "8", "--steps", "80", "--time-iters", "1"])
    losses = res["losses"]
    assert mean(losses[-10:]) < 0.5 * mean(losses[:10]), losses  # from chance (ln 4 = 1.39)
    assert_gradients_reach_everything(res["grad_norms"])
    for variant in ("effattn", "naive"):
        assert res[variant]["per_iter_s"] > 0 and res[variant]["peak_bytes"] >= 0
    # the naive math keeps (B, H, L, L) tensors: at least one more 8*2*200*200*4 bytes at its peak
    assert res["naive"]["peak_bytes"] - res["effattn"]["peak_bytes"] > 8 * 2 * 200 * 200 * 4


@pytest.mark.parametrize("window", ["0", "4"])
def test_crnn_naive_variant_is_the_same_function(crnn, window):
    """The comparison is fair: same parameters, same outputs, only the attention math differs."""
    args = crnn.parse_args(["--seq", "50", "--window", window])
    ours, naive = crnn.build(args), crnn.build(args, naive=True)
    naive.load_state_dict(ours.state_dict())
    x, _ = crnn.make_batch(3, 50, args.vocab, torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(x), naive(x), atol=1e-5, rtol=1e-5)


def test_video_pooling_example(capsys):
    video = load("video_attention_pooling")
    res = video.main(["--steps", "60"])
    printed = capsys.readouterr().out
    for name in ("scenario", "effattn"):
        r = res[name]
        assert mean(r["losses"][-10:]) < 0.7 * mean(r["losses"][:10]), (name, r["losses"])
        assert_gradients_reach_everything(r["grad_norms"])
        assert any(n.startswith("gru.") for n in r["grad_norms"]) and any(n.startswith("pool.") for n in r["grad_norms"])
    # effattn: padded frames get exactly zero attention, and more padding changes nothing
    assert res["effattn"]["pad_mass"] == 0.0 and res["effattn"]["padding_change"] == 0.0
    # the scenario's module does put weight on padding, and its outputs depend on it
    assert res["scenario"]["pad_mass"] > 0.01 and res["scenario"]["padding_change"] > 1e-3
    # effattn's pooling recorded its attention statistics on every training step: as it learns which
    # frame carries the class, its attention narrows (fewer effective frames, a larger largest weight)
    att = res["effattn"]["attention"]
    assert len(att) == 60 and res["scenario"]["attention"] == []
    assert mean([a["effective_keys"] for a in att[-10:]]) < 0.5 * mean([a["effective_keys"] for a in att[:10]])
    assert mean([a["max_weight"] for a in att[-10:]]) > mean([a["max_weight"] for a in att[:10]])
    assert "effattn's pooling while it trains" in printed
    # the diagnostics report of both poolings, before and after training: the GRU gets gradient at every step
    for name in ("scenario", "effattn"):
        assert f"--- {name}: effattn.diagnostics.check()" in printed
        for report in (res[name]["report_start"], res[name]["report_end"]):
            assert report.layers["gru"].grad_norm[-1] > 0
            assert min(report.sequences["gru:input"].at()) > 0
    assert "pool" in res["effattn"]["report_end"].layers  # AttentionPooling is recorded as one layer


def matplotlib_available():
    return importlib.util.find_spec("matplotlib") is not None


def test_gradient_flow_through_time_example(tmp_path, capsys):
    flow = load("gradient_flow_through_time")
    png = tmp_path / "flow.png"
    res = flow.main(["--steps", "2", "--plot", str(png) if matplotlib_available() else ""])
    rnn, lstm0, lstm1, attention = (res[name] for name in flow.MODELS)
    for r in (rnn, lstm0, lstm1):
        # geometric: the fitted factor per step is the 799th root of the measured ||dL/dx_1|| / ||dL/dx_T||
        assert r["trend"] == "vanishing"
        assert r["ratio"] ** (1 / 799) == pytest.approx(r["factor"], rel=0.01)
    assert rnn["factor"] < lstm0["factor"] < lstm1["factor"] - 0.1  # the forget bias slows the decay
    assert lstm1["ratio"] > 1e50 * lstm0["ratio"]
    # attention: x_1 keeps a direct path (the gradient is flat, not a decay over 799 steps)
    assert attention["ratio"] > 1e-5 and attention["trend"] == "steady"
    assert attention["factor"] == pytest.approx(1.0, abs=0.01)
    if matplotlib_available():
        assert png.read_bytes()[:4] == b"\x89PNG" and f"heatmap: {png}" in capsys.readouterr().out


def test_dead_relu_gap_example():
    gap = load("dead_relu_gap")
    res = gap.main(["--steps", "40"])
    broken = res["scenario's network"]
    assert broken["report"].summary.startswith("Activations die at gap.1.relu (ReLU)"), broken["report"].summary
    assert broken["class_map_zero"][9] >= 0.99  # the class maps are dead by step 10
    assert broken["class_map_grad_zero"][-1] == 1.0  # and pass no gradient back
    assert mean(broken["losses"][-10:]) == pytest.approx(math.log(2), abs=1e-3)  # stuck at a dead net's loss
    fixed = res["fix: no ReLU on the class maps"]
    assert fixed["report"].summary.startswith("No layer or timestep where the signal dies"), fixed["report"].summary
    assert mean(fixed["losses"][-10:]) < math.log(2) - 0.2



def test_long_context_parallel_example():
    """One training step with the sequence sharded across 2 processes (gloo) equals the same
    step on the whole sequence in one process: loss and every parameter gradient."""
    example = load("long_context_parallel")
    res = example.main(["--seq", "512", "--procs", "2", "--timeout", "240"])
    assert abs(res["loss"] - res["single_process_loss"]) < 1e-5, res
    assert res["grad_max_abs_diff"] < 1e-5 * max(1.0, res["grad_max_abs"]) + 1e-6, res
    assert res["loss_after_step"] < res["loss"], res
