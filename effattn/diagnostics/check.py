"""check(model, batch): a few recorded forward/backward passes, and the Report of where the signal
dies."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .recorder import GradientFlow, first_tensor
from .report import Report

INPUT = "(input)"  # the name of the model's first input when it is recorded through time


def _split(batch):
    """A batch -> (positional arguments of the model, target or None)."""
    if isinstance(batch, Tensor):
        return (batch,), None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, target = batch
        return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), target
    raise ValueError("check: batch must be a Tensor (the model's input), an (inputs, target) pair whose inputs "
                     "is a Tensor or a tuple of the model's positional arguments, or a callable step -> batch; "
                     f"got {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list))
                                                       else ""))


def _loss(output, target, loss_fn) -> Tensor:
    if loss_fn is not None:
        loss = loss_fn(output) if target is None else loss_fn(output, target)
    else:
        if target is not None:
            raise ValueError("check: the batch has a target but no loss_fn was given; pass loss_fn=... "
                             "(or (inputs, None) when the model returns its own loss)")
        out, _ = first_tensor(output)
        if out is None:
            raise ValueError("check: the model returned no floating-point tensor to take a loss of")
        loss = out.reshape(()) if out.numel() == 1 else out.sum()  # its own loss, or gradient 1 everywhere
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"check: the loss must be a scalar tensor, got {getattr(loss, 'shape', type(loss))}")
    return loss.reshape(())


def _with_grad(x):
    """A floating-point tensor input -> a detached copy that requires grad; anything else as is."""
    if isinstance(x, Tensor) and x.is_floating_point():
        return x.detach().requires_grad_(True)
    return x


@contextlib.contextmanager
def _left_as_found(model: nn.Module, train: Optional[bool], keep_buffers: bool):
    """Restores every submodule's train/eval mode, the parameters' .grad, and (when keep_buffers)
    the buffers' values, whatever happens inside."""
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()] if keep_buffers else []
    if train is not None:
        model.train(train)
    try:
        yield params
    finally:
        for m, mode in modes:
            m.training = mode
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def check(model: nn.Module, batch: Union[Tensor, tuple, list, Callable[[int], object]],
          loss_fn: Optional[Callable] = None, steps: int = 1, *, optimizer: Optional[torch.optim.Optimizer] = None,
          modules: Optional[Iterable] = None, sequences: Optional[Mapping[str, int]] = None,
          time_dim: Optional[int] = None, unit_dim: Optional[int] = None, train: Optional[bool] = True) -> Report:
    """Runs ``steps`` recorded forward/backward passes and returns the Report: per layer, gradient
    norms and their ratio to the output's, dead and saturated units; through time, where the
    gradient falls below 1e-3 of the last timestep's and its decay per step; a summary naming the
    first layer or timestep where the signal dies (``print(report)``).

    Args:
      model: any nn.Module.
      batch: what the model is called with, one of
        * a Tensor ``x``: ``model(x)``;
        * an ``(inputs, target)`` pair: ``model(inputs)`` for a Tensor, ``model(*inputs)`` for a tuple
          of positional arguments; ``target`` goes to ``loss_fn`` (None: no target);
        * a callable ``step -> batch`` (step from 0), called once per step: a fresh batch each step.
      loss_fn: ``loss_fn(output, target)`` (``loss_fn(output)`` without a target) -> a scalar. None:
        the output itself when the model returns a scalar (its own loss), else ``output.sum()`` (a
        gradient of 1 on every output); a target then is an error.
      steps: how many forward/backward passes, each a step of the report.
      optimizer: None (default): the parameters do not change; every step runs with the same ones
        (several steps average over dropout or over the batches of a callable ``batch``). An
        optimizer: ``optimizer.step()`` after each backward, as in training: the parameters change,
        which is how a layer is seen dying "within a few steps".
      modules, sequences, unit_dim: what to record, as in GradientFlow.
      time_dim: also record the gradient of the model's first input through time along this dim,
        as the sequence "(input)" (dL/dx_t).
      train: run in training mode (True, the default: dropout and batch statistics as in
        training), in eval mode (False), or in the model's own mode (None).

    The model is left as it was found, except for what the optimizer does: the train/eval mode
    of every submodule and the parameters' ``.grad`` are restored (each step starts from
    ``grad = None``); without an optimizer the buffers too (e.g. BatchNorm running statistics).
    Floating-point input tensors are passed as detached copies that require grad, so that the
    gradient reaching the first layers' inputs is recorded; the caller's tensors are not changed.
    """
    if steps < 1:
        raise ValueError(f"check: steps must be >= 1, got {steps}")
    with _left_as_found(model, train, keep_buffers=optimizer is None) as params, \
            GradientFlow(model, modules=modules, sequences=sequences, unit_dim=unit_dim) as flow:
        for step in range(steps):
            inputs, target = _split(batch(step) if callable(batch) else batch)
            inputs = tuple(_with_grad(x) for x in inputs)
            if time_dim is not None:
                flow.watch(inputs[0], INPUT, time_dim=time_dim)
            for p in params:
                p.grad = None
            loss = _loss(model(*inputs), target, loss_fn)
            loss.backward()
            if optimizer is not None:
                optimizer.step()
            flow.step(loss.detach())
    return flow.report()
