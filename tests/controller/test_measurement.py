"""The controller's measurement of one step against the closed form of a linear model:
spread, radius, bottleneck and per-sample radii for "jvp" and "fast", masked positions,
and the evaluation point of "fast" kept away from 1."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import linear_case

from ghoststep.controller import RadiusController, Sampling
from ghoststep.controller._options import Recording
from ghoststep.evaluation._directional import away_from_one


def _direct(shifted, baseline):
    diff = shifted - baseline
    return diff.amax(-1) - diff.amin(-1)


@pytest.mark.parametrize(
    "fraction, expected",
    [(0.3, 0.3), (0.5, 0.5), (0.6, 0.5), (1.0, 0.5), (1.49, 0.5), (1.5, 1.5), (-0.7, -0.7)],
)
def test_away_from_one(fraction, expected):
    assert away_from_one(fraction) == expected


def _step(model, x, dw, db, **options):
    """One monitor-mode step whose update is exactly p = (dW, db) (SGD, lr 1, grad -p)."""
    ctrl = RadiusController(
        torch.optim.SGD(model.parameters(), lr=1.0), model, mode="monitor",
        logits_fn=lambda out: out, recording=Recording(keep_samples=True), **options,
    )  # fmt: skip
    model.weight.grad, model.bias.grad = -dw, -db
    ctrl.step(inputs=x)
    return ctrl.last


@pytest.mark.parametrize("method", ["jvp", "fast"])
@pytest.mark.parametrize("quantile", [None, 0.5])
def test_linear_model_spread_and_radius_in_closed_form(method, quantile):
    """z = W x + b moves along (dW, db) with slopes dW x + db: the spread per unit of
    v = p / tau is (max - min of dW x + db) / tau, the radius pi T / that."""
    model, x, dw, db = linear_case()
    tau = math.sqrt(float(dw.pow(2).sum() + db.pow(2).sum()))
    stats = _step(model, x, dw, db, method=method, temperature=2.0,
                  sampling=Sampling(quantile=quantile))  # fmt: skip
    per_sample = _direct(x @ dw.T + db, torch.zeros(5, dtype=torch.float64)) / tau
    expected = per_sample.max() if quantile is None else per_sample.sort().values[3]
    rel = 1e-12 if method == "jvp" else 1e-6
    assert stats.spread == pytest.approx(float(expected), rel=rel)
    assert stats.rho_a == pytest.approx(2.0 * math.pi / float(expected), rel=rel)
    assert stats.radius == stats.rho_a  # no extra radii, no window
    assert stats.bottleneck == int(per_sample.argmax())
    assert not stats.skipped and stats.scale == 1.0
    torch.testing.assert_close(
        stats.rho_samples, (2.0 * math.pi / per_sample).float(), rtol=rel, atol=0.0
    )


def test_masked_positions_are_not_counted():
    model, x, dw, db = linear_case(1)
    tau = math.sqrt(float(dw.pow(2).sum() + db.pow(2).sum()))
    per_sample = _direct(x @ dw.T + db, torch.zeros(5, dtype=torch.float64)) / tau
    worst = int(per_sample.argmax())
    keep = torch.ones(6, dtype=torch.bool)
    keep[worst] = False
    stats = _step(model, x, dw, db, method="jvp", sampling=Sampling(mask_fn=lambda inputs: keep))
    assert stats.spread == pytest.approx(float(per_sample[keep].max()), rel=1e-12)
    assert stats.bottleneck != worst
