"""Shared probes of the one-step experiments: line sweeps, curvature, onsets, training."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ghoststep import random_direction
from ghoststep.measurement import logit_slopes
from ghoststep_lab.common.data import digits
from ghoststep_lab.common.probes import (
    curvature_along,
    descent_direction,
    distribution,
    first_crossing,
    line_sweep,
    log_grid,
    onset,
    pretrain,
    quadratic_step,
    std_log10,
    tempered_loss,
    train_checkpoints,
    value_at,
)
from ghoststep_lab.common.runner import torch_threads


def _tiny(seed=0, act=torch.nn.Tanh, norm=False):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(5, 7)]
    if norm:
        layers.append(torch.nn.BatchNorm1d(7))
    layers += [act(), torch.nn.Linear(7, 3)]
    return torch.nn.Sequential(*layers)


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 5, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return X, y


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _shifted_copy(model, direction, tau):
    """Reference: a deep copy of the model with its parameters moved in place."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in other.named_parameters():
            p.add_(tau * direction[name])
    return other


# ----------------------------------------------------------------------- line sweeps


def test_line_sweep_matches_a_shifted_copy_and_leaves_the_model_alone():
    model = _tiny(norm=True).eval()
    X, y = _data()
    before = _state(model)
    v = random_direction(model, seed=3)
    taus = [0.0, 0.3, 2.0]
    sweep = line_sweep(model, X, y, v, taus, per_sample=True)
    for k, t in enumerate(taus):
        ref = _shifted_copy(model, v, t)
        with torch.no_grad():
            logits = ref(X)
        assert torch.allclose(
            sweep.sample_loss[k],
            F.cross_entropy(logits.double(), y, reduction="none"),
            rtol=1e-5,
            atol=1e-6,
        )
        assert torch.equal(sweep.predictions[k], logits.argmax(-1))
    assert sweep.loss0 == pytest.approx(float(sweep.loss[0]))
    assert sweep.flip_fraction[0] == 0 and sweep.loss_ratio[0] == pytest.approx(1.0)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_line_sweep_in_train_mode_does_not_touch_batchnorm_buffers():
    model = _tiny(norm=True).train()
    X, y = _data()
    before = _state(model)
    line_sweep(model, X, y, random_direction(model, seed=0), [0.1, 1.0])
    curvature_along(model, X, y, random_direction(model, seed=0))
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training


def test_linear_model_line_loss_is_exactly_the_linearized_loss():
    torch.manual_seed(1)
    model = torch.nn.Linear(5, 4)
    X, y = _data()
    y = y % 4
    v = random_direction(model, seed=2)
    z, a = logit_slopes(model, X, v)
    taus = torch.tensor([0.5, 3.0, 20.0])
    sweep = line_sweep(model, X, y, v, taus, dtype=torch.float64)
    for k, t in enumerate(taus):
        expected = F.cross_entropy(z.double() + float(t) * a.double(), y)
        assert float(sweep.loss[k]) == pytest.approx(float(expected), rel=1e-5)


def test_line_sweep_temperature_and_accuracy():
    model = _tiny().eval()
    X, y = _data()
    v = random_direction(model, seed=0)
    s1 = line_sweep(model, X, y, v, [0.5])
    s4 = line_sweep(model, X, y, v, [0.5], temperature=4.0)
    with torch.no_grad():
        logits = _shifted_copy(model, v, 0.5)(X)
    assert float(s4.loss[0]) == pytest.approx(float(F.cross_entropy(logits / 4.0, y)), rel=1e-5)
    assert torch.equal(s1.accuracy, s4.accuracy)  # T does not change the arg-max
    assert float(s1.accuracy[0]) == pytest.approx(float((logits.argmax(-1) == y).double().mean()))


def test_line_sweep_rejects_incomplete_direction():
    model = _tiny()
    X, y = _data()
    v = random_direction(model, seed=0)
    v.pop(next(iter(v)))
    with pytest.raises(ValueError, match="no entry"):
        line_sweep(model, X, y, v, [1.0])


# ------------------------------------------------------------------------ curvature


def _reference_curvature(model, X, y, v):
    """v^T H v from the full Hessian of the flattened parameters (torch.autograd.functional)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().double().reshape(-1) for _, p in model.named_parameters()])
    vflat = torch.cat([v[n].double().reshape(-1) for n in names])
    m64 = copy.deepcopy(model).double()

    def loss(flat):
        params, start = {}, 0
        for n, s in zip(names, shapes):
            size = int(np.prod(s))
            params[n] = flat[start : start + size].reshape(s)
            start += size
        out = torch.func.functional_call(m64, params, (X.double(),))
        return F.cross_entropy(out, y)

    H = torch.autograd.functional.hessian(loss, flat0)
    return float(vflat @ H @ vflat)


@pytest.mark.parametrize("seed", [0, 1])
def test_curvature_along_equals_vHv_from_the_full_hessian(seed):
    model = _tiny(seed).eval()
    X, y = _data(seed=seed)
    for v in (random_direction(model, seed=seed + 10), descent_direction(model, X, y)):
        ours = curvature_along(model, X, y, v)
        assert ours == pytest.approx(_reference_curvature(model, X, y, v), rel=1e-8, abs=1e-12)


def test_curvature_along_matches_finite_differences_of_the_line_loss():
    model = _tiny(2).eval()
    X, y = _data()
    v = random_direction(model, seed=5)
    h = 1e-3
    s = line_sweep(model, X, y, v, [-h, h], dtype=torch.float64)
    fd = (float(s.loss[0]) + float(s.loss[1]) - 2 * s.loss0) / h**2
    assert curvature_along(model, X, y, v) == pytest.approx(fd, rel=1e-4)


def test_curvature_of_a_linear_logit_direction_that_moves_nothing_is_zero():
    model = _tiny().eval()
    X, y = _data()
    zero = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    assert curvature_along(model, X, y, zero) == 0.0


def test_torch_threads_restores_the_setting():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(0):
        assert torch.get_num_threads() == before


def test_quadratic_step():
    assert quadratic_step(4.0) == 0.5
    assert quadratic_step(0.0) == math.inf and quadratic_step(-1.0) == math.inf


# --------------------------------------------------------------------- directions


def test_descent_direction_is_a_unit_downhill_direction():
    model = _tiny().eval()
    X, y = _data()
    v = descent_direction(model, X, y)
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in v.values()))
    assert norm == pytest.approx(1.0, rel=1e-6)
    sweep = line_sweep(model, X, y, v, [1e-3])
    assert float(sweep.loss[0]) < sweep.loss0


def test_tempered_loss():
    z = torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    assert tempered_loss(1.0) is F.cross_entropy
    assert float(tempered_loss(2.0)(z, y)) == pytest.approx(float(F.cross_entropy(z / 2, y)))
    with pytest.raises(ValueError):
        tempered_loss(0.0)


# ------------------------------------------------------------------ onsets and stats


def test_first_crossing_and_onset():
    xs = [0.1, 1.0, 10.0, 100.0]
    assert onset(xs, [1.0, 1.5, 2.0, 9.0]) == 10.0
    assert math.isnan(onset(xs, [1.0, 1.1, 1.2, 1.3]))
    assert onset(xs, [1.0, float("inf"), 1.0, 1.0]) == 1.0  # overflow counts as crossed
    assert onset(xs, [1.0, float("nan"), 1.0, 1.0]) == 1.0
    per_sample = np.array([[1, 1, 1], [3, 1, 1], [3, 2, 1], [3, 2, 1]], dtype=float)
    out = first_crossing(xs, per_sample, 2.0)
    assert out[0] == 1.0 and out[1] == 10.0 and math.isnan(out[2])
    with pytest.raises(ValueError):
        first_crossing(xs, [1.0, 2.0])


def test_log_grid_value_at_distribution_std_log10():
    g = log_grid(0.01, 100, 5)
    assert np.allclose(g, [0.01, 0.1, 1, 10, 100])
    with pytest.raises(ValueError):
        log_grid(1.0, 0.5, 3)
    assert value_at([0.1, 1.0, 10.0], [1.0, 2.0, 4.0], 1.0) == 2.0
    assert value_at([0.1, 1.0, 10.0], [1.0, 2.0, 4.0], math.sqrt(10)) == pytest.approx(3.0)
    d = distribution([1.0, 2.0, 3.0, float("nan"), float("inf")])
    assert d["n"] == 3 and d["n_nonfinite"] == 2 and d["median"] == 2.0
    assert d["p5"] == pytest.approx(1.1) and d["p95"] == pytest.approx(2.9)
    assert distribution([float("nan")]) == {"n": 0, "n_nonfinite": 1}
    assert std_log10([1.0, 100.0]) == pytest.approx(1.0)
    assert std_log10([1.0, 10.0, -1.0, float("nan")]) == pytest.approx(0.5)
    assert math.isnan(std_log10([1.0]))


# ------------------------------------------------------------------------ training


def test_train_checkpoints_thresholds_steps_and_determinism():
    data = digits(0)
    cks = train_checkpoints(
        "linear", 0, steps=400, at_steps=(0, 50), at_accuracy=(0.5, 0.8), lr=1e-2, data=data
    )
    steps = [c.step for c in cks]
    assert steps == sorted(steps) and 0 in steps and 50 in steps
    by_target = {c.target_accuracy: c for c in cks if c.target_accuracy is not None}
    assert set(by_target) == {0.5, 0.8}
    for target, ck in by_target.items():
        assert ck.test_accuracy >= target
        assert not ck.model.training
    assert by_target[0.5].step <= by_target[0.8].step
    # copies are independent: the step-0 model is the untouched initialization
    init = next(c for c in cks if c.step == 0)
    assert init.test_accuracy < 0.5
    again = train_checkpoints("linear", 0, steps=400, at_steps=(50,), lr=1e-2, data=data)
    first = next(c for c in cks if c.step == 50)
    for p, q in zip(first.model.parameters(), again[0].model.parameters()):
        assert torch.equal(p, q)


def test_pretrain_and_unreached_thresholds():
    net = pretrain("mlp", 30, 1)
    assert net.step == 30 and len(net.losses) == 30 and 0 <= net.test_accuracy <= 1
    cks = train_checkpoints("linear", 0, steps=5, at_accuracy=(0.999,))
    assert cks == []
