"""Unit tests for ghoststep.evaluation._rows: the row operations on nested inputs and the
mask of the positions that count."""

from __future__ import annotations

import pytest
import torch

from ghoststep.evaluation._rows import (
    batch_rows,
    cat_rows,
    detached_copy,
    keep_mask,
    select_rows,
)
from ghoststep.measurement._slopes import sample_mask


def test_batch_rows_and_detached_copy():
    x = torch.randn(4, 3, requires_grad=True)
    assert batch_rows((torch.tensor(2.0), {"x": x})) == 4
    assert batch_rows((torch.tensor(2.0), 3, "s")) is None
    copied = detached_copy({"x": x, "k": 3})
    assert copied["k"] == 3 and not copied["x"].requires_grad
    assert torch.equal(copied["x"], x.detach())
    assert copied["x"].data_ptr() != x.data_ptr()


def test_select_rows_picks_only_tensors_with_the_batch_size():
    x = torch.arange(12.0).reshape(4, 3)
    other = torch.arange(2.0)  # leading size 2: not a batch tensor
    scalar = torch.tensor(7.0)
    idx = torch.tensor([3, 1])
    out = select_rows((x, {"m": x[:, 0] > 3, "o": other, "s": scalar}, 5, "t"), idx, 4)
    assert torch.equal(out[0], x[[3, 1]])
    assert torch.equal(out[1]["m"], torch.tensor([True, False]))
    assert out[1]["o"] is other and out[1]["s"] is scalar
    assert out[2:] == (5, "t")


def test_cat_rows_concatenates_matching_structures_and_refuses_the_rest():
    a = {"x": torch.randn(3, 2), "t": torch.tensor(1.0), "k": 1}
    b = {"x": torch.randn(2, 2), "t": torch.tensor(9.0), "k": 2}
    out = cat_rows(a, b, 3, 2)
    assert torch.equal(out["x"], torch.cat([a["x"], b["x"]]))
    assert out["t"] is a["t"] and out["k"] == 1  # other leaves from a
    assert cat_rows(a, b, 3, None) is None
    assert cat_rows(a, {"y": b["x"], "t": b["t"], "k": 2}, 3, 2) is None  # structure
    assert cat_rows(a, dict(b, x=torch.randn(2, 5)), 3, 2) is None  # per-row shape
    assert cat_rows(a, dict(b, x=torch.randn(2, 2).double()), 3, 2) is None  # dtype


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
