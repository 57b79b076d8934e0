"""From per-position spreads to the batch's radius: the reduction shared by
:func:`~ghoststep.measurement.measure` and the controller.

Pure functions of tensors (no model): each part (one micro-batch, or the one batch of
``measure``) is summarised on its device -- the spread that sets its radius (the max,
or the q-quantile spread of :func:`ghoststep.radius.quantile_position`), whether every
counted spread is finite, its bottleneck (the largest counted spread) and how many
positions count -- then the parts are read with one host sync, and optionally reduced
over the ranks of ``torch.distributed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..evaluation._sharding import max_over_ranks
from ..radius._bounds import quantile_position, radius_from_spread

__all__ = ["Reduction", "aggregate_spread", "reduce_spreads"]


class Reduction(NamedTuple):
    """The batch's radius from its spreads.

    ``spread``: the spread that sets the radius (max, or the q-quantile, over the
    counted positions; the largest over the parts, and over the ranks with
    ``over_ranks``; 0.0 when nothing was counted); ``rho_a``: pi T / spread (a float);
    ``bottleneck``: flat index, over the parts in order, of the largest counted spread
    of the part that sets the radius (-1: none counted); ``counted``: some position
    was counted (on some rank); ``count``: the positions counted here; ``finite``:
    every counted spread finite (on every rank); ``finite_here``: on this rank;
    ``kept``: the counted spreads of each part."""

    spread: float
    rho_a: float
    bottleneck: int
    counted: bool
    count: int
    finite: bool
    finite_here: bool
    kept: list[torch.Tensor]


def aggregate_spread(spread: torch.Tensor, quantile: float | None = None) -> torch.Tensor:
    """The spread that sets the radius: the max, or the q-quantile spread (upper order
    statistic: :func:`~ghoststep.radius.quantile_position`); 0-d, no host sync; 0 for
    an empty tensor."""
    if spread.numel() == 0:
        return spread.new_zeros(())
    if quantile is None:
        return spread.max()
    ordered = spread.sort(descending=True).values
    return ordered[quantile_position(spread.numel(), quantile)]


def _summary(spread, keep, quantile, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(aggregate, finite, argmax + offset, count) of one part on its device, and the
    counted spreads."""
    valid = spread if keep is None else spread[keep]
    masked = spread if keep is None else spread.masked_fill(~keep, -math.inf)
    row = torch.stack(
        [
            aggregate_spread(valid, quantile),
            torch.isfinite(valid).all().double(),
            (masked.argmax().double() if spread.numel() else spread.new_zeros(())) + offset,
            spread.new_full((), float(valid.numel())),  # no host copy
        ]
    )
    return row, valid


def reduce_spreads(
    spreads: Sequence[torch.Tensor],
    keeps: Sequence[torch.Tensor | None],
    *,
    quantile: float | None = None,
    temperature: float = 1.0,
    over_ranks: bool = False,
    process_group=None,
) -> Reduction:
    """Reduce flat per-position spreads (one tensor per part, with its flat bool mask or
    None) to the batch's spread, radius and bottleneck: one host sync (and, with
    ``over_ranks``, one all-reduce of the spread as a MAX over the ranks, so that every
    rank decides alike). A part with no counted position takes no part in the max."""
    rows, kept, offset = [], [], 0
    for spread, keep in zip(spreads, keeps, strict=True):
        row, valid = _summary(spread, keep, quantile, offset)
        rows.append(row)
        kept.append(valid)
        offset += spread.numel()
    # no part at all (a rank with no batch to measure) counts nothing, and still reduces
    summary = torch.stack([r.to(rows[0].device) for r in rows]).tolist() if rows else []
    finite_here = all(row[1] == 1.0 for row in summary)
    # -1: no position counted here (every one masked)
    spread, bottleneck, count = -1.0, -1, 0
    for agg, _, index, n in summary:
        count += int(n)
        if n and (bottleneck < 0 or agg > spread):
            spread, bottleneck = agg, int(index)
    finite = finite_here
    if over_ranks:
        spread, finite = max_over_ranks(spread, finite, process_group)
    counted = spread >= 0.0
    spread = max(spread, 0.0)
    rho_a = radius_from_spread(spread, temperature)
    return Reduction(spread, rho_a, bottleneck, counted, count, finite, finite_here, kept)
