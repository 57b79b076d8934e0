"""Unit tests for ghoststep.controller._meter: the spread of a logit difference (including the
blocked CPU path), the evaluation point kept away from 1, and one measurement of a
linear model against its closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import ghoststep.controller._meter as meter
from ghoststep.controller._capture import Captured
from ghoststep.controller._meter import (
    away_from_one,
    make_meter,
    spread_of_difference,
)
from ghoststep.controller._proposal import Proposal
from ghoststep.controller._sampling import Sampling, make_plan
from ghoststep.radius._bounds import logit_spread_unchecked


def _direct(shifted, baseline):
    diff = shifted - baseline
    return diff.amax(-1) - diff.amin(-1)


def test_logit_spread_unchecked_closed_form():
    slopes = torch.tensor([[1.0, -2.0, 0.5], [3.0, 3.0, 3.0]])
    assert logit_spread_unchecked(slopes).tolist() == [3.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spread_of_difference_small(dtype):
    g = torch.Generator().manual_seed(0)
    shifted = torch.randn(3, 4, 7, generator=g, dtype=dtype)
    baseline = torch.randn(3, 4, 7, generator=g, dtype=dtype)
    expected = _direct(shifted, baseline)
    got = spread_of_difference(shifted.clone(), baseline)
    assert got.shape == (3, 4) and torch.equal(got, expected)


def test_spread_of_difference_blocked_cpu_path(monkeypatch):
    # 64 bytes per block: 3 rows of 5 float32 classes, 28 rows -> 10 blocks, the last short
    monkeypatch.setattr(meter, "_BLOCK_BYTES", 64)
    g = torch.Generator().manual_seed(1)
    shifted, baseline = torch.randn(7, 4, 5, generator=g), torch.randn(7, 4, 5, generator=g)
    got = spread_of_difference(shifted.clone(), baseline)
    assert got.shape == (7, 4) and torch.equal(got, _direct(shifted, baseline))


def test_spread_of_difference_blocked_at_the_real_block_size():
    # 1 MiB blocks of 262 rows at V = 1000 (float32): 600 rows, three blocks
    g = torch.Generator().manual_seed(2)
    shifted, baseline = torch.randn(3, 200, 1000, generator=g), torch.randn(3, 200, 1000)
    got = spread_of_difference(shifted.clone(), baseline)
    assert torch.equal(got, _direct(shifted, baseline))


@pytest.mark.parametrize(
    "fraction, expected",
    [(0.3, 0.3), (0.5, 0.5), (0.6, 0.5), (1.0, 0.5), (1.49, 0.5), (1.5, 1.5), (-0.7, -0.7)],
)
def test_away_from_one(fraction, expected):
    assert away_from_one(fraction) == expected


# ------------------------------------------------- one measurement, closed form


def _linear_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(4, 5).double()
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    dw = torch.randn(5, 4, generator=g, dtype=torch.float64)
    db = torch.randn(5, generator=g, dtype=torch.float64)
    return model, x, dw, db


def _meter(model, method, sampling: Sampling, temperature=1.0):
    return make_meter(
        method,
        model,
        logits_fn=lambda out: out,
        temperature=temperature,
        sampling=sampling,
        chunk_size=None,
        slopes_kwargs={},
        extra_radii=None,
        limit_by=None,
        keep_samples=True,
        process_group=None,
    )


@torch.no_grad()
def _proposed(model, dw, db):
    """The controller's state after the inner step (W + dW, b + db) and the swap."""
    params = list(model.parameters())
    proposal = Proposal()
    spare = proposal.begin(params, None)
    model.weight.add_(dw)
    model.bias.add_(db)
    return proposal, spare, proposal.swap()


@pytest.mark.parametrize("method", ["jvp", "fast"])
@pytest.mark.parametrize("quantile", [None, 0.5])
def test_linear_model_spread_and_radius_in_closed_form(method, quantile):
    """z = W x + b moves along (dW, db) with slopes dW x + db: the spread per unit of
    v = p / tau is (max - min of dW x + db) / tau, the radius pi T / that."""
    model, x, dw, db = _linear_case()
    proposal, spare, tau = _proposed(model, dw, db)
    with torch.no_grad():
        logits = model(x)
    entry = Captured((x,), {}, None, False)
    entry.inputs, entry.logits, entry.rows_independent = x, logits, True
    sampling = Sampling(quantile=quantile)
    plan, _ = make_plan(entry, sampling, torch.Generator(), None)
    m = _meter(model, method, sampling, temperature=2.0)
    with torch.no_grad():
        measured = m.measure([plan], proposal, None)

    per_sample = _direct(x @ dw.T + db, torch.zeros(5, dtype=torch.float64)) / tau
    expected = per_sample.max() if quantile is None else per_sample.sort().values[3]
    rel = 1e-12 if method == "jvp" else 1e-6
    assert measured.spread == pytest.approx(float(expected), rel=rel)
    assert measured.rho_a == pytest.approx(2.0 * math.pi / float(expected), rel=rel)
    assert measured.bottleneck == int(per_sample.argmax())
    assert measured.finite and measured.counted
    torch.testing.assert_close(
        measured.rho_samples, (2.0 * math.pi / per_sample).float(), rtol=rel, atol=0.0
    )
    if method == "fast":  # the evaluation point: old + f p, f away from 1
        assert proposal.at != 0.0 and abs(1.0 - proposal.at) >= 0.5


def test_masked_positions_are_not_counted():
    model, x, dw, db = _linear_case(1)
    proposal, spare, tau = _proposed(model, dw, db)
    per_sample = _direct(x @ dw.T + db, torch.zeros(5, dtype=torch.float64)) / tau
    worst = int(per_sample.argmax())
    keep = torch.ones(6, dtype=torch.bool)
    keep[worst] = False
    sampling = Sampling(mask_fn=lambda inputs: keep)
    plan, _ = make_plan(Captured.explicit(x), sampling, torch.Generator(), None)
    with torch.no_grad():
        measured = _meter(model, "jvp", sampling).measure([plan], proposal, None)
    assert measured.spread == pytest.approx(float(per_sample[keep].max()), rel=1e-12)
    assert measured.bottleneck != worst

    nothing = Sampling(mask_fn=lambda inputs: torch.zeros(6, dtype=torch.bool))
    plan, _ = make_plan(Captured.explicit(x), nothing, torch.Generator(), None)
    with torch.no_grad():
        measured = _meter(model, "jvp", nothing).measure([plan], proposal, None)
    assert not measured.counted and measured.spread == 0.0 and measured.rho_a == math.inf


def test_one_meter_per_method_sharing_settings_and_state():
    model = nn.Linear(4, 5)
    secant = _meter(model, "fast", Sampling(quantile=0.5))
    assert isinstance(secant, meter.SecantMeter) and secant.method == "fast"
    secant.spread_hint, secant.devices = 2.5, [0]
    tangent = secant.with_method("jvp")
    assert isinstance(tangent, meter.TangentMeter) and tangent.method == "jvp"
    assert tangent.spread_hint == 2.5 and tangent.devices == [0]
    assert tangent.sampling is secant.sampling and tangent.temperature == secant.temperature
    assert isinstance(_meter(model, "auto", Sampling()), meter.TangentMeter)  # until resolved
