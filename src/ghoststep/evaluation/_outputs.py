"""Model outputs: which part is the logits, never guessed.

``logits_reader`` is the output function every logit evaluation uses: the logits of
a model output (``default_logits_fn`` or the caller's ``logits_fn``), a single
binary logit read as the two-class softmax (``class_logits``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["default_logits_fn", "describe_output", "class_logits", "logits_reader"]


def default_logits_fn(output) -> torch.Tensor:
    """The logits of a model output, never guessed.

    Accepted: a tensor; an object with a tensor ``.logits`` (Hugging Face outputs); a
    mapping with a tensor ``"logits"``; a Hugging Face ``return_dict=False`` tuple
    ``(loss, logits, ...)`` (its first item a scalar loss). Anything else (e.g. a
    ``(features, logits)`` tuple) raises a ``TypeError`` that shows the output's
    structure and names ``logits_fn``.
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if (
        isinstance(output, (tuple, list))
        and len(output) >= 2
        and isinstance(output[0], torch.Tensor)
        and output[0].ndim == 0
        and isinstance(output[1], torch.Tensor)
        and output[1].ndim >= 1
    ):
        return output[1]
    raise TypeError(
        f"cannot tell which part of the model output is the logits; the output is "
        f"{describe_output(output)}. Pass logits_fn=... to pick them "
        "(e.g. logits_fn=lambda out: out[1])"
    )


def describe_output(obj, depth: int = 0) -> str:
    """A short structural description of a model output (types and tensor shapes)."""
    if isinstance(obj, torch.Tensor):
        return f"Tensor{tuple(obj.shape)}"
    if depth >= 2:
        return type(obj).__name__
    if isinstance(obj, Mapping):
        items = ", ".join(f"{k!r}: {describe_output(v, depth + 1)}" for k, v in obj.items())
        return f"{type(obj).__name__}({{{items}}})"
    if isinstance(obj, (tuple, list)):
        items = ", ".join(describe_output(v, depth + 1) for v in obj)
        return f"{type(obj).__name__}({items})"
    return type(obj).__name__


def class_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits ``(..., K)`` for the softmax radius. A binary classifier's single logit z
    per sample (shape ``(B,)`` or ``(..., 1)``, trained with ``BCEWithLogitsLoss``) is
    the two-class softmax ``[0, z]``: spread ``|a|``, exact radius
    ``sqrt(z^2 + pi^2) / |a|``. Other shapes are returned unchanged."""
    if logits.ndim == 1:
        logits = logits.unsqueeze(-1)
    if logits.shape[-1] == 1:
        return torch.cat([torch.zeros_like(logits), logits], dim=-1)
    return logits


def logits_reader(logits_fn: Callable[[Any], torch.Tensor] | None = None):
    """``class_logits(logits_fn(output))``: the output function for the logits."""
    # a partial of a module-level function: picklable (whole-object saves of a
    # RadiusController) whenever ``logits_fn`` is
    return functools.partial(_read_logits, logits_fn or default_logits_fn)


def _read_logits(pick: Callable[[Any], torch.Tensor], output) -> torch.Tensor:
    logits = pick(output)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits_fn must return a tensor, got {type(logits).__name__}")
    return class_logits(logits)
