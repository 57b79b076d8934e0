"""Rows of nested inputs and the logit positions that count.

The row operations (``batch_rows``, ``select_rows``, ``cat_rows``, ``detached_copy``)
act on a tensor, a tuple of arguments, a dict of keyword arguments or a
``ghoststep.Call`` alike: the controller's subset and bottleneck buffer select and join
rows with them. The masks (``keep_mask``, ``labels_of``, ``label_mask_fn``) say which
positions count: ``measure``'s ``mask`` / ``ignore_index`` and the controller's
``mask_fn`` / ``ignore_index`` are built by ``keep_mask``; a Hugging Face causal LM
scores its logits at t against label t + 1 (``is_causal_lm``, ``label_mask_fn(shift=True)``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ._inputs import Call, is_packed, tensor_leaves

__all__ = [
    "batch_rows",
    "cat_rows",
    "detached_copy",
    "is_causal_lm",
    "keep_mask",
    "label_mask_fn",
    "labels_of",
    "select_rows",
]


def labels_of(inputs):
    """The labels of ``inputs`` (dict: ``"labels"``; ``Call``: its ``labels`` keyword
    argument, else its ``targets``), or None."""
    if isinstance(inputs, Call):
        labels = inputs.kwargs.get("labels")
        return inputs.targets if labels is None else labels
    if isinstance(inputs, Mapping):
        return inputs.get("labels")
    return None


def detached_copy(obj):
    """The structure with every tensor detached and cloned (checkpoints, the buffer)."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), obj)


def batch_rows(obj) -> int | None:
    """Batch size: the leading size of the first tensor with at least one dimension (a
    ``PackedSequence``: its number of sequences)."""
    for t in tensor_leaves(obj):
        if is_packed(t):
            return int(t.batch_sizes[0]) if t.batch_sizes.numel() else 0
        if t.dim() >= 1:
            return int(t.shape[0])
    return None


def select_rows(obj, idx: torch.Tensor, rows: int):
    """Rows ``idx`` of every tensor whose leading size is ``rows``; others unchanged."""

    def pick(t: torch.Tensor) -> torch.Tensor:
        if t.dim() >= 1 and t.shape[0] == rows:
            return t.index_select(0, idx.to(t.device))
        return t

    return pytree.tree_map_only(torch.Tensor, pick, obj)


def cat_rows(a, b, rows_a: int, rows_b: int | None):
    """``a`` and ``b`` concatenated along rows (tensors with ``rows_a`` / ``rows_b``
    leading rows; other leaves taken from ``a``); None if the structures, per-row
    shapes or dtypes do not match."""
    if rows_b is None:
        return None
    leaves_a, spec_a = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    if spec_a != spec_b:
        return None
    out = []
    for u, w in zip(leaves_a, leaves_b, strict=True):
        if not (isinstance(u, torch.Tensor) and isinstance(w, torch.Tensor)):
            out.append(u)
        elif u.dim() >= 1 and w.dim() >= 1 and u.shape[0] == rows_a and w.shape[0] == rows_b:
            if u.shape[1:] != w.shape[1:] or u.dtype != w.dtype:
                return None
            out.append(torch.cat([u, w.to(u.device)], 0))
        else:
            out.append(u)
    return pytree.tree_unflatten(out, spec_a)


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
