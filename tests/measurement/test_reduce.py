"""Unit tests for ghoststep.measurement._reduce (the one reduction from per-position
spreads to the batch's radius, used by ``measure()`` and the controller's meter) and the
one mask builder ``keep_mask``."""

from __future__ import annotations

import math

import pytest
import torch

from ghoststep.measurement._reduce import aggregate_spread, reduce_spreads
from ghoststep.measurement._slopes import keep_mask, sample_mask
from ghoststep.radius import aggregate, quantile_position, radius_from_spread


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


def test_keep_mask_from_a_mask_and_from_targets():
    assert keep_mask() is None
    assert keep_mask([1, 0, 2]).tolist() == [True, False, True]
    targets = torch.tensor([[3, -100], [-100, 1]])
    assert keep_mask(targets=targets, ignore_index=-100).tolist() == [[True, False], [False, True]]
    both = keep_mask(torch.tensor([[True, True], [False, True]]), targets, -100)
    assert both.tolist() == [[True, False], [False, True]]
    with pytest.raises(ValueError, match="needs targets"):
        keep_mask(ignore_index=-100)
    # measure()'s checked form: the sample shape is enforced, then the same builder
    with pytest.raises(ValueError, match="sample shape"):
        sample_mask((2, 3), "cpu", torch.ones(2, 2, dtype=torch.bool))
    assert torch.equal(
        sample_mask((2, 2), "cpu", None, targets, -100), keep_mask(None, targets, -100)
    )
