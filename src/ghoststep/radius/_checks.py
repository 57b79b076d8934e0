"""Input checks of the pure radius math's tensors (bad input raises ``ValueError`` naming
the argument; non-finite values are per-sample data)."""

from __future__ import annotations

import math

import torch


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


def check_temperature(temperature, *, tensor_ok: bool = True) -> None:
    """T > 0 and finite: a number, or (``tensor_ok``) a floating tensor of such values."""
    if tensor_ok and isinstance(temperature, torch.Tensor):
        if not temperature.is_floating_point() or not bool(
            torch.all(torch.isfinite(temperature) & (temperature > 0))
        ):
            raise ValueError("temperature must be positive and finite")
    elif not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
