"""What one controller step measures, and how: the rows that set the radius, the slope
method, the precision and the margin.

* :class:`Sampling` (the sampling options: subset, bottleneck buffer, window, quantile,
  masks, micro-batches) and :func:`make_plan`, the immutable :class:`Plan` of what one
  captured micro-batch's measurement evaluates;
* ``method="auto"`` (:func:`auto_choice`, :func:`auto_method` for FSDP2): the cheapest
  method exact enough for how the model trains (table in ``docs/api/controller.md``);
* the precision of a measurement (:func:`precision`): ``"full"`` float32 / float64,
  ``"autocast"`` (the JVP under the training forward's bfloat16 / float16 autocast) or
  ``"half"`` (16-bit parameters or buffers: the JVP in 16 bits, and the rounding of
  ``old + s p`` into them);
* the margin by method and precision (:data:`MARGINS`, :func:`margin_for`);
* what sharded (FSDP2) parameters allow (:func:`check_sharding`).

Pure functions and immutable records; the controller holds the state (the buffer, the
generator, the recent radii).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..evaluation._directional import tf32_allowed
from ..evaluation._masks import keep_mask
from ..evaluation._replay import (
    HALF,
    batch_rows,
    cat_rows,
    check_row_slicing,
    detached_copy,
    labels_of,
    select_rows,
    split_inputs,
)
from ..evaluation._sharding import half_compute, is_sharded
from ._checks import check_real, is_int

__all__ = [
    "MARGINS",
    "Plan",
    "Reference",
    "Sampling",
    "auto_choice",
    "auto_method",
    "bottleneck_rows",
    "check_sharding",
    "half_precision",
    "make_plan",
    "margin_for",
    "measure_now",
    "reference_after",
    "precision",
]


@dataclass(frozen=True)
class Sampling:
    """The controller's sampling options: which samples set the radius (each option
    gives something up; all can be combined).

    * default: the whole batch -- the exact guarantee ``r <= target_r`` for every sample
      of the batch (every logit position for sequence models) at the old parameters.
    * ``subset=k``: k rows drawn from the batch without replacement (seeded
      ``torch.Generator``, its state is checkpointed). Gives up the guarantee for the
      rows not drawn; cost scales with k (with ``"fast"`` one forward of k rows: the
      subset's baseline is sliced from the training forward's logits when the rows are
      independent, i.e. that forward drew no random numbers and no BatchNorm used batch
      statistics). For BatchNorm in train mode the batch statistics of the subset differ
      from the training batch's.
    * ``buffer_size=m``: keep the inputs of the m rows with the largest spread seen so
      far (bottleneck samples) and evaluate them together with the current batch every
      step; the guarantee then covers batch and buffer. Gives up nothing for the batch
      in models whose rows are independent -- but with BatchNorm in train mode the
      buffer rows change the batch statistics, so the measured function is no longer
      exactly the training function of the batch. Inputs must have identical per-row
      shapes across steps (the buffer is dropped when they do not). Costs m extra rows.
    * ``window=W``: use ``min(rho now, the previous W - 1 radii)``. Only ever smaller
      than the current radius, so the batch guarantee holds; what it gives up is
      responsiveness: one bottleneck batch throttles the next W - 1 steps, and the
      older radii were measured along other directions at other parameters.
    * ``quantile=q``: use the q-quantile spread (upper order statistic; the radius
      ``ghoststep.radius.aggregate(rho, ("quantile", q))`` and
      ``measure(aggregate=("quantile", q))`` use, one convention:
      ``ghoststep.radius.quantile_position``) instead of the max. Gives up the
      guarantee for the (1 - q) share of samples with the largest spreads, in exchange
      for robustness to a few outliers. Under ``torch.distributed`` the max of the
      per-rank quantiles is used.

    Attributes:
        subset: evaluate k rows drawn from the batch (None: all rows).
        buffer_size: bottleneck rows kept and re-checked every step (0: off).
        window: running minimum of rho over the last W steps (1: off).
        quantile: the q-quantile spread (q = 1: the max) instead of the max.
        mask_fn: ``mask_fn(inputs) -> bool`` tensor of the sample shape; False: ignored.
        ignore_index: positions whose target equals it are ignored (alternative to
            ``mask_fn``); targets from ``targets_fn(inputs)``, else ``inputs["labels"]``
            (a ``Call``: its ``labels`` keyword argument, else its ``targets``).
        targets_fn: see ``ignore_index``; its targets align with the logits' positions
            (``RadiusController`` shifts them for a Hugging Face causal LM, as its loss
            does).
        seed: seed of the subset generator.
        micro_batches: ``"all"`` measures the radius on every training forward since
            the previous step (gradient accumulation: the update is built from all
            micro-batches, so all of them bound it; their inputs, and for ``"fast"``
            their logits, are held until ``step()``); ``"last"`` on the most recent
            one. A training forward is one in train mode with gradients enabled
            (``no_grad`` / ``inference_mode`` side forwards are ignored). Each
            micro-batch is evaluated on its own (BatchNorm sees the statistics it
            trained with) and the smallest radius is used. ``step(inputs=...)``
            overrides both.
    """

    subset: int | None = None
    buffer_size: int = 0
    window: int = 1
    quantile: float | None = None
    mask_fn: Callable[[Any], torch.Tensor] | None = None
    ignore_index: int | None = None
    targets_fn: Callable[[Any], torch.Tensor] | None = None
    seed: int = 0
    micro_batches: str = "all"

    def __post_init__(self) -> None:
        if not (isinstance(self.seed, numbers.Integral) and not isinstance(self.seed, bool)):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__} {self.seed!r}")
        if self.micro_batches not in ("last", "all"):
            raise ValueError(f'micro_batches must be "last" or "all", got {self.micro_batches!r}')
        if self.subset is not None and not (is_int(self.subset) and self.subset >= 1):
            raise ValueError(f"subset must be None or an int >= 1, got {self.subset!r}")
        if not (is_int(self.buffer_size) and self.buffer_size >= 0):
            raise ValueError(f"buffer_size must be an int >= 0, got {self.buffer_size!r}")
        if not (is_int(self.window) and self.window >= 1):
            raise ValueError(f"window must be an int >= 1, got {self.window!r}")
        q = self.quantile
        if q is not None:
            check_real("quantile", q)
            if not 0.0 < q <= 1.0:
                raise ValueError(f"quantile must be None or a number in (0, 1], got {q!r}")
        if self.ignore_index is not None and self.mask_fn is not None:
            raise ValueError("give either mask_fn or ignore_index, not both")
        if q is not None:
            object.__setattr__(self, "quantile", float(q))

    @property
    def samples_rows(self) -> bool:
        """Whether some rows of the training batch are re-used (subset or buffer)."""
        return self.subset is not None or self.buffer_size > 0

    @property
    def masks(self) -> bool:
        """Whether some positions may be ignored (``mask_fn`` or ``ignore_index``)."""
        return self.mask_fn is not None or self.ignore_index is not None

    def mask(self, inputs, n_samples: int, device: torch.device) -> torch.Tensor | None:
        """Flat bool mask over the ``n_samples`` logit positions, or None (keep all)."""
        mask = self.position_mask(inputs)
        if mask is None:
            return None
        if mask.numel() != n_samples:
            raise ValueError(
                f"the mask has {mask.numel()} entries but the logits have {n_samples} "
                "sample positions (logits.shape[:-1])"
            )
        return mask.to(device)

    def position_mask(self, inputs) -> torch.Tensor | None:
        """The flat bool mask of ``inputs`` (True: counted), or None without a mask."""
        if self.mask_fn is not None:
            keep = keep_mask(self.mask_fn(inputs))
        elif self.ignore_index is not None:
            targets = self.targets_fn(inputs) if self.targets_fn is not None else labels_of(inputs)
            if targets is None:
                raise ValueError(
                    "ignore_index needs targets_fn (or dict inputs with 'labels', or a "
                    "ghoststep.Call with a 'labels' keyword argument or targets)"
                )
            keep = keep_mask(targets=targets, ignore_index=self.ignore_index)
        else:
            return None
        return keep.reshape(-1)

    def check_rows(self, inputs) -> None:
        """Refuse ``subset`` / ``buffer_size`` for inputs whose rows cannot be selected."""
        if self.subset is not None:
            check_row_slicing(inputs, "subset")
        if self.buffer_size > 0:
            check_row_slicing(inputs, "buffer_size")


def bottleneck_rows(evaluated, spread: torch.Tensor, keep, size: int):
    """The inputs of the ``size`` rows of ``evaluated`` with the largest spread (masked
    positions excluded), in batch order, detached; None if rows cannot be told apart."""
    rows = batch_rows(evaluated)
    if rows is None or spread.numel() % rows:
        return None
    scores = spread if keep is None else spread.masked_fill(~keep, -math.inf)
    per_row = scores.reshape(rows, -1).amax(1)
    top = per_row.topk(min(size, rows)).indices.sort().values
    return detached_copy(select_rows(evaluated, top, rows))


@dataclass(frozen=True)
class Plan:
    """What one micro-batch's measurement evaluates (immutable): the inputs
    (``evaluated``, split into ``call`` = (args, kwargs)), the RNG state of its training
    forward, its autocast state, and the logits at the old parameters when known
    (``baseline``; or only for the first rows, ``head``, with the inputs of the rest in
    ``tail``); the modules' train / eval flags of the training forward (``flags``,
    replayed) and the fingerprint of its logits when the plan evaluates exactly its rows
    (``fingerprint``, (..., 4), checked against the replay); whether its logits had a
    masked (``-inf``) class (``masked``; None: unknown, e.g. with buffer rows, so each
    reading checks). The controller keeps what it computes from a plan (spreads,
    completed baselines) in its own structures."""

    evaluated: Any
    call: tuple[tuple, dict]
    rng: Any
    baseline: torch.Tensor | None
    autocast: Any = ()  # the training forward's (``isolation.autocast_state``)
    head: torch.Tensor | None = None
    tail: Any = None
    flags: tuple[bool, ...] | None = None
    fingerprint: torch.Tensor | None = None
    masked: bool | None = None


def make_plan(entry, sampling: Sampling, generator: torch.Generator, buffer):
    """The rows to evaluate for one captured micro-batch (subset and buffer applied).

    Returns ``(plan, buffer)``: the buffer is None when its rows no longer match the
    batch's per-row shapes (dropped). The training forward's logits serve as the
    baseline for exactly its rows (same precision and RNG state: dropout masks are drawn
    per row), and for a subset of them only if each row's logits depend on that row
    alone (``entry.rows_independent``).
    """
    current = entry.inputs
    rows = batch_rows(current)
    logits = entry.logits
    if (
        entry.coarse
        or logits is None
        or logits.dtype not in (torch.float32, torch.float64)
        or logits.ndim < 2
        or logits.shape[0] != rows
    ):
        logits = None
    known, fingerprint = logits, entry.fingerprint
    if sampling.subset is not None and rows is not None and sampling.subset < rows:
        idx = torch.randperm(rows, generator=generator)[: sampling.subset]
        current = select_rows(current, idx, rows)
        known = logits[idx.to(logits.device)] if logits is not None else None
        fingerprint = None
        if not entry.rows_independent:
            known = None
    evaluated, tail = current, None
    if buffer is not None:
        joined = cat_rows(current, buffer, batch_rows(current), batch_rows(buffer))
        if joined is None:
            buffer = None  # shapes changed: drop the stale buffer
        else:
            evaluated, tail = joined, buffer  # the buffer's rows need a baseline forward
            fingerprint = None
            if not entry.rows_independent:
                known = None
    head = known if tail is not None else None
    plan = Plan(
        evaluated,
        split_inputs(evaluated),
        entry.rng,
        None if tail is not None else known,
        entry.autocast,
        head,
        tail if head is not None else None,
        None if entry.recorded is None else entry.recorded.flags,
        fingerprint,
        entry.masked if tail is None else None,
    )
    return plan, buffer


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


# ---------------------------------------------------------- always-on: when to measure


@dataclass(frozen=True)
class Reference:
    """The last measured step, which the always-on steps between measurements use:
    its limiting radius (per unit of v) and tau, the steps taken since, and whether its
    radius was under half the one measured before it (``unsteady``: measure again)."""

    radius: float
    tau: float
    since: int = 0
    unsteady: bool = False


def measure_now(
    reference: Reference | None, tau: float, every: int, jump: float, room: float
) -> bool:
    """Whether a step of length ``tau`` is measured (``Measuring.every``): always for
    ``every`` = 1; else without a reference, after ``every`` - 1 steps without a
    measurement, while unsteady, when tau exceeds ``jump`` times the reference's, or
    when the step would not fit ``room`` times the reference's radius (it may need
    clipping: ``room`` = target_r (1 - stale_margin))."""
    return (
        every == 1
        or reference is None
        or reference.unsteady
        or reference.since + 1 >= every
        or tau > jump * reference.tau
        or tau > room * reference.radius
    )


def reference_after(reference: Reference | None, radius: float, tau: float) -> Reference:
    """The reference after a measured step of length ``tau`` that used ``radius``."""
    unsteady = reference is not None and radius < 0.5 * reference.radius
    return Reference(radius, tau, 0, unsteady)
