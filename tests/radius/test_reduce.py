"""Unit tests for ``reduce_spreads`` (``ghoststep.radius._bounds``): per-position spreads
to the batch's radius, used by ``measure()`` and the controller, and the quantile convention
of ``aggregate_spread``."""

from __future__ import annotations

import math

import pytest
import torch

from ghoststep.radius import aggregate, quantile_position, radius_from_spread
from ghoststep.radius._bounds import aggregate_spread, reduce_spreads


def test_single_part_max_radius_and_bottleneck():
    spread = torch.tensor([0.5, 3.0, 1.0, 2.0], dtype=torch.float64)
    found = reduce_spreads([spread], [None], temperature=2.0)
    assert found.spread == 3.0 and found.bottleneck == 1
    assert found.rho_a == 2.0 * math.pi / 3.0
    assert found.counted and found.count == 4 and found.finite and found.finite_here
    assert torch.equal(found.kept[0], spread)


def test_mask_excludes_positions_from_every_statistic():
    spread = torch.tensor([0.5, 3.0, 1.0, 2.0], dtype=torch.float64)
    keep = torch.tensor([True, False, True, True])
    found = reduce_spreads([spread], [keep])
    assert found.spread == 2.0 and found.bottleneck == 3 and found.count == 3
    assert found.kept[0].tolist() == [0.5, 1.0, 2.0]


def test_parts_take_the_largest_and_offset_the_bottleneck():
    a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    b = torch.tensor([0.5, 4.0, 3.0], dtype=torch.float64)
    found = reduce_spreads([a, b], [None, None])
    assert found.spread == 4.0 and found.bottleneck == 3 and found.count == 5
    # a part with nothing counted takes no part in the max
    found = reduce_spreads([a, b], [None, torch.zeros(3, dtype=torch.bool)])
    assert found.spread == 2.0 and found.bottleneck == 1 and found.count == 2


def test_nothing_counted_and_non_finite():
    spread = torch.tensor([1.0, 2.0], dtype=torch.float64)
    found = reduce_spreads([spread], [torch.zeros(2, dtype=torch.bool)])
    assert not found.counted and found.spread == 0.0 and found.bottleneck == -1
    assert found.rho_a == math.inf and found.count == 0
    found = reduce_spreads([torch.tensor([1.0, math.inf], dtype=torch.float64)], [None])
    assert not found.finite and not found.finite_here


@pytest.mark.parametrize("q", [0.1, 0.5, 0.9, 1.0])
def test_one_quantile_convention(q):
    """q is a quantile of the spread: the reduction, the controller's aggregate and
    ``radius.aggregate`` of the radii pick the same sample."""
    g = torch.Generator().manual_seed(int(10 * q))
    spread = torch.rand(23, generator=g, dtype=torch.float64) + 0.1
    found = reduce_spreads([spread], [None], quantile=q)
    ordered = spread.sort(descending=True).values
    assert found.spread == float(ordered[quantile_position(23, q)])
    assert found.spread == float(aggregate_spread(spread, q))
    rho = aggregate(radius_from_spread(spread), ("quantile", q))
    assert found.rho_a == pytest.approx(float(rho), rel=1e-15)
    assert found.bottleneck == int(spread.argmax())  # the largest, whatever q


# ----------------------------------------------------------- the quantile convention


def test_aggregate_max_and_empty():
    spread = torch.tensor([0.5, 3.0, 1.0], dtype=torch.float64)
    assert aggregate_spread(spread).item() == 3.0
    empty = aggregate_spread(spread[:0], 0.5)
    assert empty.shape == () and empty.item() == 0.0


@pytest.mark.parametrize("n", [1, 5, 9, 17])
@pytest.mark.parametrize("q", [0.25, 0.5, 0.75, 1.0])
def test_aggregate_is_the_upper_quantile_order_statistic(n, q):
    # q (n - 1) is an exact integer here: no rounding question, the q-quantile with
    # interpolation "higher" is the closed form of the upper order statistic.
    g = torch.Generator().manual_seed(n)
    spread = torch.randperm(n, generator=g).double()
    got = aggregate_spread(spread, q)
    assert got.item() == math.ceil(q * (n - 1))
    assert got.item() == torch.quantile(spread, q, interpolation="higher").item()


@pytest.mark.parametrize("q", [0.1, 0.3, 0.5, 0.9, 0.95, 0.99, 1.0])
@pytest.mark.parametrize("n", [2, 7, 11, 64, 101])
def test_aggregate_matches_the_radius_aggregate_of_the_same_q(q, n):
    """One quantile convention: the controller's spread quantile q sets the radius that
    ``radius.aggregate(rho, ("quantile", q))`` picks (rho = pi / spread)."""
    g = torch.Generator().manual_seed(1000 * n + int(100 * q))
    spread = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    from_spread = radius_from_spread(aggregate_spread(spread, q))
    from_radii = aggregate(radius_from_spread(spread), ("quantile", q))
    assert from_spread.item() == from_radii.item()
