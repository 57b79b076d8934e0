"""Unit tests for ghoststep.evaluation._replay: a recorded call (its arguments, chunks
along the batch and the BatchNorm rule for chunking, its rows), and running it again
without side effects (the RNG captured and replayed, buffers left bitwise, autocast read
and imposed)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from ghoststep.evaluation._replay import (
    Call,
    autocast_as,
    autocast_state,
    batch_coupled,
    batch_rows,
    batch_size,
    capture_rng,
    cat_rows,
    check_chunking,
    chunks,
    cuda_devices,
    detached_copy,
    preserved_buffers,
    replay_rng,
    select_rows,
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


def test_replay_rng_draws_the_captured_stream_and_leaves_the_outer_one():
    torch.manual_seed(0)
    state = capture_rng()
    first = torch.rand(5)  # the "training forward"
    with replay_rng([], state):
        again = torch.rand(5)
    after = torch.rand(5)
    assert torch.equal(again, first)  # the same numbers (dropout masks)
    torch.manual_seed(0)
    torch.rand(5)
    assert torch.equal(after, torch.rand(5))  # as if the block had not run


def test_replay_rng_without_a_state_restores_the_stream():
    torch.manual_seed(1)
    with replay_rng([]):
        torch.rand(100)
    inside_skipped = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(inside_skipped, torch.rand(3))


def test_capture_rng_is_a_copy():
    state = capture_rng()
    assert state[1] == {} and torch.equal(state[0], torch.get_rng_state())
    torch.rand(3)
    assert not torch.equal(state[0], torch.get_rng_state())


class Counting(nn.Module):
    """BatchNorm in train and eval mode, and a buffer the forward writes itself."""

    def __init__(self):
        super().__init__()
        self.bn_train = nn.BatchNorm1d(4)
        self.lin = nn.Linear(4, 4)
        self.bn_eval = nn.BatchNorm1d(4).eval()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("last", torch.zeros(4))

    def forward(self, x):
        self.calls += 1
        self.last.copy_(x.mean(0))
        return self.bn_eval(self.lin(self.bn_train(x)))


def _buffers(model):
    return {n: b.clone() for n, b in model.named_buffers()}


def _prepared():
    torch.manual_seed(0)
    model = Counting()
    with torch.no_grad():
        model(torch.randn(8, 4))  # non-trivial running statistics
        model.bn_eval.running_mean.normal_()
    return model


def test_preserved_buffers_leaves_every_buffer_bitwise():
    model = _prepared()
    before = _buffers(model)
    reference = copy.deepcopy(model)
    x = torch.randn(8, 4)
    with preserved_buffers(model):
        assert not model.bn_train.track_running_stats  # no write to the running stats
        out = model(x)
    after = _buffers(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], before[n]) for n in before), [
        n for n in before if not torch.equal(after[n], before[n])
    ]
    assert model.bn_train.track_running_stats
    # the normalization inside is the training forward's (batch statistics)
    torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
    assert not torch.equal(reference.calls, model.calls)  # the reference did count


def test_preserved_buffers_restores_after_an_error():
    model = _prepared()
    before = _buffers(model)
    with pytest.raises(RuntimeError, match="boom"), preserved_buffers(model):
        model(torch.randn(8, 4))
        raise RuntimeError("boom")
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    assert model.bn_train.track_running_stats


def test_autocast_state_and_autocast_as():
    a, b = torch.randn(3, 3), torch.randn(3, 3)
    assert autocast_state() == ()
    bf16 = (("cpu", torch.bfloat16),)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_state() == bf16
        with autocast_as(()):  # none, whatever surrounds it
            assert autocast_state() == () and (a @ b).dtype == torch.float32
        assert autocast_state() == bf16 and (a @ b).dtype == torch.bfloat16
    with autocast_as(bf16):
        assert autocast_state() == bf16 and (a @ b).dtype == torch.bfloat16
    assert autocast_state() == () and (a @ b).dtype == torch.float32


def test_cuda_devices_of_a_cpu_model():
    assert cuda_devices(nn.Linear(2, 2)) == []
