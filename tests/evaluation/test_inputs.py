"""Unit tests for ghoststep.evaluation._inputs: splitting inputs into the forward's arguments,
chunking along the batch, and the BatchNorm rule for chunking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ghoststep.evaluation._inputs import (
    Call,
    batch_coupled,
    batch_size,
    check_chunking,
    chunks,
    split_inputs,
)


def test_split_inputs_by_kind():
    x, m = torch.randn(3, 2), torch.ones(3)
    assert split_inputs(x)[0][0] is x and split_inputs(x)[1] == {}
    args, kwargs = split_inputs((x, None, 2, 0.5, "mean", True))
    assert args[0] is x and args[1:] == (None, 2, 0.5, "mean", True) and kwargs == {}
    assert split_inputs([x, m])[0] == (x, m)
    args, kwargs = split_inputs({"input_ids": x, 3: m})
    assert args == () and kwargs.keys() == {"input_ids", "3"} and kwargs["3"] is m


def test_split_inputs_refuses_other_kinds_naming_the_entry():
    with pytest.raises(TypeError, match=r"inputs\[1\] is a ndarray"):
        split_inputs((torch.ones(1), np.ones(1)))
    with pytest.raises(TypeError, match=r"inputs\['mask'\] is a list"):
        split_inputs({"mask": [1, 0]})
    with pytest.raises(TypeError, match="got int"):
        split_inputs(3)


def test_batch_size():
    assert batch_size((torch.ones(4, 2), torch.tensor(1.0), 3), {"m": torch.ones(4)}) == 4
    assert batch_size(((torch.tensor(2.0), [torch.ones(5, 1)]),), {"m": torch.ones(3)}) == 5
    with pytest.raises(ValueError, match="at least one tensor"):
        batch_size((torch.tensor(1.0), 2), {})


def test_chunks_cover_the_batch_and_pass_the_rest_through():
    x, m, t = torch.randn(7, 2), torch.arange(7), torch.tensor(0.5)
    pieces = list(chunks((x, t, "s"), {"m": m}, 3))
    assert [(s, e) for s, e, _, _ in pieces] == [(0, 3), (3, 6), (6, 7)]
    for s, e, args, kwargs in pieces:
        assert torch.equal(args[0], x[s:e]) and torch.equal(kwargs["m"], m[s:e])
        assert args[1] is t and args[2] == "s"
    assert torch.equal(torch.cat([a[0] for _, _, a, _ in pieces]), x)
    ((s, e, args, kwargs),) = list(chunks((x,), {"m": m}, None))
    assert (s, e) == (0, None) and args[0] is x and kwargs["m"] is m
    assert len(list(chunks((x,), {}, 100))) == 1

    # nested tensors of the batch size are sliced; other tensors and values pass whole
    w, lengths = torch.randn(3), [1, 2, 3, 4, 5, 6, 7]
    pieces = list(chunks(({"x": (x, [m])}, lengths), {"w": w}, 4))
    assert [a[0]["x"][1][0].tolist() for _, _, a, _ in pieces] == [[0, 1, 2, 3], [4, 5, 6]]
    assert all(a[1] == lengths and k["w"] is w for _, _, a, k in pieces)


def test_packed_sequences_are_one_argument_and_refuse_chunking():
    from torch.nn.utils.rnn import pack_sequence

    packed = pack_sequence([torch.ones(3, 2), torch.ones(2, 2)])
    assert split_inputs(packed) == ((packed,), {})
    with pytest.raises(ValueError, match="PackedSequence cannot be row-sliced"):
        list(chunks((packed,), {}, 1))


def test_a_call_is_split_exactly():
    x, m = torch.randn(3, 2), torch.ones(3)
    args, kwargs = split_inputs(Call({"x": x}, [3, 1], mask=m))
    assert args[0]["x"] is x and args[1] == [3, 1] and kwargs == {"mask": m}
    assert "Call" in repr(Call(x, mask=m))


@pytest.mark.parametrize("size", [0, -1, 2.0, True])
def test_chunks_refuse_bad_sizes(size):
    with pytest.raises(ValueError, match="chunk_size"):
        list(chunks((torch.ones(3),), {}, size))


def test_batch_coupled_and_check_chunking():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    args = (torch.randn(6, 2),)
    assert batch_coupled(model) == ["1"]
    assert batch_coupled(nn.BatchNorm1d(3)) == ["BatchNorm1d"]  # the root: its type
    with pytest.raises(ValueError, match="'1' uses batch statistics"):
        check_chunking(model, args, {}, 4)
    check_chunking(model, args, {}, 6)  # one chunk: the batch is not split
    check_chunking(model, args, {}, None)
    model.eval()  # running statistics: rows independent
    assert batch_coupled(model) == []
    check_chunking(model, args, {}, 2)
    model[1].track_running_stats = False  # eval without running stats: batch statistics
    assert batch_coupled(model) == ["1"]
    assert batch_coupled(nn.Linear(2, 2)) == []
