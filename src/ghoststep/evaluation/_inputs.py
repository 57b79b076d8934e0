"""Model inputs: the forward's arguments, and their slices along the batch.

Inputs are a tensor or a ``PackedSequence`` (one positional argument), a tuple / list
of tensors (positional arguments), a dict (keyword arguments, e.g. ``input_ids``,
``attention_mask``) -- Python scalars, strings and None pass through -- or a
:class:`Call`, any call replayed exactly (one dict or tuple argument, nested containers,
lists of lengths, any objects). Chunked evaluation slices every tensor whose leading
size is the batch size along dim 0, nested ones included, which is refused while a BatchNorm
normalizes with batch statistics (the result would depend on the chunking) and for a
``PackedSequence`` (its rows are interleaved by time step).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils import _pytree as pytree

__all__ = [
    "Call", "split_inputs", "batch_size", "chunks", "batch_coupled", "check_chunking",
    "check_row_slicing", "plain_value", "is_packed", "tensor_leaves",
]  # fmt: skip

_PASSTHROUGH = (bool, int, float, str, type(None))


class Call:
    """One forward call, replayed exactly: ``model(*args, **kwargs)``.

    The ``inputs`` of a call that is not a tensor, a tuple of positional tensors or a
    dict of keyword tensors: one dict / tuple / list argument
    (``Call({"x": x, "mask": m})`` for ``model({"x": x, "mask": m})``), a
    ``PackedSequence``, a list of lengths (``Call(x, [3, 5, 2])``), nested containers,
    any other objects. Nothing is re-split: the model receives these very objects.
    ``RadiusController`` hands a captured call of that kind to ``mask_fn``,
    ``targets_fn`` and ``extra_radii`` as a ``Call``; ``step(inputs=Call(...))`` passes
    one explicitly.

    Row operations (``subset``, ``buffer_size``, ``chunk_size``) select the rows of every
    tensor in it, at any depth, whose leading size is the batch size; other values
    (Python lists of lengths included) are passed unchanged, so per-row values meant to
    follow a row selection must be tensors. A ``PackedSequence`` cannot be row-sliced:
    those options are refused for it.

    Attributes:
        args, kwargs: the positional and keyword arguments, as given.
        targets: what the loss compares the logits with when the model does not receive
            it (e.g. the labels a Hugging Face Trainer pops before the forward under
            label smoothing); never passed to the model, its rows follow the inputs'
            rows; read by ``ignore_index`` (``targets_fn`` takes precedence). None: none.
    """

    __slots__ = ("args", "kwargs", "targets")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.targets = args, kwargs, None

    def with_targets(self, targets: Any) -> Call:
        """The same call carrying ``targets`` (see the class docstring)."""
        out = Call(*self.args, **self.kwargs)
        out.targets = targets
        return out

    def __reduce__(self):
        return (_rebuild_call, (self.args, self.kwargs, self.targets))

    def __repr__(self) -> str:
        parts = [_describe(a) for a in self.args]
        parts += [f"{k}={_describe(v)}" for k, v in self.kwargs.items()]
        extra = "" if self.targets is None else f", targets={_describe(self.targets)}"
        return f"Call({', '.join(parts)}){extra}"


def _rebuild_call(args: tuple, kwargs: dict, targets: Any) -> Call:
    return Call(*args, **kwargs).with_targets(targets)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    return type(value).__name__ if isinstance(value, (Mapping, tuple, list)) else repr(value)


pytree.register_pytree_node(
    Call,
    lambda call: ([call.args, call.kwargs, call.targets], None),
    lambda children, _: _rebuild_call(*children),
    serialized_type_name="ghoststep.Call",
)


def is_packed(value: Any) -> bool:
    """A ``PackedSequence`` (a leaf for the row operations: it cannot be row-sliced)."""
    return isinstance(value, PackedSequence)


def tensor_leaves(obj: Any) -> list:
    """The tensors and ``PackedSequence`` objects of a nested structure, in order."""
    leaves = pytree.tree_leaves(obj, is_leaf=is_packed)
    return [v for v in leaves if isinstance(v, torch.Tensor) or is_packed(v)]


def plain_value(value: Any) -> bool:
    """A tensor or a Python scalar / string / None (what a tuple or dict of inputs holds)."""
    return isinstance(value, torch.Tensor) or isinstance(value, _PASSTHROUGH)


def check_row_slicing(obj: Any, option: str) -> None:
    """Refuse ``option`` (a row operation: subset, buffer, chunks) on inputs holding a
    ``PackedSequence``, whose rows are interleaved by time step."""
    if any(is_packed(v) for v in tensor_leaves(obj)):
        raise ValueError(
            f"{option} selects rows of the inputs, but a PackedSequence cannot be "
            f"row-sliced (its rows are interleaved by time step); leave {option} unset, or "
            "pass padded tensors and their lengths and pack inside the model"
        )


def split_inputs(inputs) -> tuple[tuple, dict]:
    """Positional args and kwargs for the model from a tensor / ``PackedSequence`` (one
    argument), a tuple / list (positional), a dict (keyword) or a :class:`Call` (as is)."""

    def check(where: str, value):
        if plain_value(value):
            return value
        raise TypeError(
            f"{where} is a {type(value).__name__}; inputs must be tensors (Python scalars, "
            "strings and None are passed through). Convert arrays/lists with torch.as_tensor, "
            "or pass the exact call as ghoststep.Call(*args, **kwargs)"
        )

    if isinstance(inputs, Call):
        return tuple(inputs.args), dict(inputs.kwargs)
    if isinstance(inputs, torch.Tensor) or is_packed(inputs):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), {str(k): check(f"inputs[{k!r}]", v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(check(f"inputs[{i}]", v) for i, v in enumerate(inputs)), {}
    raise TypeError(
        f"inputs must be a tensor, a tuple/list of tensors (positional arguments), a "
        f"dict of tensors (keyword arguments) or a ghoststep.Call, got {type(inputs).__name__}"
    )


def batch_size(args: tuple, kwargs: dict) -> int:
    """The batch size: the leading size of the first tensor with a dimension in ``args``
    / ``kwargs`` (at any depth); :func:`chunks` slices the tensors of that leading size."""
    check_row_slicing((args, kwargs), "chunk_size")
    for v in tensor_leaves((args, kwargs)):
        if v.dim() > 0:
            return int(v.shape[0])
    raise ValueError("chunk_size needs at least one tensor input with a batch dimension")


def chunks(args: tuple, kwargs: dict, chunk_size: int | None):
    """Yield ``(start, stop, args, kwargs)`` slices of the inputs along dim 0: every
    tensor, at any depth, whose leading size is the batch size (:func:`batch_size`) is
    sliced; everything else is passed as is to every chunk."""
    if chunk_size is None:
        yield 0, None, args, kwargs
        return
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    n = batch_size(args, kwargs)
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        a, k = pytree.tree_map_only(
            torch.Tensor,
            lambda v, s=s, e=e: v[s:e] if v.dim() > 0 and v.shape[0] == n else v,
            (args, kwargs),
        )
        yield s, e, tuple(a), k


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
