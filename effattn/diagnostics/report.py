"""Report: what GradientFlow recorded, per layer and through time, with a plain-language summary
that names the first layer or timestep where the signal dies.

A report has sections, each a dict of records with its own findings, table, ``to_dict`` entry and
figure: ``layers`` (LayerRecord) and ``sequences`` (TimeRecord). Per-row attention statistics
(entropy, max weight, effective number of keys, (..., Hq, L) tensors from the kernels) would be a
third section of the same shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from . import stats

# What counts as dead. Each threshold is a rule of thumb, stated in the summary when it fires.
DEAD_OUTPUTS = 0.99  # a layer whose outputs are >= 99% exactly zero passes (almost) nothing on
MANY_DEAD_UNITS = 0.5  # half the units zero over the whole batch: not dead yet, but dying
VANISHED_RATIO = 1e-3  # a layer's gradient below 1e-3 of the model output's has vanished
SATURATED = 0.5  # half the outputs of a tanh / sigmoid in the flat part: their gradient is < 0.02x
TIME_FRACTION = 1e-3  # a timestep's gradient below 1e-3 of the last timestep's has vanished
TREND_CHANGE = 100.0  # a fitted change over the sequence beyond 100x either way is a trend


def _nan_to_none(xs):
    return [None if (x is None or (isinstance(x, float) and math.isnan(x))) else x for x in xs]


def _last(xs: List[float]) -> float:
    return xs[-1] if xs else math.nan


def _steps_back(n: int) -> str:
    return f"{n} step{'' if n == 1 else 's'} back"


def _first_step(xs: List[float], condition) -> Optional[int]:
    """1-based index of the first step from which ``condition`` holds at every later step."""
    start = None
    for i, x in enumerate(xs):
        if not math.isnan(x) and condition(x):
            start = i + 1 if start is None else start
        else:
            start = None
    return start


@dataclass
class LayerRecord:
    """One recorded layer (a module's output at one call per step, or a watched tensor). Each
    series has one value per step; nan where the layer did not run or got no gradient.

    act_norm, grad_norm: L2 norms of the output and of the loss's gradient with respect to it.
    zero_act, zero_grad: fractions of their entries that are exactly zero.
    dead_act, dead_grad: fractions of the ``units`` (channels) that are zero everywhere over the
      batch (all samples, all positions).
    saturated: fraction of saturated outputs (tanh, sigmoid); all nan for other layers.
    """
    name: str
    kind: str
    units: int
    act_norm: List[float] = field(default_factory=list)
    zero_act: List[float] = field(default_factory=list)
    dead_act: List[float] = field(default_factory=list)
    saturated: List[float] = field(default_factory=list)
    grad_norm: List[float] = field(default_factory=list)
    zero_grad: List[float] = field(default_factory=list)
    dead_grad: List[float] = field(default_factory=list)

    SERIES = ("act_norm", "zero_act", "dead_act", "saturated", "grad_norm", "zero_grad", "dead_grad")


@dataclass
class TimeRecord:
    """Per-timestep gradient norms of one sequence: ``norms[step][t]`` = ||dL/dh_t||, None for a
    step where it got no gradient. ``time_dim`` is the dim read as time, or "packed" for a
    PackedSequence. The statistics describe one step (default: the last one recorded); T is the
    last timestep with a gradient (trailing timesteps with exactly zero gradient are padding)."""
    name: str
    kind: str
    time_dim: object
    norms: List[Optional[List[float]]]

    def at(self, step: int = -1) -> List[float]:
        """The norms of a step (negative: from the end, counting only steps with a record)."""
        recorded = [n for n in self.norms if n is not None]
        return recorded[step] if recorded else []

    def decay_per_step(self, step: int = -1) -> Optional[float]:
        """Fitted geometric factor per timestep going back (< 1: vanishing): stats.decay_per_step."""
        return stats.decay_per_step(self.at(step))

    def first_below(self, step: int = -1, fraction: float = TIME_FRACTION) -> Optional[int]:
        """0-based timestep, going back from T, whose norm first falls below ``fraction`` of T's."""
        return stats.first_below(self.at(step), fraction)

    def ratio_first_last(self, step: int = -1) -> Optional[float]:
        """||g_1|| / ||g_T||, T the last timestep with a gradient (later ones are padding)."""
        return stats.ratio_first_last(self.at(step))

    def trend(self, step: int = -1) -> str:
        """"vanishing", "exploding", "steady" or "unknown": stats.trend."""
        return stats.trend(self.at(step), TREND_CHANGE)


@dataclass
class Report:
    """What a GradientFlow recorded (``GradientFlow.report()``, ``check()``).

    layers: {name: LayerRecord}, in the order of the forward. sequences: {name: TimeRecord}.
    losses: one per step (nan where none was given). reference: the layer the gradient ratios
    are relative to, the model's output ("(output)"), or None.

    ``print(report)`` shows the last step as tables and the summary; ``summary`` is the text;
    ``to_dict()`` everything as JSON-ready lists; ``plot(path)`` the figures.
    """
    layers: Dict[str, LayerRecord]
    sequences: Dict[str, TimeRecord]
    losses: List[float]
    reference: Optional[str] = None

    @property
    def steps(self) -> int:
        return len(self.losses)

    def grad_ratio(self, name: str) -> List[float]:
        """Per step, the layer's gradient norm over the model output's (nan without a reference)."""
        ours = self.layers[name].grad_norm
        if self.reference is None:
            return [math.nan] * len(ours)
        ref = self.layers[self.reference].grad_norm
        return [a / b if b and not math.isnan(b) else math.nan for a, b in zip(ours, ref)]

    # ---- findings ------------------------------------------------------------------
    def _dead_activations(self) -> List[str]:
        found = []
        for rec in self.layers.values():
            zero, dead = _last(rec.zero_act), _last(rec.dead_act)
            if zero >= DEAD_OUTPUTS:
                since = _first_step(rec.zero_act, lambda z: z >= DEAD_OUTPUTS)
                found.append(f"Activations die at {rec.name} ({rec.kind}): {zero:.1%} of its outputs are exactly "
                             f"zero ({dead:.0%} of its {rec.units} units dead over the whole batch), since step "
                             f"{since} of {self.steps}; nothing passes through it, forward or backward.")
                break
        return found

    def _dead_gradients(self) -> List[str]:
        for rec in reversed(list(self.layers.values())):  # in the order of the backward
            if rec.name == self.reference:
                continue
            g, ratio = _last(rec.grad_norm), _last(self.grad_ratio(rec.name))
            if math.isnan(g):
                continue
            if g == 0 or ratio < VANISHED_RATIO:
                if g == 0:
                    what, since = "exactly zero", _first_step(rec.grad_norm, lambda x: x == 0)
                else:
                    what = f"{ratio:.1e} of the model output's (below {VANISHED_RATIO:g})"
                    since = _first_step(self.grad_ratio(rec.name), lambda x: x < VANISHED_RATIO)
                return [f"Gradients die at {rec.name} ({rec.kind}), the first layer in the backward whose "
                        f"output gradient is {what}: {_last(rec.zero_grad):.0%} of its entries are zero, since "
                        f"step {since}; the layers before it learn (almost) nothing."]
        return []

    def _warnings(self) -> List[str]:
        found = []
        for rec in self.layers.values():
            dead, sat = _last(rec.dead_act), _last(rec.saturated)
            if MANY_DEAD_UNITS <= dead and _last(rec.zero_act) < DEAD_OUTPUTS:
                found.append(f"{rec.name} ({rec.kind}) has {dead:.0%} of its {rec.units} units dead "
                             f"(zero over the whole batch).")
            if sat >= SATURATED:
                found.append(f"{rec.name} ({rec.kind}) is saturated: {sat:.0%} of its outputs are in the flat "
                             f"part (|tanh| > {stats.TANH_SATURATED} or sigmoid outside [{stats.SIGMOID_SATURATED}, "
                             f"{1 - stats.SIGMOID_SATURATED}]), where its gradient is below 0.02x.")
        return found

    def _time_findings(self):
        """(findings about signals that die or explode through time, the other sequences' lines)."""
        dying, fine = [], []
        for rec in self.sequences.values():
            g = rec.at()
            if len(g) < 2:
                continue
            T, last, factor, below, ratio, trend = len(g), stats.last_with_gradient(g), rec.decay_per_step(), \
                rec.first_below(), rec.ratio_first_last(), rec.trend()
            per_step = "no fit" if factor is None else f"x{factor:.4g} per step going back"
            ends = "" if ratio is None else f", ||g_1||/||g_T|| = {ratio:.2e}"
            if trend == "vanishing":
                where = "" if below is None else (f" falls below {TIME_FRACTION:g} of the last timestep's at "
                                                  f"timestep {below + 1} of {T} ({_steps_back(last - below)});")
                dying.append(f"Through time, the gradient of {rec.name}{where} vanishing: {per_step}{ends}.")
            elif trend == "exploding":
                dying.append(f"Through time, the gradient of {rec.name} is exploding: {per_step}{ends}.")
            elif trend == "last only":
                fine.append(f"{rec.name}: only its last timestep gets a gradient (the loss reads it only "
                            f"there); the others get exactly zero.")
            else:
                fine.append(f"{rec.name}: no vanishing through time ({trend}: {per_step}{ends}).")
        return dying, fine

    @property
    def summary(self) -> str:
        """Plain language: first where the signal dies (activations, gradients, through time),
        then warnings (dying units, saturation), then the sequences that are fine."""
        dying_in_time, fine = self._time_findings()
        dies = self._dead_activations() + self._dead_gradients() + dying_in_time
        lines = dies or ["No layer or timestep where the signal dies: no recorded gradient is below "
                         f"{VANISHED_RATIO:g} of the model output's, no layer's outputs are "
                         f"{DEAD_OUTPUTS:.0%} zero."]
        return "\n".join(lines + self._warnings() + fine)

    # ---- output --------------------------------------------------------------------
    def __str__(self) -> str:
        out = []
        if self.layers:
            out.append(f"per layer, step {self.steps} of {self.steps} (grad/out: gradient norm over the model output's)")
            head = (f"{'layer':28s} {'kind':16s} {'units':>6s} {'act norm':>9s} {'grad norm':>9s} {'grad/out':>9s} "
                    f"{'zero out':>8s} {'dead':>6s} {'zero grad':>9s} {'satur.':>6s}")
            out += [head, "-" * len(head)]
            for rec in self.layers.values():
                ratio = _last(self.grad_ratio(rec.name))
                sat = _last(rec.saturated)
                out.append(f"{rec.name[:28]:28s} {rec.kind[:16]:16s} {rec.units:6d} {_last(rec.act_norm):9.2e} "
                           f"{_last(rec.grad_norm):9.2e} {ratio:9.2e} {_last(rec.zero_act):8.1%} "
                           f"{_last(rec.dead_act):6.1%} {_last(rec.zero_grad):9.1%} "
                           f"{'' if math.isnan(sat) else f'{sat:.1%}':>6s}")
        if self.sequences:
            out.append("")
            out.append("through time (last step; t = 1..T, the loss enters near T)")
            head = (f"{'sequence':28s} {'T':>5s} {'||g_1||/||g_T||':>15s} {'per step back':>13s} "
                    f"{'below 1e-3 at':>13s} trend")
            out += [head, "-" * len(head)]
            for rec in self.sequences.values():
                g = rec.at()
                ratio, factor, below = rec.ratio_first_last(), rec.decay_per_step(), rec.first_below()
                out.append(f"{rec.name[:28]:28s} {len(g):5d} {'-' if ratio is None else f'{ratio:.2e}':>15s} "
                           f"{'-' if factor is None else f'{factor:.4f}':>13s} "
                           f"{'-' if below is None else f't = {below + 1}':>13s} {rec.trend()}")
        losses = [x for x in self.losses if not math.isnan(x)]
        if losses:
            out.append("")
            out.append(f"loss: {losses[0]:.4g} (step 1) -> {losses[-1]:.4g} (step {self.steps})")
        out += ["", self.summary]
        return "\n".join(out)

    def to_dict(self) -> dict:
        """Everything, as lists (nan -> None), JSON-ready."""
        layers = {}
        for name, rec in self.layers.items():
            entry = {"kind": rec.kind, "units": rec.units}
            entry.update({key: _nan_to_none(getattr(rec, key)) for key in LayerRecord.SERIES})
            entry["grad_ratio"] = _nan_to_none(self.grad_ratio(name))
            layers[name] = entry
        sequences = {name: {"kind": rec.kind, "time_dim": rec.time_dim, "norms": rec.norms,
                            "decay_per_step": rec.decay_per_step(), "first_below": rec.first_below(),
                            "ratio_first_last": rec.ratio_first_last(), "trend": rec.trend()}
                     for name, rec in self.sequences.items()}
        return {"steps": self.steps, "losses": _nan_to_none(self.losses), "reference": self.reference,
                "layers": layers, "sequences": sequences, "summary": self.summary}

    def plot(self, path: str) -> List[str]:
        """Writes the figures as PNGs and returns their paths: ``<path>-time.png`` (per sequence, a
        timestep x step heatmap of log10 ||dL/dh_t||) when there are sequences, and
        ``<path>-layers.png`` (per layer, bars of the gradient ratio and of the dead fractions at
        the last step) when there are layers. ``path`` is a stem (a ".png" suffix is dropped).
        Needs matplotlib."""
        from . import plot
        return plot.report_figures(self, path)
