"""GradientFlow: records gradient and activation norms per layer and per timestep, over training
steps, through forward hooks and tensor hooks; the model's code is not changed and every hook is
removed on exit."""
from __future__ import annotations

import math
from functools import partial
from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..nn import AttentionPooling
from . import stats
from .report import LayerRecord, Report, TimeRecord

OUTPUT = "(output)"  # the name of the model's own output, the reference of the gradient ratios
LAYER_STATS = LayerRecord.SERIES


class TimeLayout(NamedTuple):
    """How a sequence module lays out time: the time dim of its (batched) input, whether its
    output is a sequence in the same layout, and whether the dim was given by the user (then it
    is used as is; a recognised module's 2-D input is an unbatched (T, features), time dim 0)."""
    time_dim: int
    output_is_sequence: bool
    given: bool = False


def sequence_layout(module: nn.Module) -> Optional[TimeLayout]:
    """For the sequence modules recognised by type: (time dim of a batched input, whether the
    output is a sequence in the same layout); None for other modules.

    RNN / LSTM / GRU and (effattn's or torch's) MultiheadAttention: dim 1 with batch_first, else
    0; output likewise. effattn.nn.AttentionPooling: input (B, N, D), time dim 1; pooled output."""
    if isinstance(module, (nn.RNNBase, nn.MultiheadAttention)):
        return TimeLayout(1 if module.batch_first else 0, True)
    if isinstance(module, AttentionPooling):
        return TimeLayout(1, False)
    return None


def saturation_kind(module: nn.Module) -> Optional[str]:
    """"tanh" or "sigmoid" for the modules whose outputs are a tanh or a sigmoid, else None.

    nn.Tanh, nn.Sigmoid, and nn.RNN with its default tanh nonlinearity (its output is the tanh).
    The gates inside nn.LSTM / nn.GRU are not visible: their fused kernels return only states."""
    if isinstance(module, nn.Tanh) or (isinstance(module, nn.RNN) and module.nonlinearity == "tanh"):
        return "tanh"
    if isinstance(module, nn.Sigmoid):
        return "sigmoid"
    return None


def first_tensor(value) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(the first floating-point tensor in a module's output or input, its PackedSequence
    batch_sizes or None). LSTM's (out, (h, c)) gives out; a PackedSequence gives its data."""
    if isinstance(value, Tensor):
        return (value, None) if value.is_floating_point() else (None, None)
    if isinstance(value, PackedSequence):
        return (value.data, value.batch_sizes) if value.data.is_floating_point() else (None, None)
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            found = first_tensor(item)
            if found[0] is not None:
                return found
    return None, None


class _Site:
    """One recorded place: a module's output at one call within a step, the input sequence of a
    sequence module, or a watched tensor. ``layer``: whether it keeps the per-layer statistics
    (an input sequence keeps only its per-timestep norms). ``time_key``: its name among the
    report's sequences, or None when it is not recorded through time."""

    def __init__(self, name: str, kind: str, layer: bool, saturation: Optional[str], closed_steps: int):
        self.name, self.kind, self.layer, self.saturation = name, kind, layer, saturation
        self.time_key: Optional[str] = None
        self.time_dim: Optional[int] = None
        self.units = 0
        self.pending: Dict[str, Tensor] = {}
        self.pending_time: Optional[Tensor] = None
        self.series: Dict[str, List[float]] = {k: [math.nan] * closed_steps for k in LAYER_STATS}
        self.time_series: List[Optional[List[float]]] = [None] * closed_steps

    def close_step(self):
        values = [self.pending.get(k) for k in LAYER_STATS]
        present = [v for v in values if v is not None]
        if len({v.device for v in present}) == 1:
            floats = iter(torch.stack(present).tolist())  # one device-to-host copy
        else:  # a model spread over devices
            floats = iter([float(v) for v in present])
        for key, value in zip(LAYER_STATS, values):
            self.series[key].append(next(floats) if value is not None else math.nan)
        self.time_series.append(self.pending_time.tolist() if self.pending_time is not None else None)
        self.pending, self.pending_time = {}, None


class GradientFlow:
    """Records, for chosen modules and tensors, per-layer gradient and activation norms and
    per-timestep gradient norms ||dL/dh_t||, one value per training step::

        with GradientFlow(model) as flow:
            for x, y in batches:
                loss = loss_fn(model(x), y)
                opt.zero_grad(); loss.backward(); opt.step()
                flow.step(loss)                 # closes one training step
        report = flow.report()                  # a Report: summary, to_dict(), plot(path)

    What is recorded, at each step:

    * per layer (each recorded module's output; the first floating-point tensor of a tuple, e.g.
      LSTM's ``out`` of ``(out, (h, c))``, a PackedSequence's data): the L2 norm of the output and
      of the loss's gradient with respect to it; the fraction of exactly-zero outputs and of
      units (channels: see ``stats.unit_dim``) that are zero over the whole batch (dead), the same
      two for the gradient; for nn.Tanh / nn.Sigmoid / tanh nn.RNN, the fraction of saturated
      outputs. The model's own output is recorded as ``"(output)"``: the report's gradient ratios
      are relative to it.
    * through time: for RNN / LSTM / GRU and attention modules (recognised by type: see
      ``sequence_layout``, time dim read from ``batch_first``; PackedSequences too) and for the
      modules named in ``sequences``, the norm per timestep of the gradient of the module's input
      sequence (``"name:input"``: what reaches each step of it through the recurrence or the
      attention) and of its output (``"name:output"``). The input's gradient exists only when
      the input requires grad (``check`` arranges that for the model's inputs).
    * any tensor passed to ``watch`` during the forward.

    Args:
      model: the model; its output is recorded as "(output)". Optional with ``modules`` given as
        modules, or when only ``watch`` is used.
      modules: what to record: names (as in ``model.named_modules()``) or module objects. Default:
        every leaf module (one without children) and every recognised sequence module.
      sequences: {module name: time dim} of other modules to record through time as well.
      unit_dim: the dim holding units for the dead-unit counts, instead of ``stats.unit_dim``'s
        rule (dim 1, or the last dim of 3-D tensors).

    A module called several times in one step (a shared nn.ReLU, a cell in a Python loop) gets one
    record per call: ``name``, ``name#2``, ... Functional calls (``F.relu``, ``torch.tanh``) are not
    modules and are not seen: record their result with ``watch``. A step's gradients are those of
    the backward calls made before ``step()``; hooks still attached to that step's tensors are
    removed then, and all hooks on exit, also when an exception leaves the block.

    Cost: each recorded output is read about three more times in the forward (norm, zero counts:
    one temporary the size of the tensor) and its gradient likewise in the backward; no tensor is
    kept between forward and backward, and per step only a few floats per layer and T per
    sequence. Measured on a 2-core CPU (bench/diagnostics_overhead.py): +50-60% per training step
    of a small 15-layer CNN (cheap convolutions, every output and gradient read again), +10-30% for
    an LSTM over 800 steps. On a GPU the hooks make no host syncs: a step's values are copied to
    the host at step().
    """

    def __init__(self, model: Optional[nn.Module] = None,
                 modules: Optional[Iterable[Union[str, nn.Module]]] = None,
                 sequences: Optional[Mapping[str, int]] = None, unit_dim: Optional[int] = None):
        self.model = model
        self.unit_dim = unit_dim
        self._targets = self._choose(model, modules, dict(sequences or {}))
        self._sites: Dict[str, _Site] = {}
        self._losses: List[float] = []
        self._handles: list = []
        self._tensor_handles: list = []
        self._calls: Dict[str, int] = {}
        self._recording = False
        self._dirty = False  # something was recorded since the last step()

    # ---- which modules, and how their time is laid out ----------------------------
    @staticmethod
    def _choose(model, modules, sequences) -> List[Tuple[str, nn.Module, Optional[TimeLayout]]]:
        """[(name, module, its TimeLayout or None)] of the modules to hook."""
        named = list(model.named_modules()) if model is not None else []
        by_name = dict(named)
        names_of = {id(m): n for n, m in named}
        if modules is None:
            chosen = [(n, m) for n, m in named if not any(True for _ in m.children()) or sequence_layout(m)]
        else:
            chosen = []
            for item in modules:
                if isinstance(item, str):
                    if item not in by_name:
                        raise ValueError(f"GradientFlow: the model has no module named {item!r}")
                    chosen.append((item, by_name[item]))
                elif isinstance(item, nn.Module):
                    chosen.append((names_of.get(id(item), type(item).__name__), item))
                else:
                    raise TypeError(f"GradientFlow: modules must be names or nn.Modules, got {type(item).__name__}")
        for name in sequences:
            if name not in by_name:
                raise ValueError(f"GradientFlow: sequences names {name!r}, which is not a module of the model")
            if all(n != name for n, _ in chosen):
                chosen.append((name, by_name[name]))
        targets = []
        for name, module in chosen:
            layout = TimeLayout(int(sequences[name]), True, given=True) if name in sequences \
                else sequence_layout(module)
            targets.append((name or type(module).__name__, module, layout))
        return targets

    @staticmethod
    def _time_dim(x: Tensor, layout: TimeLayout) -> int:
        return layout.time_dim if layout.given or x.dim() != 2 else 0  # 2-D: unbatched (T, features)

    # ---- context manager -----------------------------------------------------------
    def __enter__(self) -> "GradientFlow":
        self.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    def start(self):
        """Attaches the module hooks (what ``with`` does on entry)."""
        if self._recording:
            raise RuntimeError("GradientFlow is already recording")
        try:
            for name, module, layout in self._targets:
                self._handles.append(module.register_forward_pre_hook(
                    partial(self._before_forward, name, layout), with_kwargs=True))
                self._handles.append(module.register_forward_hook(partial(self._after_forward, name, layout)))
            if self.model is not None:
                self._handles.append(self.model.register_forward_hook(self._after_model))
        except BaseException:
            self._remove_hooks()
            raise
        self._recording = True

    def stop(self):
        """Removes every hook (what ``with`` does on exit) and closes a step left open."""
        self._recording = False
        self._remove_hooks()
        if self._dirty:
            self._close_step(None)

    def _remove_hooks(self):
        for handle in self._handles + self._tensor_handles:
            handle.remove()
        self._handles, self._tensor_handles = [], []

    # ---- what the user calls -------------------------------------------------------
    def watch(self, tensor: Tensor, name: str, time_dim: Optional[int] = None) -> Tensor:
        """Records ``tensor`` (its norms and zeros now, its gradient in the backward) as the layer
        ``name``, and through time along ``time_dim`` when given. Call it in the forward, every
        step; it returns the tensor. The tensor must require grad (for a model input: call
        ``x.requires_grad_()`` first)."""
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            raise TypeError(f"GradientFlow.watch({name!r}): needs a floating-point tensor")
        if not tensor.requires_grad:
            raise ValueError(f"GradientFlow.watch({name!r}): the tensor does not require grad, so it gets no "
                             "gradient; for an input, call x.requires_grad_() before the forward")
        if time_dim is not None and not -tensor.dim() <= time_dim < tensor.dim():
            raise ValueError(f"GradientFlow.watch({name!r}): time_dim {time_dim} is not a dim of a "
                             f"{tensor.dim()}-D tensor")
        site = self._site(self._call_name(name), "tensor", layer=True, saturation=None)
        self._record_output(site, tensor, None, None if time_dim is None else time_dim % tensor.dim(),
                            time_key=None if time_dim is None else site.name)
        return tensor

    def step(self, loss=None):
        """Closes one training step (call it after the backward); ``loss`` is kept for the report."""
        self._close_step(loss)

    @property
    def steps(self) -> int:
        """Training steps closed so far."""
        return len(self._losses)

    def report(self) -> Report:
        """A Report of everything recorded (a step left open is closed first)."""
        if self._dirty:
            self._close_step(None)
        layers = {s.name: LayerRecord(s.name, s.kind, s.units, **{k: list(v) for k, v in s.series.items()})
                  for s in self._sites.values() if s.layer}
        sequences = {s.time_key: TimeRecord(s.time_key, s.kind, s.time_dim, [None if n is None else list(n)
                                                                               for n in s.time_series])
                     for s in self._sites.values() if s.time_key is not None}
        return Report(layers, sequences, list(self._losses), reference=OUTPUT if OUTPUT in layers else None)

    # ---- hooks ---------------------------------------------------------------------
    def _call_name(self, name: str) -> str:
        count = self._calls[name] = self._calls.get(name, 0) + 1
        return name if count == 1 else f"{name}#{count}"

    def _site(self, name, kind, layer, saturation) -> _Site:
        site = self._sites.get(name)
        if site is None:
            site = self._sites[name] = _Site(name, kind, layer, saturation, self.steps)
        self._dirty = True
        return site

    def _before_forward(self, name, layout, module, args, kwargs):
        if not self._recording:
            return
        call = self._call_name(name)
        if layout is None:
            return
        x, batch_sizes = first_tensor(list(args) + list(kwargs.values()))
        if x is None or not x.requires_grad or not torch.is_grad_enabled():
            return
        time_dim = None if batch_sizes is not None else self._time_dim(x, layout)
        site = self._site(f"{call}:input", type(module).__name__, layer=False, saturation=None)
        site.time_key = site.name
        site.time_dim = "packed" if batch_sizes is not None else time_dim
        self._hook_gradient(site, x, batch_sizes, time_dim)

    def _after_forward(self, name, layout, module, args, output):
        if not self._recording:
            return
        count = self._calls.get(name, 1)
        call = name if count == 1 else f"{name}#{count}"
        t, batch_sizes = first_tensor(output)
        if t is None:
            return
        time_dim = None
        sequence_out = layout is not None and layout.output_is_sequence
        if sequence_out and batch_sizes is None:
            time_dim = self._time_dim(t, layout)
            if time_dim >= t.dim():
                time_dim = None
        over_time = sequence_out and (batch_sizes is not None or time_dim is not None)
        site = self._site(call, type(module).__name__, layer=True, saturation=saturation_kind(module))
        self._record_output(site, t, batch_sizes, time_dim, time_key=f"{call}:output" if over_time else None)

    def _after_model(self, module, args, output):
        if not self._recording:
            return
        t, batch_sizes = first_tensor(output)
        if t is not None:
            site = self._site(self._call_name(OUTPUT), type(module).__name__, layer=True, saturation=None)
            self._record_output(site, t, batch_sizes, None, time_key=None)

    def _record_output(self, site, t, batch_sizes, time_dim, time_key):
        """The activation statistics of ``t`` now; a hook for its gradient's."""
        if time_key is not None:
            site.time_key, site.time_dim = time_key, "packed" if batch_sizes is not None else time_dim
        with torch.no_grad():
            x = t.detach()
            units_at = stats.unit_dim(x, self.unit_dim)
            site.units = x.shape[units_at] if x.dim() else 1
            zeros = stats.zero_stats(x, units_at)
            site.pending.update(act_norm=stats.norm(x), zero_act=zeros["zero"], dead_act=zeros["dead"])
            if site.saturation is not None:
                site.pending["saturated"] = stats.saturated_fraction(x, site.saturation)
        self._hook_gradient(site, t, batch_sizes, time_dim if time_key is not None else None)

    def _hook_gradient(self, site, t, batch_sizes, time_dim):
        if t.requires_grad and torch.is_grad_enabled():
            hook = partial(self._on_gradient, site, self.steps, batch_sizes, time_dim)
            self._tensor_handles.append(t.register_hook(hook))

    def _on_gradient(self, site, step, batch_sizes, time_dim, grad):
        if not self._recording or step != self.steps:
            return None  # a tensor of an earlier step, or after the recorder stopped
        with torch.no_grad():
            g = grad.detach()
            if site.layer:
                zeros = stats.zero_stats(g, stats.unit_dim(g, self.unit_dim))
                site.pending.update(grad_norm=stats.norm(g), zero_grad=zeros["zero"], dead_grad=zeros["dead"])
            if batch_sizes is not None and site.time_key is not None:
                site.pending_time = stats.packed_time_norms(g, batch_sizes)
            elif time_dim is not None:
                site.pending_time = stats.time_norms(g, time_dim)
        self._dirty = True
        return None

    def _close_step(self, loss):
        for site in self._sites.values():
            site.close_step()
        for handle in self._tensor_handles:  # this step's tensors: a late backward must not count
            handle.remove()
        self._tensor_handles = []
        if isinstance(loss, Tensor):
            loss = loss.detach()
        self._losses.append(math.nan if loss is None else float(loss))
        self._calls.clear()
        self._dirty = False
