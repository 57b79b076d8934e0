"""Unit tests for ghoststep.controller._plan: the options record (validation, masks),
the bottleneck rows and make_plan."""

from __future__ import annotations

import pytest
import torch

from ghoststep.controller._capture import Captured
from ghoststep.controller._plan import Sampling, bottleneck_rows, make_plan
from ghoststep.evaluation._replay import split_inputs

# ------------------------------------------------------------------ options record


@pytest.mark.parametrize(
    "kwargs",
    [
        {"subset": 0},
        {"subset": 2.0},
        {"subset": True},
        {"buffer_size": -1},
        {"buffer_size": 1.5},
        {"window": 0},
        {"quantile": 0.0},
        {"quantile": 1.5},
        {"quantile": -0.1},
        {"quantile": float("nan")},
        {"mask_fn": lambda x: x, "ignore_index": -100},
    ],
    ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items() if k != "mask_fn"),
)
def test_invalid_options_are_refused(kwargs):
    with pytest.raises((ValueError, TypeError)):
        Sampling(**kwargs)


def test_quantile_is_stored_as_float_and_flags_follow_the_options():
    s = Sampling(quantile=1)
    assert s.quantile == 1.0 and type(s.quantile) is float
    assert not Sampling().samples_rows and not Sampling().masks
    assert Sampling(subset=3).samples_rows and Sampling(buffer_size=2).samples_rows
    assert not Sampling(window=4, quantile=0.5).samples_rows
    assert Sampling(ignore_index=-100).masks
    assert Sampling(mask_fn=lambda x: x > 0).masks


def test_position_mask_from_mask_fn_flattened():
    x = torch.tensor([[1.0, -1.0, 2.0], [0.0, 3.0, -4.0]])
    mask = Sampling(mask_fn=lambda inp: inp > 0).position_mask(x)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [True, False, True, False, True, False]


def test_position_mask_from_ignore_index_labels_or_targets_fn():
    labels = torch.tensor([[3, -100, 1], [-100, -100, 0]])
    expected = [True, False, True, False, False, True]
    inputs = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "labels": labels}
    assert Sampling(ignore_index=-100).position_mask(inputs).tolist() == expected
    by_fn = Sampling(ignore_index=0, targets_fn=lambda inp: inp[1])
    assert by_fn.position_mask((torch.zeros(2, 3), labels)).tolist() == [
        True,
        True,
        True,
        True,
        True,
        False,
    ]
    with pytest.raises(ValueError, match="targets_fn"):
        Sampling(ignore_index=-100).position_mask(torch.zeros(2, 3))


def test_mask_checks_the_number_of_positions():
    s = Sampling(mask_fn=lambda inp: inp[:, 0] > 0)
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [2.0, 0.0]])
    assert s.mask(x, 3, torch.device("cpu")).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="3 entries but the logits have 6"):
        s.mask(x, 6, torch.device("cpu"))
    assert Sampling().mask(x, 123, torch.device("cpu")) is None
    assert Sampling().position_mask(x) is None


# ------------------------------------------------------------------ the bottleneck rows


def test_bottleneck_rows_keeps_the_largest_spreads_in_batch_order():
    x = torch.arange(4.0).reshape(4, 1).repeat(1, 3).requires_grad_()
    # 4 rows x 3 positions; row maxima 1, 9, 5, 7 -- but row 1's 9 is masked out
    spread = torch.tensor([1.0, 0, 0, 9, 2, 0, 5, 0, 0, 0, 7, 0], dtype=torch.float64)
    keep = torch.ones(12, dtype=torch.bool)
    keep[3] = False
    top = bottleneck_rows((x, 3), spread, None, 2)
    assert top[1] == 3 and torch.equal(top[0], x.detach()[[1, 3]])  # batch order
    masked = bottleneck_rows((x, 3), spread, keep, 2)
    assert torch.equal(masked[0], x.detach()[[2, 3]])
    assert not masked[0].requires_grad
    assert torch.equal(bottleneck_rows(x, spread, None, 10), x.detach())  # size > rows
    assert bottleneck_rows(x, spread[:10], None, 2) is None  # 10 positions, 4 rows
    assert bottleneck_rows((3, "s"), spread, None, 2) is None  # no batch tensor


# ----------------------------------------------------------------------- make_plan


def _entry(inputs, logits, *, independent=True, coarse=False):
    entry = Captured((inputs,), {}, ("rng",), coarse, (("cpu", torch.bfloat16),))
    entry.inputs, entry.logits, entry.rows_independent = inputs, logits, independent
    return entry


def test_make_plan_whole_batch_uses_the_training_logits():
    x, logits = torch.randn(6, 4), torch.randn(6, 3)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    plan, buffer = make_plan(_entry(x, logits), Sampling(subset=6), g, None)
    assert buffer is None and plan.evaluated is x and plan.baseline is logits
    assert plan.call == split_inputs(x) and plan.rng == ("rng",)
    assert plan.autocast == (("cpu", torch.bfloat16),)
    assert plan.head is None and plan.tail is None
    assert torch.equal(g.get_state(), state)  # subset >= rows: nothing drawn


@pytest.mark.parametrize(
    "logits, coarse",
    [
        (torch.randn(6, 3).bfloat16(), False),  # 16-bit logits
        (torch.randn(6, 3), True),  # coarse forward (autocast / compiled)
        (torch.randn(5, 3), False),  # not one row per input row
        (torch.randn(6), False),  # no class axis
        (None, False),
    ],
)
def test_make_plan_baseline_only_from_usable_logits(logits, coarse):
    plan, _ = make_plan(
        _entry(torch.randn(6, 4), logits, coarse=coarse),
        Sampling(),
        torch.Generator(),
        None,
    )
    assert plan.baseline is None


@pytest.mark.parametrize("independent", [True, False])
def test_make_plan_subset_draws_rows_from_the_generator(independent):
    x, logits = torch.randn(10, 4), torch.randn(10, 3)
    plan, _ = make_plan(
        _entry(x, logits, independent=independent),
        Sampling(subset=4),
        torch.Generator().manual_seed(5),
        None,
    )
    idx = torch.randperm(10, generator=torch.Generator().manual_seed(5))[:4]
    assert torch.equal(plan.evaluated, x[idx])
    if independent:
        assert torch.equal(plan.baseline, logits[idx])
    else:
        assert plan.baseline is None


@pytest.mark.parametrize("independent", [True, False])
def test_make_plan_appends_the_buffer(independent):
    x, logits, buf = torch.randn(5, 4), torch.randn(5, 3), torch.randn(2, 4)
    plan, buffer = make_plan(
        _entry(x, logits, independent=independent), Sampling(buffer_size=2), None, buf
    )
    assert buffer is buf
    assert torch.equal(plan.evaluated, torch.cat([x, buf]))
    assert plan.baseline is None  # the buffer rows need a forward
    if independent:
        assert plan.head is logits and plan.tail is buf
    else:
        assert plan.head is None and plan.tail is None


def test_make_plan_drops_a_buffer_of_another_shape():
    x, logits = torch.randn(5, 4), torch.randn(5, 3)
    plan, buffer = make_plan(_entry(x, logits), Sampling(buffer_size=2), None, torch.randn(2, 7))
    assert buffer is None
    assert plan.evaluated is x and plan.baseline is logits
