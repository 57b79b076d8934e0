"""Input checks: of the pure radius modules' tensors (``radius``, ``ghosts``; bad input
raises ``ValueError`` naming the argument, non-finite values are per-sample data) and of
``RadiusController``'s arguments."""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn


def check_float(name: str, x, *, class_axis: bool = True) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex() or not x.is_floating_point():
        raise ValueError(f"{name} must be a real floating-point tensor, got dtype {x.dtype}")
    if class_axis:
        if x.dim() == 0:
            raise ValueError(f"{name} must have a class axis (last dimension), got a 0-d tensor")
        if x.shape[-1] < 2:
            raise ValueError(
                f"{name} must have at least 2 classes along the last axis, got K={x.shape[-1]}"
            )
    return x


def check_pair(logits, slopes) -> tuple[torch.Tensor, torch.Tensor]:
    check_float("logits", logits)
    check_float("slopes", slopes)
    if logits.shape != slopes.shape:
        raise ValueError(
            f"logits and slopes must have the same shape, got logits {tuple(logits.shape)} "
            f"and slopes {tuple(slopes.shape)}"
        )
    if logits.device != slopes.device:
        raise ValueError(
            f"logits and slopes must be on the same device, got {logits.device} and {slopes.device}"
        )
    return logits, slopes


def row_finite(*xs: torch.Tensor) -> torch.Tensor:
    ok = torch.isfinite(xs[0]).all(-1)
    for x in xs[1:]:
        ok = ok & torch.isfinite(x).all(-1)
    return ok


def nan_where_bad(value: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    return torch.where(finite, value, torch.full_like(value, float("nan")))


MODES = ("clip", "set", "monitor")


def check_controller_arguments(optimizer, model, mode, target_r, temperature) -> None:
    """``RadiusController``'s required arguments, with errors naming them."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_positive("target_r", target_r)
    check_positive("temperature", temperature)


def check_options(on_nonfinite, history_size, margin, scaled_update, micro_batches) -> None:
    """``RadiusController``'s options, with errors naming them."""
    if on_nonfinite not in ("skip", "raise"):
        raise ValueError(f'on_nonfinite must be "skip" or "raise", got {on_nonfinite!r}')
    if not (is_int(history_size) and history_size >= 0):
        raise ValueError(f"history_size must be an int >= 0, got {history_size!r}")
    if margin is not None:
        check_real("margin", margin)
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"margin must be None or a number in [0, 1), got {margin!r}")
    if scaled_update not in ("auto", "interpolate", "rerun"):
        raise ValueError(
            f'scaled_update must be "auto", "interpolate" or "rerun", got {scaled_update!r}'
        )
    if micro_batches not in ("last", "all"):
        raise ValueError(f'micro_batches must be "last" or "all", got {micro_batches!r}')


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


def check_counts(seed, chunk_size) -> None:
    """``RadiusController``'s integer options that are not sampling options."""
    if not (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if chunk_size is not None and not (is_int(chunk_size) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")


def check_positive(name: str, value) -> None:
    check_real(name, value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
