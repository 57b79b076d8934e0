"""The function measured at ``step()`` is the one that produced the gradient, or the
controller says so (issue 22, item 4).

Between ``backward()`` and ``step()`` a loop can switch modules to eval mode, change
inputs in place, and a forward can change its own buffers (a MoCo queue) or draw from
Python's ``random``. Each check re-measures the applied update independently in float64
(``helpers.realised_r``) on the function as the training forward saw it, or asserts the
RuntimeWarning that names the cause; and each asserts that clip bound and that training
went on (parameters moved, the scale not ~0 after the event).
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import applied_update, build_model, digit_batches, realised_r, trainable_state
from torch import nn

from ghoststep.controller import RadiusController

FLOAT32_BOUND = 1.001
ALIVE = 1e-3  # a scale below this is a frozen step

pytestmark = pytest.mark.usefixtures("flush_denormals")


def _moved(before: dict, model: nn.Module) -> bool:
    after = trainable_state(model)
    return any(not torch.equal(before[n], after[n]) for n in before)


def _check_alive(ctrl, first: dict, model) -> None:
    """Clip bound at least once, no step froze, the parameters moved."""
    scales = [s.scale for s in ctrl.history if not s.skipped]
    assert any(s < 1.0 for s in scales), scales
    assert min(scales) > ALIVE, scales
    assert _moved(first, model)


def _warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]


# --------------------------------------------------------------------------- eval() before step


@pytest.mark.parametrize("method", ["jvp", "fast"])
def test_eval_between_backward_and_step_measures_the_train_function(digits, method):
    """A validation pass (``model.eval()``) between backward and step: the measurement
    runs with the training forward's flags (BatchNorm on batch statistics) and leaves
    the model in eval mode, as the loop put it."""
    torch.manual_seed(0)
    model = build_model("cnn_bn").train()
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=1.0), model, method=method)
    first, rs = trainable_state(model), []
    X_val = digits[2][:32]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for x, y in digit_batches(digits, 4):
            model.train()
            old = trainable_state(model)
            ctrl.zero_grad()
            F.cross_entropy(model(x), y).backward()
            model.eval()
            with torch.no_grad():
                model(X_val)
            ctrl.step()
            assert not model.training and all(not m.training for m in model.modules())
            model.train()
            rs.append(realised_r(model, old, x, applied_update(old, trainable_state(model))))
    print(f"{method}: realised r {max(rs):.6f}")
    assert max(rs) <= FLOAT32_BOUND, rs
    assert not _warnings(record), _warnings(record)
    _check_alive(ctrl, first, model)


# --------------------------------------------------------------------------- state changed


class QueueModel(nn.Module):
    """MoCo-style: logits against a queue buffer of past features, which each
    training forward updates in place (after using it)."""

    def __init__(self, size: int = 32, d: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, d))
        self.fc = nn.Linear(d, 10)
        self.register_buffer("queue", torch.randn(size, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        logits = torch.cat([self.fc(h), h @ self.queue.clone().T], -1)
        if self.training:
            with torch.no_grad():
                fresh = torch.cat([h.detach()[:8], self.queue[:-8]])
                self.queue.copy_(F.normalize(fresh, dim=-1) * 4.0)
        return logits


def _run_changed(model, ctrl, batches, change):
    """Train with ``change(x)`` applied between backward and step; returns the
    RuntimeWarnings' messages."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for x, y in batches:
            ctrl.zero_grad()
            x = change.prepare(x)
            F.cross_entropy(model(x), y).backward()
            change(x)
            ctrl.step()
    return _warnings(record)


class _Nothing:
    def prepare(self, x):
        return x

    def __call__(self, x):
        pass


class _Normalize(_Nothing):
    """The input standardized in place after the forward (version counter bumped)."""

    def __call__(self, x):
        x.sub_(x.mean(0)).div_(x.std(0) + 1e-3)


class _Adversarial(_Nothing):
    """PGD-style: the adversarial input stepped in place through ``.data`` (no version
    counter bump: only the replay check can see it)."""

    def prepare(self, x):
        return x.clone().requires_grad_(True)

    def __call__(self, x):
        x.data.add_(0.3 * x.grad.sign())


@pytest.mark.parametrize("method", ["jvp", "fast"])
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("queue", "buffer 'queue' was changed in place"),
        ("normalize", "input args[0] was changed in place"),
        ("adversarial", "does not reproduce its logits"),
    ],
)
def test_state_changed_after_the_forward_is_warned_and_training_goes_on(
    digits, method, case, expected
):
    torch.manual_seed(0)
    model = QueueModel() if case == "queue" else build_model("mlp")
    change = {"queue": _Nothing, "normalize": _Normalize, "adversarial": _Adversarial}[case]()
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=1.0), model, method=method)
    first = trainable_state(model)
    messages = _run_changed(model, ctrl, digit_batches(digits, 6), change)
    print(f"{method} {case}: {messages}")
    assert len(messages) == 1 and expected in messages[0], messages
    assert "warned once" in messages[0]
    _check_alive(ctrl, first, model)


# --------------------------------------------------------------------------- Python random


class LayerDrop(nn.Module):
    """Residual blocks skipped at random in training, drawn from Python's ``random``;
    ``fixed`` replays a given draw (for the re-measurement)."""

    def __init__(self, blocks: int = 4, p: float = 0.5) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 32)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(blocks)
        )
        self.out = nn.Linear(32, 10)
        self.p = p
        self.fixed: list[bool] | None = None
        self.last: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        keep = self.fixed
        if keep is None:
            keep = [not (self.training and random.random() < self.p) for _ in self.blocks]
        self.last = keep
        for block, kept in zip(self.blocks, keep):
            h = h + block(h) if kept else h
        return self.out(h)


@pytest.mark.parametrize("method", ["jvp", "fast"])
def test_layerdrop_from_python_random_is_replayed(digits, method):
    torch.manual_seed(0)
    random.seed(0)
    model = LayerDrop()
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=1.0), model, method=method)
    first, rs, streams = trainable_state(model), [], []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for x, y in digit_batches(digits, 6):
            old = trainable_state(model)
            ctrl.zero_grad()
            F.cross_entropy(model(x), y).backward()
            drawn, state = model.last, random.getstate()
            ctrl.step()
            streams.append(random.getstate() == state)
            model.fixed = drawn
            rs.append(realised_r(model, old, x, applied_update(old, trainable_state(model))))
            model.fixed = None
    print(f"{method}: realised r {max(rs):.6f}")
    assert max(rs) <= FLOAT32_BOUND, rs
    assert all(streams)  # Python's random stream goes on as without the controller
    assert not _warnings(record), _warnings(record)
    _check_alive(ctrl, first, model)


# --------------------------------------------------------------------------- never a silent freeze


def test_scale_near_zero_for_several_steps_is_warned(digits):
    torch.manual_seed(0)
    model = build_model("mlp")
    ctrl = RadiusController(torch.optim.SGD(model.parameters(), lr=1e5), model, method="jvp")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for x, y in digit_batches(digits, 7):
            ctrl.zero_grad()
            F.cross_entropy(model(x), y).backward()
            ctrl.step()
    messages = _warnings(record)
    print(messages)
    assert all(s.scale < ALIVE for s in ctrl.history)
    assert len(messages) == 1, messages
    for word in ("r_before", "rho_a", "tau", "learning rate", "stale"):
        assert word in messages[0]
