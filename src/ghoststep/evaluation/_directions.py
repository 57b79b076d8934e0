"""Parameter-space directions: which parameters move, and directions to move along.

Only parameters with ``requires_grad=True`` take part, in the order (and with the
names) of ``model.named_parameters()`` (tied weights are listed once, under their
first name). A direction is one of

* a dict ``{name: tensor}`` (or keyed by the parameter objects themselves); every
  trainable parameter needs an entry (``None`` means zero), entries for frozen
  parameters are ignored, unknown names are an error; an alias name of a tied weight
  is accepted;
* a sequence aligned with ``[p for p in model.parameters() if p.requires_grad]``
  (``None`` entries mean zero);
* one flat 1-D tensor of length ``sum(p.numel())`` over that same list, in that order.

``resolve_direction`` validates any of these into one tangent per parameter;
``gradient_direction`` and ``random_direction`` build directions (dicts), and
``ghoststep.evaluation.optimizer_update_direction`` the optimizer's pending update.

>>> import torch
>>> from ghoststep.evaluation import direction_norm, random_direction
>>> model = torch.nn.Linear(4, 3)
>>> round(float(direction_norm(random_direction(model, seed=1))), 6)
1.0
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._outputs import default_logits_fn
from ._replay import cuda_devices, preserved_buffers, replay_rng, split_inputs

__all__ = [
    "trainable_parameters",
    "resolve_direction",
    "direction_norm",
    "gradient_direction",
    "random_direction",
]


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter with ``requires_grad``, in model order.

    Raises:
        ValueError: the model has no trainable parameter.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(
            "model has no trainable parameters (none with requires_grad=True); "
            "there is no direction to move along"
        )
    return named


def _alias_map(model: nn.Module) -> dict[str, str]:
    """Every parameter name (tied aliases included) -> its canonical name."""
    canonical: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = canonical.setdefault(id(p), name)
    return out


def resolve_direction(model: nn.Module, direction) -> list[torch.Tensor]:
    """Validate ``direction`` and return one tangent per trainable parameter.

    Args:
        model: the module whose trainable parameters the direction moves.
        direction: a dict, an aligned sequence or a flat tensor (see the module
            docstring).
    Returns:
        One tensor per :func:`trainable_parameters` entry, with that parameter's
        shape, device and dtype (zeros where the direction gives None).
    Raises:
        ValueError: the message names the offending parameter or entry.
    """
    named = trainable_parameters(model)
    if isinstance(direction, torch.Tensor):
        entries = _flat_entries(named, direction)
    elif isinstance(direction, Mapping):
        entries = _mapping_entries(model, named, direction)
    elif isinstance(direction, Sequence) and not isinstance(direction, str):
        if len(direction) != len(named):
            raise ValueError(
                f"direction has {len(direction)} entries but the model has {len(named)} "
                "trainable parameters (aligned with [p for p in model.parameters() "
                "if p.requires_grad])"
            )
        entries = list(direction)
    else:
        raise ValueError(
            "direction must be a dict {name: tensor}, a sequence of tensors aligned with "
            f"the trainable parameters, or a flat tensor; got {type(direction).__name__}"
        )
    return [_tangent(name, p, value) for (name, p), value in zip(named, entries, strict=True)]


def _flat_entries(named, direction: torch.Tensor) -> list[torch.Tensor]:
    """Views of one flat vector, one per parameter in order."""
    total = sum(p.numel() for _, p in named)
    if direction.dim() != 1 or direction.numel() != total:
        raise ValueError(
            f"a tensor direction must be one flat 1-D vector of length {total} "
            f"(all trainable parameters), got shape {tuple(direction.shape)}"
        )
    sizes = [p.numel() for _, p in named]
    return [part.view(p.shape) for part, (_, p) in zip(direction.split(sizes), named, strict=True)]


def _mapping_entries(model: nn.Module, named, direction: Mapping) -> list[Any]:
    """Entries of a dict keyed by names (tied aliases accepted) or parameter objects."""
    aliases = _alias_map(model)
    by_id = {id(p): n for n, p in model.named_parameters()}
    trainable = {n for n, _ in named}
    given: dict[str, Any] = {}
    for key, value in direction.items():
        if isinstance(key, torch.Tensor):
            if id(key) not in by_id:
                raise ValueError("direction is keyed by a tensor that is not a model parameter")
            name = by_id[id(key)]
        elif isinstance(key, str):
            if key not in aliases:
                raise ValueError(f"direction names unknown parameter {key!r}")
            name = aliases[key]
        else:
            raise ValueError(f"direction keys must be parameter names, got {key!r}")
        if name not in trainable:
            continue  # frozen parameter: takes no part
        if name in given:
            raise ValueError(f"direction gives parameter {name!r} twice (tied alias?)")
        given[name] = value
    missing = [n for n, _ in named if n not in given]
    if missing:
        raise ValueError(
            f"direction has no entry for trainable parameter {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; use None for a zero component"
        )
    return [given[n] for n, _ in named]


def _tangent(name: str, p: torch.Tensor, value) -> torch.Tensor:
    """One entry checked and moved to the parameter's device and dtype."""
    if value is None:
        return torch.zeros_like(p, memory_format=torch.contiguous_format)
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"direction for parameter {name!r} must be a tensor, got {type(value).__name__}"
        )
    if value.shape != p.shape:
        raise ValueError(
            f"direction for parameter {name!r} has shape {tuple(value.shape)}, "
            f"expected {tuple(p.shape)}"
        )
    if not (value.is_floating_point() or value.is_complex()):
        raise ValueError(f"direction for parameter {name!r} must be floating, got {value.dtype}")
    value = value.detach().to(device=p.device, dtype=p.dtype)
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"direction for parameter {name!r} has non-finite values")
    return value


def global_norm(tensors) -> torch.Tensor:
    """||(t_1, ..., t_n)||, the Euclidean norm over all entries of all the tensors, as a
    0-d float64 tensor (per-tensor norms in one ``_foreach_norm``, then their norm)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)).double())


def direction_norm(direction, model: nn.Module | None = None) -> torch.Tensor:
    """Global L2 norm of a direction (dict, sequence or flat tensor), as a 0-d tensor.

    With ``model`` the direction is first resolved against its trainable parameters
    (frozen entries dropped); without, all tensor entries count.
    """
    if model is not None:
        parts = resolve_direction(model, direction)
    elif isinstance(direction, torch.Tensor):
        parts = [direction]
    elif isinstance(direction, Mapping):
        parts = [t for t in direction.values() if t is not None]
    else:
        parts = [t for t in direction if t is not None]
    if not parts:
        return torch.zeros(())
    return torch.sqrt(sum(t.detach().double().pow(2).sum().cpu() for t in parts))


def gradient_direction(
    model: nn.Module,
    loss,
    inputs=None,
    targets=None,
    *,
    logits_fn: Callable[[Any], torch.Tensor] | None = None,
    normalize: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The (normalized) gradient of a loss as a direction.

    Three ways to give the loss:

    * a scalar tensor still attached to the graph (e.g. the training loss you just
      computed); the graph is kept (``retain_graph=True``) so a later ``backward``
      still works;
    * a callable with no arguments returning that scalar (a closure);
    * a callable ``loss_fn(logits, targets)`` (or ``loss_fn(logits)`` when
      ``targets`` is None) together with ``inputs``: the model is run here, in its
      current mode, with buffers and the RNG state restored afterwards (no side
      effects), e.g. ``gradient_direction(model, F.cross_entropy, x, y)``.

    ``.grad`` fields are not touched (``torch.autograd.grad``). Parameters the loss
    does not reach get a zero component.

    Returns:
        ``(direction, grad_norm)``: a dict ``{name: tensor}`` over the trainable
        parameters (g / ||g||, or g when ``normalize=False``; zeros if g = 0) and
        ||g|| as a 0-d float64 tensor.
    """
    named = trainable_parameters(model)
    params = [p for _, p in named]
    if isinstance(loss, torch.Tensor):
        value, retain = loss, True
    elif callable(loss) and inputs is None:
        value, retain = loss(), False
    elif callable(loss):
        args, kwargs = split_inputs(inputs)
        with replay_rng(cuda_devices(model)), preserved_buffers(model), torch.enable_grad():
            out = (logits_fn or default_logits_fn)(model(*args, **kwargs))
            value = loss(out, targets) if targets is not None else loss(out)
            grads = torch.autograd.grad(value, params, allow_unused=True)
        value, retain = None, False
    else:
        raise TypeError("loss must be a scalar tensor or a callable")
    if value is not None:
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError("the loss must be a scalar tensor")
        if not value.requires_grad:
            raise ValueError(
                "the loss is not attached to an autograd graph (computed under no_grad?)"
            )
        grads = torch.autograd.grad(value, params, allow_unused=True, retain_graph=retain)
    parts = [
        torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)
    ]
    norm = torch.sqrt(sum(t.double().pow(2).sum() for t in parts))
    if normalize and float(norm) > 0:
        parts = [(t.double() / norm).to(t.dtype) for t in parts]
    return {n: t for (n, _), t in zip(named, parts, strict=True)}, norm


def random_direction(
    model: nn.Module, seed: int = 0, *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """A random unit direction over the trainable parameters, reproducible by ``seed``.

    Gaussian entries drawn on the CPU from a private ``torch.Generator`` (the global
    RNG is neither used nor advanced), then scaled to unit global L2 norm and moved
    to each parameter's device and dtype (``dtype`` overrides the dtype). The same
    seed gives the same direction on any device.

    Returns:
        dict ``{name: tensor}``.
    """
    named = trainable_parameters(model)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    draws = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for _, p in named]
    norm = torch.sqrt(sum(d.pow(2).sum() for d in draws))
    return {
        n: (d / norm).to(device=p.device, dtype=dtype or p.dtype)
        for (n, p), d in zip(named, draws, strict=True)
    }
