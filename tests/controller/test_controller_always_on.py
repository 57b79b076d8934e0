"""Always-on measuring (``every=k``): the steps it measures, what it applies in between,
protection through a held learning-rate spike (re-measured independently in float64),
resume, and its options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    applied_update,
    build_model,
    digit_batches,
    realised_r,
    trainable_state,
)

from ghoststep import RadiusController
from ghoststep.controller import Measuring
from ghoststep.controller._plan import Reference, measure_now, reference_after

SPIKE = 1e4


def _train(model, opt, batches, lr: float, spike: tuple[int, int] = (0, 0), check_r=False):
    """Adam-style loop; the learning rate is ``lr * SPIKE`` on steps [spike[0], spike[1]).
    Returns the StepStats per step and, with ``check_r``, the float64 realised r of every
    applied update."""
    stats, realised = [], []
    for i, (x, y) in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = lr * (SPIKE if spike[0] <= i < spike[1] else 1.0)
        old = trainable_state(model)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        stats.append(getattr(opt, "last", None))
        if check_r:
            realised.append(realised_r(model, old, x, applied_update(old, trainable_state(model))))
    return stats, realised


def _accuracy(model, digits) -> float:
    with torch.no_grad():
        return float((model(digits[2]).argmax(1) == digits[3]).float().mean())


@pytest.mark.filterwarnings("ignore:RadiusController. the step scale:RuntimeWarning")
def test_always_on_protects_through_a_held_spike(digits, flush_denormals):
    """300 steps of Adam on the digits MLP with the learning rate 10^4x for steps
    105..154: always-on (every=10) measures a fraction of the steps, ends >= 90 %
    accurate (plain Adam does not), measures the spike's first step although the
    cadence would not (the trigger), and keeps the realised r of every applied update,
    re-measured in float64, <= 1.0 (measured: the clip; unmeasured: the room)."""
    batches = digit_batches(digits, 300, seed=0)
    spike = (105, 155)
    torch.manual_seed(0)
    plain_model = build_model("mlp")
    _train(plain_model, torch.optim.Adam(plain_model.parameters()), batches, 3e-3, spike)
    torch.manual_seed(0)
    model = build_model("mlp")
    opt = RadiusController(torch.optim.Adam(model.parameters()), model, method="fast", every=10)
    stats, realised = _train(model, opt, batches, 3e-3, spike, check_r=True)
    measured = [s.step for s in stats if s.measured]
    accuracy, plain = _accuracy(model, digits), _accuracy(plain_model, digits)
    print(f"\nalways-on: {len(measured)} of 300 measured, accuracy {accuracy:.3f} "
          f"(plain Adam {plain:.3f}), max realised r {max(realised):.4f}")  # fmt: skip
    assert len(measured) < 100  # measures less
    assert accuracy >= 0.90 > plain
    # the spike's first step (step 106) is measured; the cadence alone would wait
    first = spike[0] + 1
    before = max(s for s in measured if s < first)
    assert first in measured and first - before < 10
    assert stats[first - 1].scale < 1e-2  # and clipped hard
    assert max(realised) <= 1.0


def test_between_measurements_updates_that_fit_are_applied_as_proposed(digits):
    """Unmeasured steps: rho_a NaN, ``radius`` the last measured one, s = 1 (the inner
    step bitwise) and r_before = tau / radius <= target (1 - stale_margin)."""
    batches = digit_batches(digits, 12, seed=1)
    torch.manual_seed(0)
    model = build_model("mlp")
    opt = RadiusController(torch.optim.Adam(model.parameters()), model, method="jvp", every=5)
    stats, _ = _train(model, opt, batches, 1e-3)
    assert [s.measured for s in stats] == [True, False, False, False, False] * 2 + [True, False]
    for s in stats:
        if s.measured:
            reference = s
            assert math.isfinite(s.rho_a)
            continue
        assert math.isnan(s.rho_a) and s.radius == reference.radius
        assert s.r_before == pytest.approx(s.tau / reference.radius)
        assert s.scale == 1.0 and s.r_after == s.r_before <= 0.75


def test_an_update_that_may_need_clipping_is_measured(digits):
    """Adam at learning rate 1 proposes updates far beyond the radius, of about the same
    length every step (no jump): each would not fit the last radius, so each is
    measured and clipped -- a held spike is measured on every step."""
    batches = digit_batches(digits, 6, seed=2)
    torch.manual_seed(0)
    model = build_model("mlp")
    opt = RadiusController(
        torch.optim.Adam(model.parameters(), lr=1.0), model, method="jvp", every=10
    )
    stats, _ = _train(model, opt, batches, 1.0)
    assert all(s.measured and s.scale < 1.0 for s in stats)


def test_resume_mid_cadence_is_bitwise(digits):
    """Saved between two measurements, loaded into a fresh model and controller: the
    rest of the run equals the uninterrupted one bitwise, measured steps included."""
    batches = digit_batches(digits, 24, seed=3)

    def fresh():
        torch.manual_seed(0)
        model = build_model("mlp")
        inner = torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, RadiusController(inner, model, method="fast", every=6)

    model, opt = fresh()
    whole, _ = _train(model, opt, batches, 1e-2)
    model_a, opt_a = fresh()
    _train(model_a, opt_a, batches[:9], 1e-2)
    saved = {"model": model_a.state_dict(), "opt": opt_a.state_dict()}
    model_b, opt_b = fresh()
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    rest, _ = _train(model_b, opt_b, batches[9:], 1e-2)
    assert [s.measured for s in rest] == [s.measured for s in whole[9:]]
    assert not all(s.measured for s in rest) and any(s.measured for s in rest)
    assert [(s.scale, s.radius) for s in rest] == [(s.scale, s.radius) for s in whole[9:]]
    for a, b in zip(model.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)


def test_when_to_measure():
    """The decision: every step for every=1; else without a reference, at the cadence,
    on a tau jump, when the step would not fit the room, and after a measurement that
    found the radius halved."""
    room = 0.75
    assert measure_now(None, 1.0, 1, 1.5, room) and measure_now(None, 1.0, 10, 1.5, room)
    calm = Reference(radius=2.0, tau=1.0, since=3)
    assert measure_now(calm, 1.0, 1, 1.5, room)
    assert not measure_now(calm, 1.0, 10, 1.5, room)
    assert not measure_now(calm, 1.5, 10, 1.5, room)  # not above the jump, fits 1.5 <= 1.5
    assert measure_now(calm, 1.51, 10, 1.5, room)  # a jump, and no longer fits
    assert measure_now(calm, 1.2, 10, 1.5, 0.5)  # no jump, but 1.2 > 0.5 * 2
    assert measure_now(Reference(2.0, 1.0, since=9), 1.0, 10, 1.5, room)  # the 10th step
    assert not measure_now(Reference(2.0, 1.0, since=8), 1.0, 10, 1.5, room)
    assert measure_now(Reference(2.0, 1.0, since=0, unsteady=True), 1.0, 10, 1.5, room)
    assert reference_after(None, 2.0, 1.0) == Reference(2.0, 1.0, 0, False)
    assert reference_after(calm, 0.99, 3.0) == Reference(0.99, 3.0, 0, True)
    assert reference_after(calm, 1.0, 3.0) == Reference(1.0, 3.0, 0, False)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"every": 0}, "every must be an int >= 1"),
        ({"every": 2.5}, "every must be an int >= 1"),
        ({"stale_margin": 1.0}, r"stale_margin must be in \[0, 1\)"),
        ({"stale_margin": -0.1}, r"stale_margin must be in \[0, 1\)"),
        ({"jump": 1.0}, "jump must be > 1"),
    ],
)
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        Measuring(**options)


def test_set_mode_needs_every_step():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="needs mode 'clip' or 'monitor'"):
        RadiusController(torch.optim.SGD(model.parameters(), lr=0.1), model, mode="set", every=4)
