"""The logit positions that count.

``measure``'s ``mask`` / ``ignore_index`` and the controller's ``mask_fn`` /
``ignore_index`` are built by ``keep_mask``; a Hugging Face causal LM scores its logits
at t against label t + 1 (``is_causal_lm``, ``label_mask_fn(shift=True)``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ._replay import Call, labels_of

__all__ = ["is_causal_lm", "keep_mask", "label_mask_fn"]


def keep_mask(mask=None, targets=None, ignore_index=None, device=None) -> torch.Tensor | None:
    """The mask of the positions that count: True where a position counts -- ``mask`` (as bool) and
    ``targets != ignore_index`` -- or None when neither is given (every one counts).
    ``measure``'s ``mask`` / ``ignore_index`` and the controller's ``mask_fn`` /
    ``ignore_index`` both come here."""
    keep = None
    if mask is not None:
        keep = torch.as_tensor(mask).to(device=device, dtype=torch.bool)
    if ignore_index is not None:
        if targets is None:
            raise ValueError("ignore_index needs targets")
        not_ignored = torch.as_tensor(targets).to(device) != ignore_index
        keep = not_ignored if keep is None else keep & not_ignored
    return keep


_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_causal_lm(model: torch.nn.Module) -> bool:
    """True for Hugging Face causal language models (their loss shifts labels internally)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    name = type(base).__name__
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        known = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    except ImportError:  # pragma: no cover - layout of older releases
        known = set()
    return name in known or name.endswith(_CAUSAL_SUFFIXES)


def label_mask_fn(
    *, shift: bool, ignore_index: int = -100, targets_fn: Callable[[Any], Any] | None = None
) -> Callable[[Any], torch.Tensor]:
    """A ``mask_fn`` for ``RadiusController`` from the ``labels`` of Hugging Face inputs.

    Args:
        shift: the model scores logits position t against label t + 1 (causal LMs); the
            last position then has no label and is masked out.
        ignore_index: label value of positions the loss ignores.
        targets_fn: ``targets_fn(inputs)`` gives the labels (as passed to the model,
            unshifted); default: the ``labels`` keyword argument of a dict or a
            ``ghoststep.Call``, else the ``Call``'s targets (labels a Trainer popped).
    Returns:
        ``mask_fn(inputs) -> bool tensor`` of the logits' sample shape: ``labels !=
        ignore_index`` (shifted), all True for floating-point labels (regression,
        multi-label), or the ``attention_mask`` (shifted alike) when a causal LM gets no
        labels.
    """
    # a partial of a module-level function: picklable (whole-object controller saves)
    return functools.partial(_label_mask, shift, ignore_index, targets_fn)


def _label_mask(shift: bool, ignore_index: int, targets_fn, inputs: Any) -> torch.Tensor:
    if targets_fn is not None:
        labels = targets_fn(inputs)
    elif isinstance(inputs, (Mapping, Call)):
        labels = labels_of(inputs)
    else:
        raise TypeError(
            "the Hugging Face label mask expects keyword inputs (a dict or a ghoststep.Call); "
            "pass targets_fn=..."
        )
    if labels is None:
        kwargs = inputs.kwargs if isinstance(inputs, Call) else inputs
        attention = kwargs.get("attention_mask") if isinstance(kwargs, Mapping) else None
        if shift and attention is not None:
            return _shift_left(torch.as_tensor(attention).bool(), False)
        raise ValueError(
            "the batch has no 'labels', so the positions the loss ignores are unknown; "
            "pass mask_fn=... (or mask_fn=lambda inputs: <bool tensor of logits.shape[:-1]>)"
        )
    labels = torch.as_tensor(labels)
    if labels.is_floating_point():
        return torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
    keep = labels != ignore_index
    return _shift_left(keep, False) if shift else keep


def _shift_left(mask: torch.Tensor, fill: bool) -> torch.Tensor:
    """``out[..., t] = mask[..., t + 1]``, ``out[..., -1] = fill``."""
    out = torch.full_like(mask, fill)
    out[..., :-1] = mask[..., 1:]
    return out
