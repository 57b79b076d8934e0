"""Input checks of ``RadiusController``'s arguments (errors name the argument)."""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from ..radius._bounds import MODES


def check_controller_arguments(optimizer, model, mode, target_r, temperature) -> list:
    """``RadiusController``'s required arguments, with errors naming them. Returns the
    inner optimizers as a list (``optimizer`` is one, or a list / tuple of several that
    share no parameter)."""
    several = isinstance(optimizer, (list, tuple))
    optimizers = list(optimizer) if several else [optimizer]
    if not optimizers:
        raise ValueError("optimizer must be a torch.optim.Optimizer or a non-empty list of them")
    for inner in optimizers:
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer (or a list of them), got "
                f"{type(inner).__name__}"
            )
    seen: set[int] = set()
    for inner in optimizers:
        ids = {id(p) for g in inner.param_groups for p in g["params"]}
        if ids & seen:
            raise ValueError(
                "the optimizers in RadiusController([opt_a, opt_b], model) must not share a "
                "parameter (each parameter is moved by one of them)"
            )
        seen |= ids
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_positive("target_r", target_r)
    check_positive("temperature", temperature)
    return optimizers


def check_options(on_nonfinite, margin, scaled_update) -> None:
    """``RadiusController``'s options, with errors naming them."""
    if on_nonfinite not in ("skip", "raise"):
        raise ValueError(f'on_nonfinite must be "skip" or "raise", got {on_nonfinite!r}')
    if margin is not None:
        check_real("margin", margin)
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"margin must be None or a number in [0, 1), got {margin!r}")
    if scaled_update not in ("auto", "interpolate", "rerun"):
        raise ValueError(
            f'scaled_update must be "auto", "interpolate" or "rerun", got {scaled_update!r}'
        )


def check_limit_by(limit_by, extra_radii) -> tuple[str, ...] | None:
    """``limit_by`` as a tuple (None: every radius), checked against ``extra_radii``."""
    if extra_radii is not None and not callable(extra_radii):
        raise TypeError("extra_radii must be callable(model, inputs, update) -> dict")
    if limit_by is None:
        return None
    limit_by = tuple(limit_by)
    if not limit_by or not all(isinstance(k, str) for k in limit_by):
        raise ValueError(f"limit_by must be a non-empty sequence of names, got {limit_by!r}")
    if extra_radii is None and limit_by != ("out",):
        raise ValueError(f"limit_by={limit_by!r} names radii but extra_radii is None")
    return limit_by


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_real(x) -> bool:
    """A real number (Python or NumPy scalar), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_real(name: str, value) -> None:
    """``TypeError`` naming the argument unless ``value`` is a real number (bools,
    strings, tensors and None are not)."""
    if not is_real(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")


def check_positive(name: str, value) -> None:
    check_real(name, value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
