"""Forward calls of any structure are replayed exactly as made: one dict argument, a
tuple argument, a ``PackedSequence``, a list of lengths, nested containers, and
``step(inputs=ghoststep.Call(...))``. Each run re-measures the applied update
independently in float64 at the old parameters on the very call that fed the gradient
(``realised_r`` with an ``Exact`` call) and checks that the clip bound was met, that it
bound, and that the parameters moved."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import Exact, applied_update, realised_r, trainable_state
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import ghoststep
from ghoststep import RadiusController

B, T, D, K = 12, 6, 5, 4
TOLERANCE = 1.001  # float32 parameters, float64 re-measurement


def _features(seed: int) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


def _labels(seed: int) -> torch.Tensor:
    return torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(100 + seed))


def _lengths(seed: int) -> list[int]:
    g = torch.Generator().manual_seed(200 + seed)
    return [int(v) for v in torch.randint(1, T + 1, (B,), generator=g)]


class DictModel(nn.Module):
    """``model({"x": (B, T, D), "mask": (B, T)})``: masked mean, MLP head."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(D, 16), nn.Linear(16, K)

    def forward(self, batch: dict) -> torch.Tensor:
        m = batch["mask"].unsqueeze(-1)
        h = (torch.tanh(self.body(batch["x"])) * m).sum(1) / m.sum(1).clamp_min(1)
        return self.head(h)


class PairModel(nn.Module):
    """``model((x1, x2))``: one tuple argument of two (B, T, D) tensors."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(D, 16), nn.Linear(D, 16), nn.Linear(16, K)

    def forward(self, pair: tuple) -> torch.Tensor:
        x1, x2 = pair
        return self.head(torch.tanh(self.a(x1).mean(1) + self.b(x2).mean(1)))


class PackedGRU(nn.Module):
    """RNN classifier on a ``PackedSequence``: the GRU's last hidden state, linear head."""

    def __init__(self):
        super().__init__()
        self.gru, self.head = nn.GRU(D, 12, batch_first=True), nn.Linear(12, K)

    def forward(self, packed: PackedSequence) -> torch.Tensor:
        _, h = self.gru(packed)
        return self.head(h[-1])


class LengthsModel(nn.Module):
    """``model(x, [3, 5, 2, ...])``: mean over the first lengths[i] positions of row i."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(D, 16), nn.Linear(16, K)

    def forward(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        return self.head(torch.stack([h[i, :n].mean(0) for i, n in enumerate(lengths)]))


class NestedModel(nn.Module):
    """``model({"feats": (x1, [x2]), "meta": {"scale": 0.5}}, extra=[bias, "mean"])``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(D, 16), nn.Linear(D, 16), nn.Linear(16, K)

    def forward(self, inputs: dict, extra: list) -> torch.Tensor:
        x1, (x2,) = inputs["feats"]
        bias, how = extra
        assert how == "mean"
        h = self.a(x1).mean(1) + inputs["meta"]["scale"] * self.b(x2).mean(1) + bias
        return self.head(torch.tanh(h))


def _packed(seed: int) -> PackedSequence:
    return pack_padded_sequence(
        _features(seed), _lengths(seed), batch_first=True, enforce_sorted=False
    )


CALLS = {
    "one_dict": (
        DictModel,
        lambda i: (({"x": _features(i), "mask": (torch.rand(B, T) > 0.3).float()},), {}),
    ),
    "tuple_argument": (PairModel, lambda i: (((_features(i), _features(50 + i)),), {})),
    "packed_sequence": (PackedGRU, lambda i: ((_packed(i),), {})),
    "list_of_lengths": (LengthsModel, lambda i: ((_features(i), _lengths(i)), {})),
    "nested_containers": (
        NestedModel,
        lambda i: (
            ({"feats": (_features(i), [_features(50 + i)]), "meta": {"scale": 0.5}},),
            {"extra": [torch.full((16,), 0.1), "mean"]},
        ),
    ),
}

# torch.func.jvp cannot run a GRU on a PackedSequence (its packed kernel reads the data
# pointer of the dual tensors): re-measured by a float64 central difference instead.
REMEASURE = {"packed_sequence": "central"}


def _train(name: str, *, explicit: bool = False, steps: int = 4, **options):
    """Adam at lr 1 (far above the radius) under clip r* = 1: the worst realised r, the
    number of steps the clip bound, and how far the parameters moved."""
    build, make_call = CALLS[name]
    torch.manual_seed(0)
    model = build()
    opt = RadiusController(
        torch.optim.Adam(model.parameters(), lr=1.0), model, mode="clip", target_r=1.0, **options
    )
    start = trainable_state(model)
    worst, bound = 0.0, 0
    for i in range(steps):
        args, kwargs = make_call(i)
        old = trainable_state(model)
        opt.zero_grad()
        F.cross_entropy(model(*args, **kwargs), _labels(i)).backward()
        opt.step(inputs=ghoststep.Call(*args, **kwargs) if explicit else None)
        applied = applied_update(old, trainable_state(model))
        call = Exact(args, kwargs)
        worst = max(worst, realised_r(model, old, call, applied, method=REMEASURE.get(name, "jvp")))
        bound += opt.last.scale < 1.0
    moved = max(float((trainable_state(model)[n] - p).abs().max()) for n, p in start.items())
    return worst, bound, moved


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_call_of_any_structure_is_replayed_exactly(name):
    worst, bound, moved = _train(name)
    print(f"{name}: max realised r {worst:.6f}, clip bound {bound} of 4 steps")
    assert worst <= TOLERANCE
    assert bound >= 1 and moved > 1e-3


@pytest.mark.parametrize("name", ["one_dict", "nested_containers", "packed_sequence"])
def test_step_inputs_takes_an_exact_call(name):
    worst, bound, moved = _train(name, explicit=True)
    print(f"step(inputs=Call) {name}: max realised r {worst:.6f}, clip bound {bound} of 4")
    assert worst <= TOLERANCE
    assert bound >= 1 and moved > 1e-3


def test_jvp_replays_the_exact_call():
    worst, bound, moved = _train("nested_containers", method="jvp")
    print(f"jvp nested_containers: max realised r {worst:.6f}, clip bound {bound} of 4")
    assert worst <= TOLERANCE
    assert bound >= 1 and moved > 1e-3


def test_row_operations_select_rows_of_nested_tensors():
    build, make_call = CALLS["nested_containers"]
    torch.manual_seed(0)
    model = build()

    def monitor(**option):
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        return RadiusController(sgd, model, mode="monitor", method="jvp", **option)

    before = trainable_state(model)
    args, kwargs = make_call(0)
    chunked = monitor(chunk_size=5)
    F.cross_entropy(model(*args, **kwargs), _labels(0)).backward()
    chunked.step()
    chunked.close()
    with torch.no_grad():  # back to the old parameters: the same update measured again
        for n, p in model.named_parameters():
            p.copy_(before[n])
    whole = monitor(buffer_size=3)
    model.zero_grad()
    F.cross_entropy(model(*args, **kwargs), _labels(0)).backward()
    whole.step()
    assert whole.last.rho_a == pytest.approx(chunked.last.rho_a, rel=1e-5)
    buffer = whole._buffer  # the 3 bottleneck rows, every nested batch tensor sliced
    assert isinstance(buffer, ghoststep.Call)
    x1, (x2,) = buffer.args[0]["feats"]
    assert x1.shape == x2.shape == (3, T, D) and buffer.args[0]["meta"] == {"scale": 0.5}
    assert buffer.kwargs["extra"][0].shape == (16,) and buffer.kwargs["extra"][1] == "mean"
    blob = io.BytesIO()
    torch.save(whole.state_dict(), blob)
    blob.seek(0)
    restored = monitor(buffer_size=3)
    restored.load_state_dict(torch.load(blob, weights_only=True))
    again = restored._buffer
    assert isinstance(again, ghoststep.Call) and torch.equal(again.args[0]["feats"][0], x1)
    assert again.kwargs["extra"][1] == "mean" and again.args[0]["meta"] == {"scale": 0.5}


@pytest.mark.parametrize("option", [{"subset": 4}, {"buffer_size": 2}, {"chunk_size": 4}])
def test_a_packed_sequence_refuses_row_operations_before_the_step(option):
    torch.manual_seed(0)
    model = PackedGRU()
    inner = torch.optim.Adam(model.parameters(), lr=1.0)
    opt = RadiusController(inner, model, **option)
    before = trainable_state(model)
    F.cross_entropy(model(_packed(0)), _labels(0)).backward()
    with pytest.raises(ValueError, match="PackedSequence cannot be row-sliced"):
        opt.step()
    assert not inner.state  # refused before the inner optimizer stepped
    assert all(torch.equal(p, before[n]) for n, p in trainable_state(model).items())


def test_step_inputs_refuses_an_ambiguous_tuple_naming_call_before_the_step():
    torch.manual_seed(0)
    model = LengthsModel()
    inner = torch.optim.Adam(model.parameters(), lr=1.0)
    opt = RadiusController(inner, model)
    x, lengths = _features(0), _lengths(0)
    F.cross_entropy(model(x, lengths), _labels(0)).backward()
    with pytest.raises(TypeError, match=r"inputs\[1\] is a list.*ghoststep.Call"):
        opt.step(inputs=(x, lengths))
    assert not inner.state  # refused before the inner optimizer stepped
    opt.step(inputs=ghoststep.Call(x, lengths))
    assert opt.last.scale < 1.0 and inner.state
