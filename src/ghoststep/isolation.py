"""Evaluating a model without side effects: RNG streams and buffers.

Every evaluation of ghoststep runs a model between training steps, so it must leave
the training run as if it had not happened: the CPU and CUDA RNG streams restored
(or replayed from a captured state, to draw the training forward's dropout masks)
and every buffer (BatchNorm running statistics, counters) bitwise unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["RNGState", "cuda_devices", "capture_rng", "replay_rng", "preserved_buffers"]

# (CPU generator state, {CUDA device index: generator state})
RNGState = tuple[torch.Tensor, dict[int, torch.Tensor]]


def cuda_devices(model: nn.Module) -> list[int]:
    """Indices of the CUDA devices holding the model's parameters (for the RNG)."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def capture_rng(devices: Sequence[int] = ()) -> RNGState:
    """The CPU RNG state and those of the given CUDA devices (no device sync)."""
    return torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in devices}


@contextlib.contextmanager
def replay_rng(devices: Sequence[int], state: RNGState | None = None):
    """Run from ``state`` (default: the current state); restore the RNG afterwards."""
    with torch.random.fork_rng(devices=list(devices)):
        if state is not None:
            torch.set_rng_state(state[0])
            for device, s in state[1].items():
                torch.cuda.set_rng_state(s, device)
        yield


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
