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

__all__ = ["optimizer_update_direction"]


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
    exactly; ``.grad`` is not touched. The update includes momentum, Adam's
    preconditioning and weight decay. Pass the *inner* optimizer, not a wrapper
    whose ``step`` itself measures or rescales.

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
    before = [p.detach().clone() for p in params]
    state_keys = list(optimizer.state.keys())
    saved_state = {
        key: {k: _snapshot(v) for k, v in optimizer.state[key].items()} for key in state_keys
    }
    saved_groups = [
        {k: (v, None) if k == "params" else _snapshot(v) for k, v in g.items()}
        for g in optimizer.param_groups
    ]
    missing = object()
    opt_called = getattr(optimizer, "_opt_called", missing)
    try:
        optimizer.step(closure) if closure is not None else optimizer.step()
        with torch.no_grad():
            updates = [p.detach() - b for p, b in zip(params, before, strict=True)]
    finally:
        with torch.no_grad():
            for p, b in zip(params, before, strict=True):
                p.copy_(b)
        for key in list(optimizer.state.keys()):
            if key not in saved_state:
                del optimizer.state[key]
        for key, entries in saved_state.items():
            current = optimizer.state[key]
            current.clear()
            current.update({k: _restore(pair) for k, pair in entries.items()})
        for g, saved in zip(optimizer.param_groups, saved_groups, strict=True):
            g.clear()  # same dict object, same key order as before
            g.update({k: pair[0] if k == "params" else _restore(pair) for k, pair in saved.items()})
        if opt_called is missing:
            if hasattr(optimizer, "_opt_called"):
                del optimizer._opt_called
        else:
            optimizer._opt_called = opt_called
    if model is None:
        return updates
    by_id = {id(p): u for p, u in zip(params, updates, strict=True)}
    return {
        n: by_id[id(p)] if id(p) in by_id else torch.zeros_like(p)
        for n, p in trainable_parameters(model)
    }
