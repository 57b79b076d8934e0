"""Unit tests for ghoststep.evaluation._isolation: the RNG captured and replayed, buffers left
bitwise, and autocast read and imposed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ghoststep.evaluation._isolation import (
    autocast_as,
    autocast_state,
    capture_rng,
    cuda_devices,
    preserved_buffers,
    replay_rng,
)


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
