"""Unit tests for ghoststep.controller._capture: which forwards are captured (train mode with
gradients only), micro-batches, the replay of a forward call as inputs, nested calls, the
kept logits and the RNG state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ghoststep.controller._capture import Captured, ForwardCapture, replay
from ghoststep.evaluation import Call


def _capture(model, micro_batches="last", **kwargs) -> ForwardCapture:
    options = dict(logits_fn=lambda out: out, keep_logits=True, rows_check=True, devices=[])
    options.update(kwargs)
    return ForwardCapture(model, micro_batches=micro_batches, **options)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, mask=None, *, scale=1.0, **extra):
        out = self.lin(x) * scale
        return out if mask is None else out * mask[:, None]


def test_only_forwards_that_can_make_the_gradient_are_captured():
    model = nn.Linear(3, 2)
    cap = _capture(model)
    x = torch.randn(4, 3)
    with torch.no_grad():
        model(x)
    with torch.inference_mode():
        model(x)
    model.eval()
    model(x)
    model.train()
    with cap.measuring():
        model(x)
    assert cap.take() == []
    model(x)
    (entry,) = cap.take()
    assert entry.inputs is x
    assert cap.take() == []  # take() forgets


def test_a_no_grad_forward_after_the_training_forward_keeps_the_batch():
    model = nn.Linear(3, 2)
    cap = _capture(model)
    x, metrics = torch.randn(4, 3), torch.randn(4, 3)
    model(x)
    with torch.no_grad():
        model(metrics)
    (entry,) = cap.take()
    assert entry.inputs is x


@pytest.mark.parametrize("micro_batches, kept", [("last", [2]), ("all", [0, 1, 2])])
def test_micro_batches(micro_batches, kept):
    model = nn.Linear(3, 2)
    cap = _capture(model, micro_batches)
    xs = [torch.randn(2, 3) for _ in range(3)]
    for x in xs:
        model(x)
    assert [e.inputs for e in cap.take()] == [xs[i] for i in kept]


def test_removed_hooks_capture_nothing():
    model = nn.Linear(3, 2)
    cap = _capture(model)
    cap.remove()
    model(torch.randn(2, 3))
    assert cap.take() == [] and not model._forward_pre_hooks


def test_logits_rng_and_rows_independence():
    model = nn.Linear(3, 2)
    cap = _capture(model)
    x = torch.randn(4, 3)
    state = torch.get_rng_state()
    out = model(x)
    (entry,) = cap.take()
    assert torch.equal(entry.logits, out.detach()) and not entry.logits.requires_grad
    assert torch.equal(entry.rng[0], state) and entry.rng[1] == {}
    assert entry.rows_independent and not entry.coarse and entry.autocast == ()


@pytest.mark.parametrize("layer", [nn.Dropout(0.5), nn.BatchNorm1d(2)])
def test_rows_are_dependent_with_dropout_or_batch_statistics(layer):
    model = nn.Sequential(nn.Linear(3, 2), layer)
    cap = _capture(model)
    model(torch.randn(4, 3))
    (entry,) = cap.take()
    assert entry.logits is not None and not entry.rows_independent


def test_logits_not_kept_when_not_asked_or_not_readable():
    model = nn.Linear(3, 2)
    cap = _capture(model, keep_logits=False)
    model(torch.randn(2, 3))
    assert cap.take()[0].logits is None
    cap.remove()
    cap = _capture(model, logits_fn=lambda out: out.logits)  # AttributeError: a tensor
    model(torch.randn(2, 3))
    assert cap.take()[0].logits is None


def test_autocast_forwards_are_coarse():
    model = nn.Linear(3, 2)
    cap = _capture(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3))
    (entry,) = cap.take()
    assert entry.coarse and entry.autocast == (("cpu", torch.bfloat16),)


def test_replay_of_mixed_positional_and_keyword_calls():
    model = Mixed()
    cap = _capture(model, "all")
    x, m, t = torch.randn(2, 3), torch.ones(2), torch.zeros(1)
    model(x)
    model(x, m)
    model(x=x, mask=m)
    model(x, mask=m, scale=2.0, other=t)
    single, pair, named, mixed = (e.inputs for e in cap.take())
    assert single is x
    assert isinstance(pair, tuple) and pair[0] is x and pair[1] is m
    assert named == {"x": x, "mask": m}
    assert mixed.keys() == {"x", "mask", "scale", "other"}
    assert mixed["x"] is x and mixed["scale"] == 2.0 and mixed["other"] is t


def test_replay_keeps_calls_keywords_cannot_name_exactly():
    class Star(nn.Module):
        def forward(self, *xs, scale=1.0):
            return xs[0] * scale

    a, b = torch.ones(1), torch.ones(1)
    star = replay(Star(), Captured((a, b), {"scale": 2.0}, None, False))
    assert isinstance(star, Call) and star.args[0] is a and star.args[1] is b
    assert star.kwargs == {"scale": 2.0}
    unbound = replay(nn.Linear(1, 1), Captured((a,), {"nope": 1}, None, False))
    assert isinstance(unbound, Call) and unbound.kwargs == {"nope": 1}


def test_replay_of_non_tensor_arguments_is_the_exact_call():
    x, m = torch.randn(2, 3), torch.ones(2)
    one_dict = replay(nn.Linear(3, 2), Captured(({"x": x, "mask": m},), {}, None, False))
    assert isinstance(one_dict, Call) and one_dict.args[0]["x"] is x and one_dict.kwargs == {}
    lengths = replay(nn.Linear(3, 2), Captured((x, [3, 1]), {}, None, False))
    assert isinstance(lengths, Call) and lengths.args[1] == [3, 1]
    entry = Captured((), {"input_ids": x}, None, False)
    entry.targets = m  # labels the loss used without passing them to the model
    carried = replay(nn.Linear(3, 2), entry)
    assert isinstance(carried, Call) and carried.targets is m and carried.kwargs["input_ids"] is x


def test_forwards_inside_targets_carry_them():
    model = nn.Linear(3, 2)
    cap = _capture(model, "all")
    labels = torch.tensor([1, 0])
    with cap.targets(labels):
        model(torch.randn(2, 3))
    model(torch.randn(2, 3))
    inside, outside = (e.inputs for e in cap.take())
    assert isinstance(inside, Call) and inside.targets is labels
    assert isinstance(outside, torch.Tensor)


def test_a_nested_call_of_the_model_is_the_one_captured():
    class Routed(nn.Module):
        """Lightning-like: the outer call gets (batch, index) and calls self(x)."""

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x, index=None):
            if isinstance(x, tuple):
                return self(x[0]).sum()  # a loss, not the logits
            return self.lin(x)

    model = Routed()
    cap = _capture(model)
    x = torch.randn(4, 3)
    model((x, torch.zeros(4)), 0)
    (entry,) = cap.take()
    assert entry.inputs is x
    torch.testing.assert_close(entry.logits, model.lin(x).detach())


def test_a_deep_copy_of_the_model_does_not_feed_the_original():
    model = nn.Linear(3, 2)
    cap = _capture(model)
    twin = copy.deepcopy(model)
    twin(torch.randn(2, 3))
    assert cap.take() == []
    x = torch.randn(2, 3)
    model(x)
    assert cap.take()[0].inputs is x


def test_explicit_inputs():
    entry = Captured.explicit({"a": 1})
    assert entry.inputs == {"a": 1} and entry.rng is None and entry.logits is None
    assert not entry.coarse and entry.autocast == ()
