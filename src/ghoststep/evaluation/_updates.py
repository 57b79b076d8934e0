"""The optimizer's pending update as a direction.

``optimizer_update_direction`` answers "where would ``optimizer.step()`` move the
parameters?" without moving them: the step is taken, the change recorded, and the
parameters and the optimizer put back exactly. It is the direction the controller
(``ghoststep.controller``) measures the radius along, for use outside it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._directions import trainable_parameters

__all__ = ["OptimizerSnapshot", "optimizer_update_direction"]


def _snapshot(value):
    """(original object, value copy) so a restore keeps object identity."""
    if isinstance(value, torch.Tensor):
        return value, value.detach().clone()
    return value, copy.deepcopy(value)


def _restore(pair):
    original, saved = pair
    if isinstance(original, torch.Tensor):
        with torch.no_grad():
            original.copy_(saved)
        return original
    return saved


_MISSING = object()


class OptimizerSnapshot:
    """What ``optimizer.step()`` changes, saved so that :meth:`restore` puts it back
    exactly: the parameters' values (``params``, default the optimizer's, in
    param-group order; the copies are ``self.params``), the optimizer state (every
    tensor restored in place, object identity kept; entries the step created are
    removed), the param-group settings (same dicts, same key order) and the LR
    scheduler's step flag. ``.grad`` is not touched. Both
    :func:`optimizer_update_direction` and the controller's ``scaled_update="rerun"``
    use it.

    Memory: one copy of every parameter plus one of the optimizer state."""

    def __init__(self, optimizer: torch.optim.Optimizer, params=None) -> None:
        if params is None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
        self.params = [p.detach().clone() for p in params]
        self.state = {
            key: {k: _snapshot(v) for k, v in entries.items()}
            for key, entries in optimizer.state.items()
        }
        self.groups = [
            {k: (v, None) if k == "params" else _snapshot(v) for k, v in g.items()}
            for g in optimizer.param_groups
        ]
        self.opt_called = getattr(optimizer, "_opt_called", _MISSING)

    def restore(self, optimizer: torch.optim.Optimizer, params=None) -> None:
        """Put the parameters and the optimizer back as they were at the snapshot."""
        if params is None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
        with torch.no_grad():
            for p, b in zip(params, self.params, strict=True):
                p.copy_(b)
        for key in list(optimizer.state.keys()):
            if key not in self.state:
                del optimizer.state[key]
        for key, entries in self.state.items():
            current = optimizer.state[key]
            current.clear()
            current.update({k: _restore(pair) for k, pair in entries.items()})
        for g, saved in zip(optimizer.param_groups, self.groups, strict=True):
            g.clear()  # same dict object, same key order as before
            g.update({k: pair[0] if k == "params" else _restore(pair) for k, pair in saved.items()})
        if self.opt_called is _MISSING:
            if hasattr(optimizer, "_opt_called"):
                del optimizer._opt_called
        else:
            optimizer._opt_called = self.opt_called


def optimizer_update_direction(
    optimizer: torch.optim.Optimizer,
    model: nn.Module | None = None,
    *,
    closure: Callable[[], Any] | None = None,
):
    """The pending update p = what ``optimizer.step()`` would add to each parameter.

    The step is actually taken, the parameter change recorded, and then the
    parameters, the optimizer state (every tensor restored in place, object identity
    kept), the param-group settings and the LR scheduler's step flag are put back
    exactly (:class:`OptimizerSnapshot`); ``.grad`` is not touched. The update includes
    momentum, Adam's preconditioning and weight decay. Pass the *inner* optimizer, not
    a wrapper whose ``step`` itself measures or rescales.

    Memory: transiently one copy of every parameter plus one copy of the optimizer
    state (Adam: two more parameter-sized tensors), plus the returned update.

    Args:
        optimizer: a ``torch.optim.Optimizer`` whose gradients are ready.
        model: if given, the result is a dict ``{name: update}`` over the model's
            trainable parameters (zeros for parameters the optimizer does not hold);
            otherwise a list aligned with the optimizer's parameters in param-group
            order (the same as ``model.parameters()`` when the optimizer was built
            from it).
        closure: passed to ``optimizer.step`` (it is evaluated, with its side effects).
    Returns:
        The update p (not normalized; ``direction_norm(p)`` is ||p||).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    snapshot = OptimizerSnapshot(optimizer, params)
    try:
        optimizer.step(closure) if closure is not None else optimizer.step()
        with torch.no_grad():
            updates = [p.detach() - b for p, b in zip(params, snapshot.params, strict=True)]
    finally:
        snapshot.restore(optimizer, params)
    if model is None:
        return updates
    by_id = {id(p): u for p, u in zip(params, updates, strict=True)}
    return {
        n: by_id[id(p)] if id(p) in by_id else torch.zeros_like(p)
        for n, p in trainable_parameters(model)
    }
