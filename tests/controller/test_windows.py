"""What a step measures: the forwards of its own accumulation window, and only them.

A ``GradScaler`` that finds an fp16 overflow skips ``opt.step()``; the forwards of that
window must not pile up until the next real step (held memory: one window), nor be
measured by it. Gradient accumulation (several forwards and backwards between two
``zero_grad`` calls) stays one window. And ``method="auto"`` runs its trial pass once.

Only the public API: the forwards a step runs are counted with a hook on the model, the
inputs a controller still holds through weak references.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ghoststep import RadiusController

ROWS = 16


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 5))


class _Counter:
    """Counts the model's forwards (the training ones and the controller's own)."""

    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        model[0].register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.calls += 1


def _batch(seed: int):
    """Seeds below 100 (the skipped windows): larger inputs, a smaller radius than the
    real window's, so measuring them would clip the real step more."""
    gen = torch.Generator().manual_seed(seed)
    scale = 3.0 if seed >= 100 else 12.0
    return torch.randn(ROWS, 6, generator=gen) * scale, torch.randint(0, 5, (ROWS,), generator=gen)


def _forward(model, seed: int, held: list):
    """One training forward on a fresh batch; its input is watched weakly."""
    x, y = _batch(seed)
    held.append(weakref.ref(x))
    return F.cross_entropy(model(x), y)


def _alive(held: list) -> int:
    gc.collect()
    return sum(ref() is not None for ref in held)


def _zero(ctrl: RadiusController, model: nn.Module, how: str) -> None:
    if how == "controller":
        ctrl.zero_grad()
    elif how == "inner":
        ctrl.optimizer.zero_grad()  # set_to_none=True: seen at the next training forward
    else:
        model.zero_grad()  # the Hugging Face Trainer's call


def _window(ctrl, model, seed: int, held: list, *, order: str, how: str) -> None:
    """One window: zero_grad, forward, backward ("standard"), or forward, zero_grad,
    backward (PyTorch's tutorials, Lightning's closure: "forward_first")."""
    if order == "standard":
        _zero(ctrl, model, how)
        loss = _forward(model, seed, held)
    else:
        loss = _forward(model, seed, held)
        _zero(ctrl, model, how)
    loss.backward()


@pytest.mark.parametrize(
    ("order", "how"),
    [
        ("standard", "controller"),
        ("standard", "inner"),
        ("standard", "model"),
        ("forward_first", "controller"),
    ],
)
def test_skipped_steps_free_their_forwards_and_the_next_step_measures_its_own(order, how):
    """Eight windows whose step a GradScaler skipped, then a real one: at every point the
    controller holds at most one window's inputs, and the real step measures its own
    batch only -- the same forwards and the same radius as a controller that never saw
    the skipped windows."""
    model = _model()
    counter = _Counter(model)
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=1.0), model)
    held: list = []
    most = 0
    for seed in range(8):  # skipped: opt.step() never called
        _window(ctrl, model, seed, held, order=order, how=how)
        most = max(most, _alive(held))
    _window(ctrl, model, 100, held, order=order, how=how)
    kept = _alive(held)
    counter.calls = 0
    ctrl.step()
    forwards = counter.calls

    reference = _model()
    ref_counter = _Counter(reference)
    ref = RadiusController(torch.optim.Adam(reference.parameters(), lr=1.0), reference)
    _window(ref, reference, 100, [], order=order, how=how)
    ref_counter.calls = 0
    ref.step()
    print(
        f"\n{order}/{how}: inputs held at most {most} (of 8 skipped windows), before the "
        f"real step {kept}; forwards in the step {forwards} (reference "
        f"{ref_counter.calls}); rho_a {ctrl.last.rho_a:.6g} (reference "
        f"{ref.last.rho_a:.6g}), scale {ctrl.last.scale:.6g}"
    )
    assert most == 1  # one window between steps, never the pile
    assert kept == 1  # only the real window's batch
    assert forwards == ref_counter.calls  # 2: the secant near the bound takes both sides
    assert ctrl.last.rho_a == ref.last.rho_a
    assert ctrl.last.scale == ref.last.scale < 1.0
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    assert _alive(held) == 0  # the step released its batch too


def _accumulated(order: str, how: str, firsts) -> tuple[RadiusController, int, int]:
    """Windows of three forwards and backwards (seeds first, first + 1, first + 2),
    stepped after the last: (controller, inputs held before the step, forwards in it)."""
    model = _model()
    counter = _Counter(model)
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=1.0), model)
    held: list = []
    for first in firsts:
        _window(ctrl, model, first, held, order=order, how=how)
        for seed in (first + 1, first + 2):
            _forward(model, seed, held).backward()
    kept = _alive(held)
    counter.calls = 0
    ctrl.step()
    return ctrl, kept, counter.calls


@pytest.mark.parametrize(
    ("order", "how"),
    [("standard", "controller"), ("standard", "inner"), ("forward_first", "controller")],
)
def test_gradient_accumulation_is_one_window(order, how):
    """Three forwards and backwards between two zero_grads, after a skipped window of
    three: the step holds and measures its three, exactly as without the skipped one."""
    ctrl, kept, forwards = _accumulated(order, how, (0, 110))
    ref, ref_kept, ref_forwards = _accumulated(order, how, (110,))
    print(
        f"\n{order}/{how}: inputs held {kept}, forwards in the step {forwards} (reference "
        f"{ref_forwards}), rho_a {ctrl.last.rho_a:.6g} ({ref.last.rho_a:.6g})"
    )
    assert kept == ref_kept == 3
    assert forwards == ref_forwards >= 3
    assert ctrl.last.rho_a == ref.last.rho_a
    assert ctrl.last.scale == ref.last.scale


def test_several_forwards_before_one_backward_are_one_window():
    """A loss over three forwards (a siamese / contrastive loop) with the gradients
    reset before them (no parameter holds a gradient at any of the three): all three
    are measured."""
    model = _model()
    counter = _Counter(model)
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=1.0), model)
    for step in range(2):
        held: list = []
        model.zero_grad()
        losses = [_forward(model, 3 * step + k, held) for k in range(3)]
        sum(losses).backward()
        assert _alive(held) == 3
        counter.calls = 0
        ctrl.step()
        assert counter.calls >= 3  # one forward per micro-batch (two near the bound)
        assert _alive(held) == 0


def _forwards_per_step(method: str, autocast: bool, steps: int = 4) -> tuple[list[int], str]:
    model = _model()
    counter = _Counter(model)
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=0.05), model, method=method)
    per = []
    for seed in range(steps):
        x, y = _batch(seed)
        ctrl.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        counter.calls = 0
        ctrl.step()
        per.append(counter.calls)
    return per, ctrl.method


@pytest.mark.parametrize(
    ("method", "autocast", "chosen", "same_as"),
    [
        ("auto", False, "fast", "fast"),  # the secant: no trial pass at all
        ("auto", True, "jvp", "jvp"),  # the JVP tried once, at the first step
    ],
)
def test_the_trial_pass_runs_once(method, autocast, chosen, same_as):
    """Forwards of the model inside each step: method="auto" resolved to "fast" used to
    run the trial pass again at step 2 (one step of 2 forwards took 4). "auto" must
    count as the method it chose; "jvp" tries once (2 forwards at the first step, 1
    after), "fast" never (1 forward, 2 where the secant takes both sides)."""
    per, resolved = _forwards_per_step(method, autocast)
    reference, _ = _forwards_per_step(same_as, autocast)
    print(f"\n{method} (autocast {autocast}) -> {resolved}: forwards per step {per}, "
          f"{same_as}: {reference}")  # fmt: skip
    assert resolved == chosen
    assert per == reference
    if chosen == "jvp":
        assert per == [2, 1, 1, 1]
    else:
        assert max(per) <= 2


def test_grad_scaler_overflow_skips_hold_and_measure_nothing():
    """A real ``GradScaler`` whose first steps overflow (a scale of 2**127 on a large
    loss: inf gradients, ``opt.step()`` never called, the scale halved each time): while
    it skips, the controller holds at most the current window's inputs, and the first
    real step measures its own batch only -- bitwise the step of a controller that saw
    only that batch (a power-of-two scale unscales exactly)."""
    model = _model()
    counter = _Counter(model)
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=1.0), model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    held: list = []
    most = skipped = 0
    for seed in range(100, 200):
        ctrl.zero_grad()
        loss = _forward(model, seed, held) * 1e4
        most = max(most, _alive(held))
        scaler.scale(loss).backward()
        counter.calls = 0
        scaler.step(ctrl)
        scaler.update()
        if ctrl.step_count:
            break
        skipped += 1
    forwards = counter.calls

    reference = _model()
    ref_counter = _Counter(reference)
    ref = RadiusController(torch.optim.Adam(reference.parameters(), lr=1.0), reference)
    (_forward(reference, seed, []) * 1e4).backward()
    ref_counter.calls = 0
    ref.step()
    print(
        f"\nGradScaler: {skipped} skipped steps, inputs held at most {most}; the first real "
        f"step: forwards {forwards} (reference {ref_counter.calls}), rho_a "
        f"{ctrl.last.rho_a:.6g} (reference {ref.last.rho_a:.6g})"
    )
    assert skipped >= 5
    assert most == 1
    assert forwards == ref_counter.calls
    assert ctrl.last.rho_a == ref.last.rho_a and ctrl.last.scale == ref.last.scale
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
