"""effattn.diagnostics on models whose answer is known: a layer forced dead is named, a linear RNN
with recurrent weight w*I decays by w per step, hooks are gone after the recorder exits, check()
leaves the model as it found it."""
import json
import math
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from effattn.diagnostics import GradientFlow, check, stats


def chain(dead_at):
    """fc1 -> act1 -> fc2 -> act2 -> fc3, with fc{dead_at}'s bias at -1e3 so that act{dead_at}
    outputs exactly zero for these inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([("fc1", nn.Linear(8, 16)), ("act1", nn.ReLU()),
                                       ("fc2", nn.Linear(16, 16)), ("act2", nn.ReLU()),
                                       ("fc3", nn.Linear(16, 4))]))
    with torch.no_grad():
        getattr(model, f"fc{dead_at}").bias.fill_(-1e3)
    return model


@pytest.mark.parametrize("dead_at", [1, 2])
def test_the_layer_forced_dead_is_named(dead_at):
    report = check(chain(dead_at), torch.randn(32, 8))
    act, fc = report.layers[f"act{dead_at}"], report.layers[f"fc{dead_at}"]
    assert act.zero_act[-1] == 1.0 and act.dead_act[-1] == 1.0
    assert fc.grad_norm[-1] == 0.0 and fc.zero_grad[-1] == 1.0  # no gradient passes the dead ReLU
    other = report.layers[f"act{3 - dead_at}"]
    assert other.zero_act[-1] < 0.9 and other.dead_act[-1] < 0.5
    first, second = report.summary.splitlines()[:2]
    assert first.startswith(f"Activations die at act{dead_at} (ReLU)"), report.summary
    assert second.startswith(f"Gradients die at fc{dead_at} (Linear)"), report.summary


def test_a_healthy_chain_has_no_death():
    report = check(chain(dead_at=1), torch.randn(32, 8), modules=["fc3"])  # only the healthy end recorded
    assert report.summary.startswith("No layer or timestep where the signal dies"), report.summary


def linear_rnn(w, H=4, batch_first=True):
    """nn.RNN whose step is h_t = relu(w h_{t-1} + x_t): linear for positive inputs."""
    rnn = nn.RNN(H, H, nonlinearity="relu", batch_first=batch_first)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(w * torch.eye(H))
        rnn.weight_ih_l0.copy_(torch.eye(H))
        rnn.bias_hh_l0.zero_()
        rnn.bias_ih_l0.zero_()
    return rnn


class LastStep(nn.Module):
    """The loss reads the last timestep of an RNN's output."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        out = self.rnn(x)[0]
        return out[:, -1] if self.rnn.batch_first else out[-1]


T = 100


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("w", [0.5, 0.9, 1.1])
def test_linear_rnn_decays_by_w_per_step(w, batch_first):
    x = torch.rand(3, T, 4) + 0.1  # positive: the ReLU never clips
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    report = check(LastStep(linear_rnn(w, batch_first=batch_first)), x)
    seq = report.sequences["rnn:input"]
    g = seq.at()
    assert len(g) == T
    assert seq.decay_per_step() == pytest.approx(w, rel=0.01)
    assert seq.ratio_first_last() == pytest.approx(w ** (T - 1), rel=0.05)
    if w < 1:
        assert seq.trend() == "vanishing"
        # g_t / g_T = w^(T-1-t) < 1e-3 first when T-1-t = ceil(log(1e-3) / log(w))
        assert seq.first_below() == T - 1 - math.ceil(math.log(1e-3) / math.log(w))
        assert "rnn:input falls below 0.001" in report.summary and "vanishing" in report.summary
    else:
        assert seq.trend() == "exploding" and seq.first_below() is None
        assert "rnn:input is exploding" in report.summary, report.summary
    # the RNN's output gets gradient at its last timestep only: not a decay
    assert report.sequences["rnn:output"].trend() == "last only"


def test_packed_sequence_per_timestep_norms_match_the_padded_ones():
    x = torch.rand(3, T, 4) + 0.1
    rnn = linear_rnn(0.9)

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, x):
            return self.rnn(pack_padded_sequence(x, torch.full((3,), T), batch_first=True))[0].data[-3:]

    padded = check(LastStep(rnn), x).sequences["rnn:input"].at()
    packed = check(Packed(), x).sequences["rnn:input"]
    assert packed.time_dim == "packed"
    torch.testing.assert_close(torch.tensor(packed.at()), torch.tensor(padded), rtol=1e-5, atol=0)


class LoopRecurrence(nn.Module):
    """h_t = w h_{t-1} + x_t written as a Python loop: not a recognised type."""

    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, x):  # (B, T, H)
        h = torch.zeros_like(x[:, 0])
        outs = []
        for t in range(x.shape[1]):
            h = self.w * h + x[:, t]
            outs.append(h)
        return torch.stack(outs, 1)


def test_sequences_names_a_module_to_record_through_time():
    model = nn.Sequential(OrderedDict([("proj", nn.Linear(4, 4)), ("loop", LoopRecurrence(0.8))]))

    def loss(out):
        return out[:, -1].sum()

    report = check(model, (torch.randn(2, 60, 4), None), loss, sequences={"loop": 1})
    assert report.sequences["loop:input"].decay_per_step() == pytest.approx(0.8, rel=1e-3)
    assert report.sequences["loop:output"].trend() == "last only"


def test_watch_records_a_tensor_through_time():
    rnn = linear_rnn(0.7)
    x = (torch.rand(2, 40, 4) + 0.1).requires_grad_()
    with GradientFlow() as flow:
        flow.watch(x, "x", time_dim=1)
        rnn(x)[0][:, -1].sum().backward()
        flow.step()
    seq = flow.report().sequences["x"]
    assert seq.decay_per_step() == pytest.approx(0.7, rel=1e-3)
    # check(time_dim=...) does the same for the model's input
    assert check(LastStep(rnn), x.detach(), time_dim=1).sequences["(input)"].decay_per_step() == pytest.approx(0.7, rel=1e-3)
    with pytest.raises(ValueError, match="requires_grad_"):
        with GradientFlow() as flow:
            flow.watch(torch.randn(3), "no grad")


def all_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_gone_after_exit_even_on_an_exception():
    model = chain(dead_at=2)
    x = torch.randn(4, 8)
    with GradientFlow(model) as flow:
        assert all_hooks(model) > 0
        out = model(x)  # kept: its backward runs after the recorder has exited
    assert all_hooks(model) == 0
    before = flow.report().to_dict()
    out.sum().backward()
    assert not out._backward_hooks
    assert flow.report().to_dict() == before  # the late backward recorded nothing

    with pytest.raises(RuntimeError, match="boom"):
        with GradientFlow(model):
            model(x)
            raise RuntimeError("boom")
    assert all_hooks(model) == 0


def test_a_shared_module_gets_one_record_per_call_and_series_per_step():
    relu = nn.ReLU()
    model = nn.Sequential(OrderedDict([("fc1", nn.Linear(4, 4)), ("relu", relu), ("fc2", nn.Linear(4, 4)),
                                       ("again", relu)]))
    report = check(model, torch.randn(5, 4), steps=3)
    assert [n for n in report.layers if n.startswith("relu")] == ["relu", "relu#2"]
    assert all(len(rec.grad_norm) == 3 for rec in report.layers.values())
    assert report.steps == 3


def test_check_leaves_the_model_as_found():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    model.eval()
    model[3].train()  # a mixed mode must come back as it was
    grad = torch.ones_like(model[0].weight)
    model[0].weight.grad = grad
    state = {k: v.clone() for k, v in model.state_dict().items()}
    check(model, (torch.randn(16, 4), torch.randint(2, (16,))), F.cross_entropy, steps=2)
    assert [m.training for m in model.modules()] == [False, False, False, False, True]
    assert model[0].weight.grad is grad and model[3].weight.grad is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # BatchNorm's running statistics included

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    check(model, (torch.randn(16, 4), torch.randint(2, (16,))), F.cross_entropy, steps=2, optimizer=opt)
    assert not torch.equal(model[0].weight, state["0.weight"])  # asked for: the optimizer stepped


def test_check_batch_contract():
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(2, (4,))
    assert check(model, x).losses[0] == pytest.approx(model(x).sum().item(), rel=1e-5)
    assert check(model, (x, y), F.cross_entropy).losses[0] == pytest.approx(F.cross_entropy(model(x), y).item())
    asked = []
    per_step = check(model, lambda step: asked.append(step) or (x * step, y), F.cross_entropy, steps=2)
    assert asked == [0, 1] and per_step.losses[0] == pytest.approx(F.cross_entropy(model(0 * x), y).item())
    two_args = nn.Bilinear(3, 3, 2)
    assert check(two_args, ((x, x), None)).steps == 1
    with pytest.raises(ValueError, match="no loss_fn"):
        check(model, (x, y))
    with pytest.raises(ValueError, match="batch must be"):
        check(model, (x, y, y), F.cross_entropy)


def test_saturated_tanh_is_counted_and_reported():
    x = torch.full((8, 16), 5.0)
    x[:, :4] = 0.1  # a quarter unsaturated: tanh(0.1) = 0.0997; tanh(5) = 0.99991
    report = check(nn.Sequential(OrderedDict([("scale", nn.Identity()), ("tanh", nn.Tanh())])), x)
    assert report.layers["tanh"].saturated[-1] == 0.75
    assert "tanh (Tanh) is saturated: 75%" in report.summary


def test_dead_units_are_channels_of_a_conv_output():
    x = torch.rand(2, 3, 5, 5) + 0.1
    conv = nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        conv.weight.abs_()
        conv.bias.zero_()
        conv.weight[1].neg_()  # channel 1 is negative everywhere: dead after the ReLU
    report = check(nn.Sequential(OrderedDict([("conv", conv), ("relu", nn.ReLU())])), x)
    relu = report.layers["relu"]
    assert relu.units == 4 and relu.dead_act[-1] == 0.25 and relu.zero_act[-1] == 0.25


def test_norms_neither_underflow_nor_overflow():
    tiny = torch.full((10, 3), 1e-200, dtype=torch.float64)
    assert stats.norm(tiny).item() == pytest.approx(1e-200 * math.sqrt(30), rel=1e-12)
    assert stats.time_norms(tiny, 0).tolist() == pytest.approx([1e-200 * math.sqrt(3)] * 10, rel=1e-12)
    small = torch.full((4,), 1e-30)
    assert stats.norm(small).item() == pytest.approx(2e-30, rel=1e-6)


def test_to_dict_is_json_and_plot_writes_pngs(tmp_path):
    report = check(LastStep(linear_rnn(0.9)), torch.rand(2, 30, 4) + 0.1, steps=2)
    json.dumps(report.to_dict(), allow_nan=False)
    assert report.to_dict()["sequences"]["rnn:input"]["decay_per_step"] == pytest.approx(0.9, rel=0.01)
    pytest.importorskip("matplotlib")
    paths = report.plot(str(tmp_path / "diag.png"))
    assert [p.split("/")[-1] for p in paths] == ["diag-time.png", "diag-layers.png"]
    for p in paths:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    report = check(nn.Linear(3, 2), torch.randn(4, 3))
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"Report.plot needs matplotlib \(pip install matplotlib\)"):
        report.plot(str(tmp_path / "x"))


def test_trailing_zero_timesteps_are_padding():
    norms = [1e-4, 1e-2, 1.0, 0.0, 0.0]  # a padded batch: the last two steps get no gradient
    assert stats.last_with_gradient(norms) == 2
    assert stats.ratio_first_last(norms) == 1e-4
    assert stats.first_below(norms) == 0
    assert stats.decay_per_step(norms) == pytest.approx(0.01)
    assert stats.trend(norms) == "vanishing"


def test_packed_norms_count_every_timestep_as_the_whole_batch():
    batch_sizes = torch.tensor([4, 3, 1])  # 3 steps; 4 sequences reach step 0, 3 step 1, 1 step 2
    data = torch.ones(int(batch_sizes.sum()), 2)
    assert stats.packed_time_norms(data, batch_sizes).tolist() == pytest.approx([math.sqrt(8)] * 3)
