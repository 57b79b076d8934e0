"""What ``RadiusController.state_dict()["ghoststep"]`` holds, typed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..evaluation._inputs import Call
from ..evaluation._rows import detached_copy

__all__ = ["ControllerState"]

STATE_VERSION = 1


@dataclass
class ControllerState:
    """The controller's own state between steps (the inner optimizer keeps its own).

    Attributes:
        step_count: steps taken (skipped ones included).
        skipped_steps: steps skipped for a non-finite value or an all-masked batch.
        recent_rhos: the previous W - 1 radii (``window=W``), oldest first.
        buffer: the inputs of the bottleneck rows (``buffer_size``), or None; a
            ``ghoststep.Call`` is stored as ``{"ghoststep.Call": [args, kwargs,
            targets]}``, so that ``torch.load(weights_only=True)`` reads it.
        generator: the subset generator's state (a CPU ByteTensor).
        warned: whether the once-per-controller fault warning was given.
        spread_hint: ``"fast"``'s last max spread per unit step, which sets its next
            difference step (None before the first measurement).
        method: the method in use (``method="auto"``'s choice, fixed for the run).
    """

    step_count: int = 0
    skipped_steps: int = 0
    recent_rhos: list[float] = field(default_factory=list)
    buffer: Any = None
    generator: torch.Tensor | None = None
    warned: bool = False
    spread_hint: float | None = None
    method: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "step_count": self.step_count,
            "skipped_steps": self.skipped_steps,
            "recent_rhos": list(self.recent_rhos),
            "buffer": _stored(detached_copy(self.buffer)),
            "generator": self.generator,
            "warned": self.warned,
            "spread_hint": self.spread_hint,
            "method": self.method,
        }

    @classmethod
    def from_dict(cls, ours: Mapping[str, Any]) -> ControllerState:
        """Read :meth:`to_dict`'s output (missing keys: defaults)."""
        if ours.get("version", STATE_VERSION) != STATE_VERSION:
            raise ValueError(f"unsupported ghoststep state version {ours.get('version')!r}")
        generator = ours.get("generator")
        return cls(
            step_count=int(ours.get("step_count", 0)),
            skipped_steps=int(ours.get("skipped_steps", 0)),
            recent_rhos=[float(r) for r in ours.get("recent_rhos", [])],
            buffer=_restored(detached_copy(ours.get("buffer"))),
            generator=None if generator is None else generator.clone(),
            warned=bool(ours.get("warned", False)),
            spread_hint=None if ours.get("spread_hint") is None else float(ours["spread_hint"]),
            method=ours.get("method"),
        )


_CALL = "ghoststep.Call"


def _stored(buffer: Any) -> Any:
    """A ``Call`` buffer as plain containers (checkpoints loaded with weights_only)."""
    if isinstance(buffer, Call):
        return {_CALL: [list(buffer.args), dict(buffer.kwargs), buffer.targets]}
    return buffer


def _restored(buffer: Any) -> Any:
    """Inverse of :func:`_stored`."""
    if isinstance(buffer, Mapping) and set(buffer) == {_CALL}:
        args, kwargs, targets = buffer[_CALL]
        return Call(*args, **kwargs).with_targets(targets)
    return buffer
