"""Unit tests for ghoststep.evaluation._masks: the mask of the logit positions that count."""

from __future__ import annotations

import pytest
import torch

from ghoststep.evaluation._masks import keep_mask
from ghoststep.measurement._slopes import sample_mask


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
