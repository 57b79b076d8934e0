"""``RadiusController``'s arguments at construction: checked (errors name the
argument) and resolved (the module the measurement evaluates and the one whose hooks see
the training calls, the logits reader, ``scaled_update``, the causal-LM label mask)."""

from __future__ import annotations

import math
import numbers
import sys

import torch
from torch import nn

from ..evaluation._directional import SLOPE_METHODS
from ..evaluation._masks import is_causal_lm, label_mask_fn
from ..evaluation._outputs import LogitsReader, detect_layout
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


# ------------------------------------------------ what the arguments resolve to


def holds_iterate(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer keeps an iterate of its own besides the parameters
    (schedule-free: z; Lookahead: the slow weights), so that rescaling the parameters
    alone would leave the two apart. Known families, by class name."""
    names = {cls.__name__.lower() for cls in type(optimizer).__mro__}
    return any("schedulefree" in n or "lookahead" in n for n in names)


def check_supported(optimizer: torch.optim.Optimizer) -> None:
    """Refuse, at construction, optimizers whose ``step`` needs a closure."""
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError(
            "RadiusController cannot wrap LBFGS: its step re-evaluates the loss through "
            "a closure along a line search, so there is no single proposed update to "
            "measure. Use a first-order optimizer, or measure LBFGS steps with "
            "ghoststep.measure(model, inputs, update, tau=1.0)"
        )
    if all(hasattr(optimizer, a) for a in ("first_step", "second_step", "base_optimizer")):
        name = type(optimizer).__name__
        raise ValueError(
            f"RadiusController cannot wrap {name}: its step needs a closure (two forward "
            "passes). Wrap its base optimizer instead, which makes the update: "
            f"`sam = {name}(...); sam.base_optimizer = RadiusController("
            "sam.base_optimizer, model)`, then train with sam as usual "
            "(first_step / second_step or step(closure))"
        )


_PARALLEL = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def _compiled(model: nn.Module) -> bool:
    """A ``torch.compile`` module (``OptimizedModule``; its ``_orig_mod`` is the model)."""
    return type(model).__name__ == "OptimizedModule" and isinstance(
        getattr(model, "_orig_mod", None), nn.Module
    )


def slope_module(model: nn.Module) -> nn.Module:
    """The module the measurement evaluates: DDP / DataParallel and ``torch.compile``
    wrappers removed (a compiled module shares its parameters with ``_orig_mod``;
    forward-mode AD does not run through the compiled graph)."""
    while isinstance(model, _PARALLEL) or _compiled(model):
        model = model.module if isinstance(model, _PARALLEL) else model._orig_mod
    return model


def hooked_module(model: nn.Module) -> nn.Module:
    """The module whose forward hooks see the training calls: the DDP-unwrapped model,
    a compiled one included (its hooks run eagerly, outside the compiled graph)."""
    return model.module if isinstance(model, _PARALLEL) else model


def logits_reader_for(model: nn.Module, logits_fn, class_dim, activation) -> LogitsReader:
    """How the loss reads the outputs: the arguments, else what a Hugging Face model's
    config says (:func:`~ghoststep.evaluation._outputs.detect_layout`), else softmax
    with the class axis of 3+-dim outputs read from the first step's gradient."""
    if isinstance(logits_fn, LogitsReader):
        return logits_fn
    detected_dim, detected_activation = detect_layout(model)
    if class_dim is None and activation is None:
        class_dim, activation = detected_dim, detected_activation
    return LogitsReader(logits_fn, class_dim=class_dim, activation=activation or "softmax")


def resolve_scaled_update(scaled_update: str, optimizers) -> str:
    """``scaled_update`` resolved (``"auto"``: ``"rerun"`` for optimizers with an iterate
    of their own); ``"rerun"`` restores and re-steps one optimizer, so it takes one."""
    if scaled_update == "auto":
        own = any(holds_iterate(inner) for inner in optimizers)
        scaled_update = "rerun" if own else "interpolate"
    if scaled_update == "rerun" and len(optimizers) != 1:
        raise ValueError(
            'scaled_update="rerun" (needed by schedule-free and Lookahead optimizers) '
            "re-steps one inner optimizer with scaled learning rates; it is not supported "
            "with several (RadiusController([opt_a, opt_b], model)): wrap such an optimizer "
            "alone"
        )
    return scaled_update


def check_method(method) -> None:
    if method != "auto" and method not in SLOPE_METHODS:
        raise ValueError(f"method must be 'auto' or one of {SLOPE_METHODS}, got {method!r}")


def shifted_label_mask(model: nn.Module, ignore_index: int, targets_fn):
    """The ``mask_fn`` of a Hugging Face causal LM's loss (its logits at t are scored
    against ``labels[t + 1]``, the labels from ``targets_fn`` when given), or None for
    other models (``targets_fn``'s targets then align with the logits)."""
    if "transformers" not in sys.modules or not is_causal_lm(model):
        return None
    return label_mask_fn(shift=True, ignore_index=ignore_index, targets_fn=targets_fn)
