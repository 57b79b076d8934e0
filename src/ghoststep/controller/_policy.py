"""The controller's policy: which slope method a run uses, in which precision it
measures, and the margin below the measured radius that covers the method's error there.

* ``method="auto"`` (:func:`auto_choice`, :func:`auto_method` for FSDP2): the cheapest
  method exact enough for how the model trains (table in ``docs/api/controller.md``);
* the precision of a measurement (:func:`precision`): ``"full"`` float32 / float64,
  ``"autocast"`` (the JVP under the training forward's bfloat16 / float16 autocast) or
  ``"half"`` (16-bit parameters or buffers: the JVP in 16 bits, and the rounding of
  ``old + s p`` into them);
* the margin by method and precision (:data:`MARGINS`, :func:`margin_for`);
* what sharded (FSDP2) parameters allow (:func:`check_sharding`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..evaluation._directional import tf32_allowed
from ..evaluation._isolation import HALF
from ..evaluation._sharding import half_compute, is_sharded

__all__ = [
    "MARGINS",
    "auto_choice",
    "auto_method",
    "check_sharding",
    "half_precision",
    "margin_for",
    "precision",
]

# Default relative margin below the measured radius (clip and set mode), by method and
# by the precision the measurement ran in. The exact JVP in float32 only needs its
# rounding covered; the secants ("fd" across a kink, "fast" with its O(h) error) need
# more. Measured errors: benchmarks/bench_precision.py, table in docs/benchmarks.md.
MARGINS = {
    ("jvp", "full"): 1e-5,
    ("jvp", "autocast"): 1e-2,
    ("jvp", "half"): 3e-2,
    ("fast", "full"): 2e-2,
    ("fd", "full"): 1e-2,
    ("fd", "half"): 3e-2,
}


def margin_for(method: str, precision: str, margin: float | None = None) -> float:
    """The margin for ``method`` measuring in ``precision`` (``"full"``, ``"autocast"``,
    ``"half"``): ``margin`` when given, else :data:`MARGINS` (a precision without an
    entry: the method's ``"full"`` one)."""
    if margin is not None:
        return margin
    return MARGINS.get((method, precision), MARGINS[(method, "full")])


def half_precision(model: nn.Module, params: Sequence[torch.Tensor]) -> bool:
    """Whether the forward computes with 16-bit tensors: the trainable parameters, any
    other parameter or floating buffer of the model (a frozen bfloat16 base under
    float32 adapters), or FSDP2's ``param_dtype``."""
    tensors = (*params, *model.parameters(), *model.buffers())
    return any(t.dtype in HALF for t in tensors) or half_compute(model)


def precision(model: nn.Module, params, method: str, batches) -> str:
    """The precision a measurement runs in, for the margin: ``"half"``
    (:func:`half_precision`), ``"autocast"`` (the JVP under the training forward's
    autocast, also one applied inside the model's forward) or ``"full"``."""
    if half_precision(model, params):
        return "half"
    if method == "jvp" and any(entry.autocast for entry in batches):
        return "autocast"
    return "full"


def auto_choice(model: nn.Module, params, batches, cuda: bool) -> str:
    """``method="auto"`` at the first step, before a trial: ``"jvp"`` for bfloat16 /
    float16 parameters or buffers (trainable or not), a training forward under
    autocast (around the call or inside the model's forward: Accelerate, the HF
    Trainer) or TF32 on CUDA (``cuda``: the model is on a CUDA device), where a secant
    is off by 10 % or more and a JVP by < 1 %; ``"fast"`` otherwise (float32 / float64,
    one extra forward). The controller tries ``"jvp"`` once and falls back to
    ``"fast"`` where an op has no forward-mode AD (16-bit parameters: the error is
    raised, no method is both possible and accurate)."""
    coarse = any(entry.autocast for entry in batches) or (cuda and tf32_allowed())
    return "jvp" if half_precision(model, params) or coarse else "fast"


def auto_method(model: nn.Module, params: Sequence[torch.Tensor]) -> str:
    """``method="auto"`` for sharded parameters, fixed at construction: ``"jvp"`` when
    the shards or FSDP's ``param_dtype`` are 16-bit (a secant is off by 10 % or more
    there), ``"fast"`` otherwise (one extra forward)."""
    if any(p.dtype in HALF for p in params) or half_compute(model):
        return "jvp"
    return "fast"


def check_sharding(model, params, method: str, extra_radii, scaled_update: str) -> None:
    """FSDP2 (DTensor) parameters: only the ordinary forward can evaluate them
    (``"fast"``, or ``"jvp"`` through :func:`dual_unsharded`). FSDP1's flat parameters
    look like plain tensors but are shards: refused."""
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        raise ValueError(
            "RadiusController does not support FSDP1 (FullyShardedDataParallel): its "
            "flat parameters are shards that look like whole tensors. Shard with FSDP2 "
            "(torch.distributed.fsdp.fully_shard; Lightning ModelParallelStrategy) and "
            'method="fast" or "jvp"'
        )
    if not is_sharded(params):
        return
    if method not in ("fast", "jvp"):
        raise ValueError(
            f'method="{method}" cannot evaluate sharded (FSDP2 / DTensor) parameters '
            '(functional_call does not support them); use method="jvp" or method="fast", '
            "which go through the model's own FSDP forward"
        )
    if method == "fast" and half_compute(model):
        raise ValueError(
            'method="fast" cannot run under an FSDP2 MixedPrecisionPolicy with a 16-bit '
            "param_dtype (a one-sided difference in bfloat16 / float16 has a relative "
            'error of 1e-2 or worse); use method="jvp"'
        )
    for name, bad in (
        ("extra_radii", extra_radii is not None),
        ('scaled_update="rerun"', scaled_update == "rerun"),
    ):
        if bad:
            raise ValueError(f"{name} is not supported with sharded (FSDP2) parameters")
