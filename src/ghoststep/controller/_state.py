"""What ``RadiusController.state_dict()["ghoststep"]`` holds, typed."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..evaluation._replay import Call, detached_copy

__all__ = [
    "GROUP_KEY",
    "ControllerState",
    "merge_inner_states",
    "pack_state",
    "split_controller_state",
    "split_inner_state",
]

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
        reference: always-on (``every > 1``): the last measured step as ``(radius, tau,
            steps since, unsteady)``, or None.
    """

    step_count: int = 0
    skipped_steps: int = 0
    recent_rhos: list[float] = field(default_factory=list)
    buffer: Any = None
    generator: torch.Tensor | None = None
    warned: bool = False
    spread_hint: float | None = None
    method: str | None = None
    reference: tuple | None = None

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
            "reference": None if self.reference is None else list(self.reference),
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
            reference=_reference(ours.get("reference")),
        )


def _reference(saved) -> tuple | None:
    if saved is None:
        return None
    radius, tau, since, unsteady = saved
    return float(radius), float(tau), int(since), bool(unsteady)


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


# ------------------------------------------------------------- the torch layout

GROUP_KEY = "ghoststep"  # the packed ControllerState in the first param group


def pack_state(ours: Mapping[str, Any]) -> bytes:
    """:meth:`ControllerState.to_dict` as bytes: one opaque value, so that DCP saves and
    loads it whole (its contents, e.g. a buffer that is None on a fresh controller and a
    tensor in the checkpoint, need not match the structure it loads into)."""
    buffer = io.BytesIO()
    torch.save(dict(ours), buffer)
    return buffer.getvalue()


def unpack_state(packed: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(packed), map_location="cpu", weights_only=True)


def split_controller_state(state_dict: Mapping[str, Any]):
    """``(the inner optimizers' state dict, the controller's state dict or None)`` of a
    :meth:`RadiusController.state_dict` in the torch layout (the top-level
    ``"ghoststep"``, else the packed copy in a param group: DCP keeps only ``"state"``
    and ``"param_groups"``); the groups are copied without the packed key."""
    inner = {k: v for k, v in state_dict.items() if k != "ghoststep"}
    ours = state_dict.get("ghoststep")
    groups = []
    for group in inner.get("param_groups", []):
        group = dict(group)
        packed = group.pop(GROUP_KEY, None)
        if ours is None and packed is not None:
            ours = unpack_state(packed)
        groups.append(group)
    if "param_groups" in inner:
        inner["param_groups"] = groups
    return inner, ours


def merge_inner_states(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several inner optimizers' state dicts as one: groups concatenated, parameter ids
    counted on across the optimizers (the positions in the concatenated groups, as
    torch numbers one optimizer's and DCP maps them); one optimizer's as it is."""
    if len(states) == 1:
        return dict(states[0])
    state: dict[Any, Any] = {}
    groups: list[dict[str, Any]] = []
    extras, offset = [], 0
    for sd in states:
        for group in sd["param_groups"]:
            groups.append({**group, "params": [offset + i for i in group["params"]]})
        state.update({offset + i: v for i, v in sd["state"].items()})
        offset += sum(len(group["params"]) for group in sd["param_groups"])
        extras.append({k: v for k, v in sd.items() if k not in ("state", "param_groups")})
    merged: dict[str, Any] = {"state": state, "param_groups": groups}
    if any(extras):
        merged["inner_extras"] = extras
    return merged


def split_inner_state(merged: Mapping[str, Any], optimizers) -> list[dict[str, Any]]:
    """:func:`merge_inner_states` undone: each optimizer its groups (by its number of
    groups, in order) and the state of the parameters they list (ids or DCP's
    parameter names alike)."""
    groups = list(merged["param_groups"])
    counts = [len(o.param_groups) for o in optimizers]
    if len(groups) != sum(counts):
        raise ValueError(
            f"the state dict has {len(groups)} param groups; this RadiusController wraps "
            f"{len(optimizers)} optimizers, with {counts}"
        )
    extras = merged.get("inner_extras") or [{} for _ in optimizers]
    out, start = [], 0
    for count, extra in zip(counts, extras, strict=True):
        mine = groups[start : start + count]
        start += count
        keys = [k for group in mine for k in group["params"]]
        state = {k: merged["state"][k] for k in keys if k in merged["state"]}
        out.append({**extra, "state": state, "param_groups": mine})
    return out
