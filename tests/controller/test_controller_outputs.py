"""Outputs read as the loss reads them (class axis, sigmoid, several heads, masked
classes, large logits): the applied update re-measured independently in float64 at
the old parameters (``tests/helpers.realised_r``) stays inside the radius, training
moves, and the controller does not clip far below the bound."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ghoststep import RadiusController, measure
from ghoststep.evaluation import LogitsReader
from tests.helpers import applied_update, realised_r, trainable_state

BOUND = 1.001  # r re-measured in float64, float32 training


class Segmenter(nn.Module):
    """(B, 3, 6, 7) images -> (B, 5, 6, 7) per-pixel logits, classes on dim 1."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh())
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        return self.head(self.body(x))


class TwoHeads(nn.Module):
    """A trunk with two softmax heads, ``"logits"`` (10 classes) and ``"b"`` (4 classes,
    slopes ten times larger: it binds); as a dict or a tuple."""

    def __init__(self, as_tuple: bool = False):
        super().__init__()
        self.as_tuple = as_tuple
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.a, self.b = nn.Linear(16, 10), nn.Linear(16, 4)

    def forward(self, x):
        h = self.trunk(x)
        za, zb = self.a(h), 10.0 * self.b(h)
        return (za, zb) if self.as_tuple else {"logits": za, "b": zb}


class Masked(nn.Module):
    """Action logits with the illegal actions (x[:, :6] < 0) at -inf, plus a common
    shift of every logit that the softmax ignores (slopes far from 0 for every class,
    so a masked class's zero slope would widen the spread)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6))
        self.shift = nn.Linear(8, 1)

    def forward(self, x):
        z = self.net(x) + 5.0 * self.shift(x)
        return z.masked_fill(x[:, :6] < 0, float("-inf"))


class Offset(nn.Module):
    """An MLP whose logits carry a constant offset (float32 logits of magnitude ``offset``)."""

    def __init__(self, offset: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        self.offset = offset

    def forward(self, x):
        return self.net(x) + self.offset


def train(model, ctrl, batches, loss_fn, **measure):
    """Steps over ``batches`` ((x, y) pairs); returns the realised r and the scale s of
    each step, checking r <= BOUND at every step and that the parameters moved."""
    start = trainable_state(model)
    rs, scales = [], []
    for x, y in batches:
        old = trainable_state(model)
        ctrl.zero_grad()
        loss_fn(model(x), y).backward()
        ctrl.step()
        r = realised_r(model, old, x, applied_update(old, trainable_state(model)), **measure)
        rs.append(r)
        scales.append(ctrl.last.scale)
        assert r <= BOUND, (r, ctrl.last)
    moved = sum(float((start[n] - p).abs().sum()) for n, p in trainable_state(model).items())
    assert moved > 0 and ctrl.skipped_steps == 0  # training did not freeze
    assert min(scales) < 1.0  # the clip bound was asserted at least once
    print(f"max realised r {max(rs):.4f}")
    return rs, scales


def batches_of(make_x, make_y, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = make_x(g)
        out.append((x, make_y(x, g)))
    return out


@pytest.mark.parametrize("method", ["jvp", "fast"])
def test_segmentation_classes_on_dim_1(method):
    """(B, C, H, W) logits with F.cross_entropy: the spread over the classes (dim 1,
    found from the loss's gradient), not over W."""
    torch.manual_seed(0)
    model = Segmenter()
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=0.5), model, method=method)
    data = batches_of(
        lambda g: torch.randn(4, 3, 6, 7, generator=g),
        lambda x, g: (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long(),
    )
    rs, _ = train(model, ctrl, data, F.cross_entropy, class_dim=1)
    assert ctrl.reader.class_dim == 1
    assert min(rs) > 0.9  # clipped at the bound, not below it


def test_measure_agrees_with_the_controller():
    """measure() with class_dim=1, or with the controller's reader, measures the r the
    controller bounded (the proposal, at the old parameters)."""
    torch.manual_seed(0)
    model = Segmenter()
    ctrl = RadiusController(
        torch.optim.Adam(model.parameters(), lr=0.5), model, method="jvp", mode="monitor"
    )
    x, y = torch.randn(4, 3, 6, 7), torch.randint(0, 5, (4, 6, 7))
    old = trainable_state(model)
    F.cross_entropy(model(x), y).backward()
    ctrl.step()
    update = applied_update(old, trainable_state(model))
    for name, p in model.named_parameters():
        p.data.copy_(old[name])
    direction = {n: u.float() for n, u in update.items()}
    for how in ({"class_dim": 1}, {"logits_fn": ctrl.reader}):
        m = measure(model, x, direction, tau=1.0, **how)
        assert m.r == pytest.approx(ctrl.last.r_before, rel=1e-4)
        assert m.sample_shape == (4, 6, 7)


def test_segmentation_explicit_class_dim_matches_detection():
    torch.manual_seed(0)
    model = Segmenter()
    ctrl = RadiusController(
        torch.optim.Adam(model.parameters(), lr=0.5),
        model,
        logits_fn=LogitsReader(None, class_dim=1),
    )
    x, y = torch.randn(4, 3, 6, 7), torch.randint(0, 5, (4, 6, 7))
    train(model, ctrl, [(x, y)], F.cross_entropy, class_dim=1)


def test_multilabel_sigmoid_per_element():
    """Multi-label BCEWithLogits on (B, L) with correlated labels: each label its own
    binary logit [0, z] (spread |a| per element), not one L-way softmax."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6))
    ctrl = RadiusController(
        torch.optim.Adam(model.parameters(), lr=0.5),
        model,
        logits_fn=LogitsReader(None, activation="sigmoid"),
    )
    data = batches_of(
        lambda g: torch.randn(16, 8, generator=g),
        lambda x, g: (x[:, :1] + 0.3 * x[:, 1:7] > 0).float(),  # labels share x[:, 0]
    )
    rs, _ = train(model, ctrl, data, F.binary_cross_entropy_with_logits, activation="sigmoid")
    assert min(rs) > 0.9


def _two_heads(out):
    return (out["logits"], out["b"]) if isinstance(out, dict) else tuple(out)


def _two_head_loss(out, y):
    za, zb = _two_heads(out)
    return F.cross_entropy(za, y) + F.cross_entropy(zb, y % 4)


@pytest.mark.parametrize("as_tuple", [False, True])
@pytest.mark.parametrize("method", ["jvp", "fast"])
def test_several_heads(as_tuple, method):
    """A dict / tuple with two candidate heads and no logits_fn is an error naming
    logits_fn (never measure one head only); with logits_fn returning both heads r is
    the max over the heads (head b binds)."""
    torch.manual_seed(0)
    model = TwoHeads(as_tuple)
    data = batches_of(
        lambda g: torch.randn(16, 8, generator=g),
        lambda x, g: torch.randint(0, 10, (16,), generator=g),
    )
    blind = RadiusController(torch.optim.Adam(model.parameters(), lr=0.5), model, method=method)
    _two_head_loss(model(data[0][0]), data[0][1]).backward()
    with pytest.raises(TypeError, match="logits_fn"):
        blind.step()
    blind.close()
    ctrl = RadiusController(
        torch.optim.Adam(model.parameters(), lr=0.5), model, method=method, logits_fn=_two_heads
    )
    rs, _ = train(model, ctrl, data, _two_head_loss, logits_fn=_two_heads)
    assert min(rs) > 0.9


def test_ambiguous_layout_is_an_error_before_the_update():
    """(B, 4, 5, 6) outputs under a loss that is no softmax over dim 1 or the last: a
    ValueError naming class_dim, raised before the inner optimizer moved anything."""
    torch.manual_seed(0)
    model = Segmenter(classes=4)
    inner = torch.optim.Adam(model.parameters(), lr=0.5)
    ctrl = RadiusController(inner, model)
    before = trainable_state(model)
    x = torch.randn(2, 3, 6, 7)
    F.mse_loss(model(x), torch.zeros(2, 4, 6, 7)).backward()
    with pytest.raises(ValueError, match="class_dim"):
        ctrl.step()
    assert all(torch.equal(before[n], p) for n, p in trainable_state(model).items())
    assert not inner.state


@pytest.mark.parametrize("method", ["jvp", "fast"])
def test_masked_classes_drop_out(method):
    """-inf logits (action masking): finite slopes for every method, training goes on,
    and the masked classes' zero slope does not widen the spread (no over-clipping)."""
    torch.manual_seed(0)
    model = Masked()
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=0.3), model, method=method)

    def make_x(g):
        x = torch.randn(16, 8, generator=g)
        x[:, 0] = x[:, 0].abs()  # action 0 always legal
        return x

    def loss_fn(z, y):
        return F.cross_entropy(z, y) + (z[:, 0] - 2.0).pow(2).mean()  # moves the shift

    data = batches_of(make_x, lambda x, g: torch.zeros(16, dtype=torch.long), n=5)
    rs, scales = train(model, ctrl, data, loss_fn)
    binding = [r for r, s in zip(rs, scales, strict=True) if s < 1.0]
    assert min(binding) > 0.95


@pytest.mark.parametrize("offset", [1e6, 1e5])
def test_fast_large_logits_falls_back_to_jvp(offset):
    """Float32 logits offset by 1e6 / 1e5: a secant at the usual move cannot resolve
    them (spread 0 -> full step, or 2.5-4x over-clipping); "fast" falls back to
    "jvp", r <= 1.001 and the clip within a few % of the bound."""
    torch.manual_seed(0)
    model = Offset(offset)
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=0.5), model, method="fast")
    data = batches_of(
        lambda g: torch.randn(16, 8, generator=g),
        lambda x, g: torch.randint(0, 4, (16,), generator=g),
    )
    with pytest.warns(RuntimeWarning, match="jvp"):
        rs, scales = train(model, ctrl, data, F.cross_entropy)
    assert ctrl.method == "jvp"
    binding = [r for r, s in zip(rs, scales, strict=True) if s < 1.0]
    assert min(binding) > 0.97
