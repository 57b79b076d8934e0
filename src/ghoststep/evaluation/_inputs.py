"""Model inputs: the forward's arguments, and their slices along the batch.

Inputs are a tensor (one positional argument), a tuple / list of tensors (positional
arguments) or a dict (keyword arguments, e.g. ``input_ids``, ``attention_mask``);
Python scalars, strings and None pass through. Chunked evaluation slices every tensor
with a batch dimension along dim 0, which is refused while a BatchNorm normalizes
with batch statistics (the result would depend on the chunking).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["split_inputs", "batch_size", "chunks", "batch_coupled", "check_chunking"]

_PASSTHROUGH = (bool, int, float, str, type(None))


def split_inputs(inputs) -> tuple[tuple, dict]:
    """Positional args and kwargs for the model from a tensor, sequence or dict."""

    def check(where: str, value):
        if isinstance(value, torch.Tensor) or isinstance(value, _PASSTHROUGH):
            return value
        raise TypeError(
            f"{where} is a {type(value).__name__}; inputs must be tensors (Python scalars, "
            "strings and None are passed through). Convert arrays/lists with torch.as_tensor"
        )

    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), {str(k): check(f"inputs[{k!r}]", v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(check(f"inputs[{i}]", v) for i, v in enumerate(inputs)), {}
    raise TypeError(
        f"inputs must be a tensor, a tuple/list of tensors (positional arguments) or a "
        f"dict of tensors (keyword arguments), got {type(inputs).__name__}"
    )


def batch_size(args: tuple, kwargs: dict) -> int:
    sizes = {
        v.shape[0] for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0
    }
    if not sizes:
        raise ValueError("chunk_size needs at least one tensor input with a batch dimension")
    if len(sizes) > 1:
        raise ValueError(
            f"chunk_size splits every tensor input along dim 0, but their leading sizes "
            f"differ: {sorted(sizes)}"
        )
    return sizes.pop()


def chunks(args: tuple, kwargs: dict, chunk_size: int | None):
    """Yield ``(start, stop, args, kwargs)`` slices of the inputs along dim 0."""
    if chunk_size is None:
        yield 0, None, args, kwargs
        return
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    n = batch_size(args, kwargs)

    def cut(v, s, e):
        return v[s:e] if isinstance(v, torch.Tensor) and v.dim() > 0 else v

    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        yield s, e, tuple(cut(v, s, e) for v in args), {k: cut(v, s, e) for k, v in kwargs.items()}


def batch_coupled(model: nn.Module) -> list[str]:
    """Names of BatchNorm modules that normalize with batch statistics right now."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            m.training or not m.track_running_stats
        ):
            out.append(name or type(m).__name__)
    return out


def check_chunking(model: nn.Module, args, kwargs, chunk_size) -> None:
    """Refuse a chunking that would split a batch a BatchNorm normalizes over."""
    if chunk_size is None:
        return
    coupled = batch_coupled(model)
    if coupled and chunk_size < batch_size(args, kwargs):
        raise ValueError(
            f"chunk_size={chunk_size} would split the batch, but BatchNorm module "
            f"{coupled[0]!r} uses batch statistics (train mode), so the slopes would depend "
            "on the chunking. Use chunk_size=None, or model.eval() if running statistics "
            "are what you want to measure"
        )
