"""Is the function measured at ``step()`` the one that produced the gradient?

A training forward depends on more than the parameters and the torch RNG: each
submodule's train / eval flag, its input tensors and the model's buffers (all of which
the loop can change between ``backward()`` and ``step()``; a forward can change its own
buffers, e.g. a MoCo queue). :func:`record` keeps the flags and the tensors' version
counters (``t._version``, bumped by every in-place op) at the training forward;
:func:`changes` names what changed since; :func:`flags_as` runs the measurement with the
recorded flags. :class:`Watch` warns once per cause, and when the step scale stays
near 0 (a frozen run is never silent).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["Recorded", "Watch", "changes", "flags_as", "record"]

_UNTRACKED = -1  # a tensor without a version counter (inference tensors)


class Recorded(NamedTuple):
    """What one training forward ran with: ``flags`` (``m.training`` of every module in
    ``model.modules()`` order), the version counter of every tensor leaf of its
    arguments (``inputs``) and of every buffer the forward can read (``buffers``;
    ``-1``: not tracked, e.g. a train-mode BatchNorm's running statistics, which its
    output does not read)."""

    flags: tuple[bool, ...]
    inputs: tuple[int, ...]
    buffers: tuple[int, ...]


def _version(t: torch.Tensor) -> int:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors have no version counter
        return _UNTRACKED


def _input_leaves(args: tuple, kwargs: dict) -> Iterator[tuple[str, torch.Tensor]]:
    for i, arg in enumerate(args):
        for leaf in pytree.tree_leaves(arg):
            if isinstance(leaf, torch.Tensor):
                yield f"args[{i}]", leaf
    for key, value in kwargs.items():
        for leaf in pytree.tree_leaves(value):
            if isinstance(leaf, torch.Tensor):
                yield repr(key), leaf


def _read_buffers(module: nn.Module) -> bool:
    """Whether the module's output reads its buffers (a train-mode BatchNorm that
    tracks running statistics normalizes with the batch's, and only writes them)."""
    return not (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.training
        and module.track_running_stats
    )


def _buffer_versions(modules: list[nn.Module]) -> tuple[int, ...]:
    return tuple(
        _version(b) if b is not None and _read_buffers(m) else _UNTRACKED
        for m in modules
        for b in m._buffers.values()
    )


def record(model: nn.Module, args: tuple, kwargs: dict) -> Recorded:
    """The flags and version counters of a forward about to run."""
    modules = list(model.modules())
    return Recorded(
        tuple(m.training for m in modules),
        tuple(_version(t) for _, t in _input_leaves(args, kwargs)),
        _buffer_versions(modules),
    )


def changes(model: nn.Module, recorded: Recorded, args: tuple, kwargs: dict) -> list[str]:
    """What changed in place since :func:`record` (inputs and buffers, by name), as
    readable phrases; ``[]``: nothing. Flags are not listed (:func:`flags_as` replays
    them)."""
    found = []
    leaves = list(_input_leaves(args, kwargs))
    if len(leaves) == len(recorded.inputs):
        for (name, t), before in zip(leaves, recorded.inputs):
            now = _version(t)
            if before != _UNTRACKED and now != before:
                found.append(f"input {name} was changed in place (version {before} -> {now})")
    modules = list(model.named_modules())
    now_versions = _buffer_versions([m for _, m in modules])
    if len(now_versions) == len(recorded.buffers) and now_versions != recorded.buffers:
        names = [f"{prefix}.{n}" if prefix else n for prefix, m in modules for n in m._buffers]
        for name, before, now in zip(names, recorded.buffers, now_versions):
            if before != _UNTRACKED and now != before:
                found.append(f"buffer {name!r} was changed in place (version {before} -> {now})")
    return found


@contextlib.contextmanager
def flags_as(model: nn.Module, flags: tuple[bool, ...] | None):
    """Run the block with every module's train / eval flag as recorded (None: as they
    are); the flags of now are put back afterwards."""
    modules = list(model.modules())
    if flags is None or len(flags) != len(modules):
        yield
        return
    now = [m.training for m in modules]
    for m, flag in zip(modules, flags):
        m.training = flag
    try:
        yield
    finally:
        for m, flag in zip(modules, now):
            m.training = flag


_LIKELY = (
    "state the forward reads changed after it ran (an input or buffer changed in place, "
    "also through .data), or the forward draws random numbers outside torch's, Python's "
    "and NumPy's global generators"
)


class Watch:
    """The controller's warnings about the measured function: each cause once, and
    the step scale staying below ``FROZEN_SCALE`` for ``FROZEN_STEPS`` steps."""

    FROZEN_SCALE = 1e-3
    FROZEN_STEPS = 5

    def __init__(self) -> None:
        self.warned: set[str] = set()
        self.small = 0  # consecutive steps with a scale below FROZEN_SCALE

    def warn(self, key: str, message: str) -> None:
        if key in self.warned:
            return
        self.warned.add(key)
        warnings.warn(f"RadiusController: {message}", RuntimeWarning, stacklevel=8)

    def changed(self, causes: list[str], method: str) -> None:
        """Inputs / buffers changed since the training forward (``changes``)."""
        then = "the radius is measured on the function as it is now"
        if method in ("fast", "auto"):
            then += (
                ' (method="fast": against a baseline forward at the old parameters, not '
                "the training forward's logits)"
            )
        self.warn(
            "changed",
            "the function at step() is not the one that produced the gradient: "
            + "; ".join(causes[:3])
            + f" between the training forward and step(); {then} (warned once)",
        )

    def mismatch(self, method: str, gap: float) -> None:
        """The replay at the old parameters does not reproduce the training logits."""
        then = (
            'method="fast" now takes a baseline forward of its own every step'
            if method == "fast"
            else "the radius is measured on the replayed function"
        )
        self.warn(
            "mismatch",
            "replaying the training forward at the old parameters does not reproduce its "
            f"logits (relative gap {gap:.3g}); likely cause: {_LIKELY}; {then} (warned once)",
        )

    def scale(self, scale: float, r_before: float, rho: float, tau: float) -> None:
        """Count steps whose scale is below ``FROZEN_SCALE``; warn at ``FROZEN_STEPS``."""
        self.small = self.small + 1 if scale < self.FROZEN_SCALE else 0
        if self.small != self.FROZEN_STEPS:
            return
        self.warn(
            "frozen",
            f"the step scale has been below {self.FROZEN_SCALE:g} for {self.FROZEN_STEPS} "
            f"steps (now {scale:.3g}: r_before {r_before:.3g}, rho_a {rho:.3g}, tau "
            f"{tau:.3g}), training is nearly frozen. Likely causes: a learning rate far "
            "above what the loss allows (lower it), or a measurement against a stale "
            f"function ({_LIKELY})",
        )
