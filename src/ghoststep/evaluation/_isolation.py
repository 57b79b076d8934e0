"""Evaluating a model without side effects: RNG streams, buffers and autocast.

Every evaluation of ghoststep runs a model between training steps, so it must leave
the training run as if it had not happened: the CPU and CUDA RNG streams restored
(or replayed from a captured state, to draw the training forward's dropout masks; with
Python's ``random`` and NumPy's global generator when the state carries them)
and every buffer (BatchNorm running statistics, counters) bitwise unchanged. It must
also not inherit what surrounds it: an autocast block around ``opt.step()`` would
otherwise run the measuring forwards in bfloat16 (:func:`autocast_as`).
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "HALF",
    "AutocastState",
    "RNGState",
    "autocast_as",
    "autocast_state",
    "original_forward",
    "cuda_devices",
    "capture_rng",
    "replay_rng",
    "preserved_buffers",
]

# (CPU generator state, {CUDA device index: generator state}[, host state]); the host
# state (:func:`capture_host_rng`) is there when the evaluation replays Python's
# ``random`` and NumPy's global generator too
RNGState = tuple[torch.Tensor, dict[int, torch.Tensor]] | tuple[Any, ...]
# ((device type, autocast dtype), ...) of the device types with autocast enabled
AutocastState = tuple[tuple[str, torch.dtype], ...]
_AUTOCAST_DEVICES = ("cpu", "cuda")
# The 16-bit floating dtypes: parameters, buffers or autocast in them need the JVP and
# wider margins (a secant in them is off by 1e-2 or more).
HALF = (torch.bfloat16, torch.float16)


def _autocast_of(device: str) -> torch.dtype | None:
    try:
        enabled = torch.is_autocast_enabled(device)
        return torch.get_autocast_dtype(device) if enabled else None
    except TypeError:  # pragma: no cover - torch < 2.4: no device argument
        if device == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def autocast_state() -> AutocastState:
    """The autocast in effect now, e.g. ``(("cpu", torch.bfloat16),)``; ``()`` if none."""
    state = []
    for device in _AUTOCAST_DEVICES:
        dtype = _autocast_of(device)
        if dtype is not None:
            state.append((device, dtype))
    return tuple(state)


@contextlib.contextmanager
def autocast_as(state: AutocastState):
    """Run the block under exactly the autocast ``state`` (from :func:`autocast_state`;
    ``()``: none), whatever autocast surrounds it."""
    with contextlib.ExitStack() as stack:
        for device, _ in autocast_state():
            stack.enter_context(torch.autocast(device, enabled=False))
        for device, dtype in state:
            stack.enter_context(torch.autocast(device, dtype=dtype))
        yield


@contextlib.contextmanager
def original_forward(model: nn.Module):
    """Run the block with the model's own forward where Accelerate's mixed precision
    replaced ``model.forward`` by one that enters autocast itself (it keeps the
    original as ``model._original_forward``); a forward that must run without autocast
    (a float32 secant) could not turn that one off from outside."""
    wrapped = model.__dict__.get("forward")
    original = model.__dict__.get("_original_forward")
    if wrapped is None or original is None:
        yield
        return
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped


def cuda_devices(model: nn.Module) -> list[int]:
    """Indices of the CUDA devices holding the model's parameters (for the RNG)."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def capture_rng(devices: Sequence[int] = (), *, host: bool = False) -> RNGState:
    """The CPU RNG state and those of the given CUDA devices (no device sync); with
    ``host``, also Python's ``random`` and NumPy's global generator (a forward that
    draws from them, e.g. a LayerDrop, then replays its choices)."""
    cpu, cuda = torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in devices}
    return (cpu, cuda, capture_host_rng()) if host else (cpu, cuda)


def capture_host_rng() -> tuple[Any, Any]:
    """``(random.getstate(), numpy.random.get_state() or None)``: NumPy's only when it
    is imported already (a few microseconds; 2.5 KB each)."""
    numpy = sys.modules.get("numpy")
    return random.getstate(), None if numpy is None else numpy.random.get_state()


@contextlib.contextmanager
def replay_rng(devices: Sequence[int], state: RNGState | None = None):
    """Run from ``state`` (default: the current state); restore the RNG afterwards
    (Python's and NumPy's too when ``state`` carries them)."""
    host = state[2] if state is not None and len(state) > 2 else None
    with torch.random.fork_rng(devices=list(devices)), _replay_host(host):
        if state is not None:
            torch.set_rng_state(state[0])
            for device, s in state[1].items():
                torch.cuda.set_rng_state(s, device)
        yield


@contextlib.contextmanager
def _replay_host(state):
    """Run from a :func:`capture_host_rng` state and restore the current one after."""
    if state is None:
        yield
        return
    saved = capture_host_rng()
    random.setstate(state[0])
    numpy = sys.modules.get("numpy")
    if numpy is not None and state[1] is not None:
        numpy.random.set_state(state[1])
    try:
        yield
    finally:
        random.setstate(saved[0])
        if numpy is not None and saved[1] is not None:
            numpy.random.set_state(saved[1])


@contextlib.contextmanager
def preserved_buffers(model: nn.Module):
    """Leave every buffer bitwise as it was on exit (BatchNorm running statistics,
    counters), at the cost of two fused copies of the buffers no BatchNorm owns.

    Train-mode BatchNorm layers run the block with ``track_running_stats=False``: they
    normalize with the batch statistics as before and write no buffer (one kernel
    launch per buffer saved and restored matters on a GPU: ResNet-18 has 60).
    """
    quiet = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    untouched = {id(b) for m in quiet for b in m.buffers(recurse=False)}
    buffers = [b.detach() for b in model.buffers() if id(b) not in untouched]
    saved = [torch.empty_like(b) for b in buffers]
    if buffers:
        with torch.no_grad():
            torch._foreach_copy_(saved, buffers)
    for m in quiet:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in quiet:
            m.track_running_stats = True
        if buffers:
            with torch.no_grad():
                torch._foreach_copy_(buffers, saved)
