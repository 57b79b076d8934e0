"""Experiments baselines and lrsweep, the stabilizers they compare, and the spike length.

Each stabilizer gets a test that it changes the update the way its paper says, with the
expected numbers computed here from the paper's formula (not from the package).
"""

from __future__ import annotations

import math

import pytest
import torch

from ghoststep_lab.common.data import markov_language
from ghoststep_lab.common.stabilizers import (
    AGC,
    ZClipTransform,
    applicable,
    method_settings,
    stabilizer_run,
)
from ghoststep_lab.common.training import (
    RunRecord,
    controlled_run,
    make_optimizer,
    recovery_steps,
    spike_run,
    spike_schedule,
)
from ghoststep_lab.lrsweep import parse_method, stable_range

pytest.importorskip("zclip")
pytest.importorskip("pytorch_optimizer")


# ----------------------------------------------------------------------------- spike length


def test_spike_schedule_one_step_and_held():
    one = spike_schedule(100.0, 5, 1)
    held = spike_schedule(100.0, 5, None)
    three = spike_schedule(100.0, 5, 3)
    assert [one(s) for s in range(4, 8)] == [1.0, 100.0, 1.0, 1.0]
    assert [held(s) for s in (4, 5, 50, 500)] == [1.0, 100.0, 100.0, 100.0]
    assert [three(s) for s in range(4, 10)] == [1.0, 100.0, 100.0, 100.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="spike_steps"):
        spike_schedule(10.0, 5, 0)


def test_spike_run_one_step_spike_multiplies_one_step():
    rec = spike_run("mlp", "plain", 1e-3, 1000.0, seed=0, steps=8, spike_at=4, spike_steps=1)
    lrs = [s.lr for s in rec.stats]
    assert lrs == pytest.approx([1e-3] * 4 + [1.0] + [1e-3] * 3)
    assert rec.spike_steps == 1
    assert rec.r_before[4] > 10 * rec.r_before[5]  # only the spiked step is long


def test_bare_run_is_the_monitored_run():
    kw = dict(seed=1, lr=1e-2, steps=6, batch_size=32, factor=100.0, spike_at=3)
    bare = controlled_run("mlp_ln", wrap=False, **kw)
    monitored = controlled_run("mlp_ln", **kw)
    assert bare.train_loss == monitored.train_loss and bare.stats == []
    assert 0 < bare.train_seconds <= bare.seconds
    with pytest.raises(ValueError, match="wrapper"):
        controlled_run("mlp_ln", wrap=False, mode="clip", **kw)


def test_recovery_steps():
    rec = RunRecord("mlp", "plain", 0, 1e-3, 10.0, 30, 10)
    rec.eval_steps = [0, 5, 10, 15, 20, 25, 30]
    rec.test_acc = [0.1, 0.5, 0.8, 0.3, 0.6, 0.75, 0.9]
    assert recovery_steps(rec) == 15.0  # back to >= 0.72 at step 25
    rec.test_acc = [0.1, 0.5, 0.8, 0.79, 0.8, 0.8, 0.9]
    assert recovery_steps(rec) == 0.0  # never fell below 0.72
    rec.test_acc = [0.1, 0.5, 0.8, 0.1, 0.1, 0.1, 0.1]
    assert math.isinf(recovery_steps(rec))
    rec.spike_at = None
    assert math.isnan(recovery_steps(rec))


# ----------------------------------------------------------------------------- stabilizers


def test_agc_clips_unit_wise_by_the_parameter_norm():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0], [1e-5, 0, 0]]))
        layer.bias.copy_(torch.tensor([1.0, 1.0, 1.0, 1.0]))  # norm 2
    g_w = torch.tensor([[0.5, 0.5, 0.0], [0.001, 0.0, 0.0], [0.0, 0.0, 0.03], [0.0, 1.0, 0.0]])
    g_b = torch.tensor([1.0, 0.0, 0.0, 0.0])
    layer.weight.grad, layer.bias.grad = g_w.clone(), g_b.clone()
    AGC(clipping=0.01, eps=1e-3)(layer)
    lam = 0.01
    # row 0: ||g|| = 0.707 > 0.01 * 1 -> scaled to norm 0.01; row 1: 0.001 < 0.02 kept;
    # row 2: 0.03 = 0.01 * 3 (not above) kept; row 3: parameter norm below eps -> cap 1e-5
    expected_w = g_w.clone()
    expected_w[0] = g_w[0] / g_w[0].norm() * lam * 1.0
    expected_w[3] = g_w[3] / g_w[3].norm() * lam * 1e-3
    torch.testing.assert_close(layer.weight.grad, expected_w)
    # a bias is one unit: whole-vector norms, 1.0 > 0.01 * 2
    torch.testing.assert_close(layer.bias.grad, g_b / g_b.norm() * lam * 2.0)


def _set_grad_norm(model, norm):
    (p,) = model.parameters()
    p.grad = torch.full_like(p, 1.0) * (norm / math.sqrt(p.numel()))


def test_zclip_clips_a_z_score_outlier_and_leaves_a_normal_gradient():
    model = torch.nn.Linear(4, 1, bias=False)
    clip = ZClipTransform(z_thresh=2.5, alpha=0.97, warmup_steps=25)
    norms = [1.0 + 0.1 * (i % 2) for i in range(25)]
    for n in norms:  # warm-up: statistics only, gradients untouched (no fixed cap)
        _set_grad_norm(model, 10 * n if n > 1.05 else n)  # 10x outliers still untouched
        clip(model)
        assert float(model.weight.grad.norm()) == pytest.approx(10 * n if n > 1.05 else n)
    warm = [10 * n if n > 1.05 else n for n in norms]
    mean = sum(warm) / len(warm)
    var = sum((x - mean) ** 2 for x in warm) / len(warm)

    def ema(x):
        m = 0.97 * mean + 0.03 * x
        return m, 0.97 * var + 0.03 * (x - m) ** 2

    normal = mean + 0.5 * math.sqrt(var)  # z = 0.5: left alone
    _set_grad_norm(model, normal)
    clip(model)
    assert float(model.weight.grad.norm()) == pytest.approx(normal, rel=1e-5)
    mean, var = ema(normal)
    outlier = mean + 10 * math.sqrt(var)  # z = 10 > 2.5
    z = (outlier - mean) / (math.sqrt(var) + 1e-6)
    threshold = mean + 2.5 * math.sqrt(var) / (z / 2.5)  # ZClip's reciprocal clipping
    _set_grad_norm(model, outlier)
    clip(model)
    assert float(model.weight.grad.norm()) == pytest.approx(threshold, rel=1e-4)
    assert threshold < outlier


def _adam_moments_step(opt, param, grad):
    param.grad = grad.clone()
    before = opt.state[param]["exp_avg"].clone() if "exp_avg" in opt.state[param] else None
    opt.step()
    return before, opt.state[param]["exp_avg"].clone()


def test_adagc_clips_each_parameter_against_its_own_gradient_norm_history():
    a = torch.nn.Parameter(torch.zeros(5))
    b = torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer(method_settings("adagc", adagc_warmup=2)["optimizer"], [a, b], 1e-3)
    ga, gb = torch.full((5,), 0.01), torch.full((3,), 0.02)
    for _ in range(4):  # warm-up, then adaptive steps at a steady norm
        a.grad, b.grad = ga.clone(), gb.clone()
        opt.step()
    gamma_a, gamma_b = float(opt.state[a]["gamma"]), float(opt.state[b]["gamma"])
    m_a, m_b = opt.state[a]["exp_avg"].clone(), opt.state[b]["exp_avg"].clone()
    a.grad, b.grad = 100 * ga, gb.clone()  # a spikes, b does not
    opt.step()
    # AdaGC: g_hat = g * min(1, lambda_rel * gamma_prev / ||g||), lambda_rel = 1.05
    g_hat_a = 100 * ga * min(1.0, 1.05 * gamma_a / float((100 * ga).norm()))
    g_hat_b = gb * min(1.0, 1.05 * gamma_b / float(gb.norm()))
    torch.testing.assert_close(opt.state[a]["exp_avg"], 0.9 * m_a + 0.1 * g_hat_a)
    torch.testing.assert_close(opt.state[b]["exp_avg"], 0.9 * m_b + 0.1 * g_hat_b)
    assert float(g_hat_a.norm()) == pytest.approx(1.05 * gamma_a, rel=1e-5)
    torch.testing.assert_close(g_hat_b, gb)


def test_spam_clips_spiked_entries_and_resets_momentum():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = make_optimizer(method_settings("spam", spam_reset_every=30)["optimizer"], [p], 1e-3)
    g = torch.tensor([0.1, -0.1, 0.2, -0.2])
    for _ in range(25):  # past SPAM's 20 accumulation steps
        _adam_moments_step(opt, p, g)
    v = opt.state[p]["exp_avg_sq"].clone()
    spiked = g.clone()
    spiked[0] = 1e3  # g^2 = 1e6 > 5000 v: clipped to sign(g) sqrt(5000 v)
    m_before, m_after = _adam_moments_step(opt, p, spiked)
    expected = spiked.clone()
    expected[0] = math.sqrt(5000 * float(v[0]))
    torch.testing.assert_close(m_after, 0.9 * m_before + 0.1 * expected)
    assert expected[0] < 50
    for _ in range(3):  # steps 27-29
        _adam_moments_step(opt, p, g)
    _, m_reset = _adam_moments_step(opt, p, g)  # step 30: moments reset, then updated
    torch.testing.assert_close(m_reset, 0.1 * g)


def test_stable_spam_bounds_the_moment_a_gradient_spike_reaches():
    p = torch.nn.Parameter(torch.zeros(6))
    q = torch.nn.Parameter(torch.zeros(6))
    stable = make_optimizer(method_settings("stable_spam")["optimizer"], [p], 1e-3)
    adam = torch.optim.Adam([q], lr=1e-3)
    g = torch.tensor([0.1, -0.1, 0.2, -0.2, 0.1, 0.1])
    for _ in range(30):
        _adam_moments_step(stable, p, g)
        q.grad = g.clone()
        adam.step()
    spiked = 1000 * g
    spiked[2] = 1e5
    m0, m1 = _adam_moments_step(stable, p, spiked)
    fed = (m1 - 0.9 * m0) / 0.1  # the gradient StableSPAM fed to its first moment
    # adaptive max-clipping then rescaling to the running-norm ratio: bounded by ||g||
    # history (here about 1), not the spike's 1e5
    assert float(fed.norm()) < 2.0
    assert float(fed.abs().max()) < float(fed.norm())
    q.grad = spiked.clone()
    a0 = adam.state[q]["exp_avg"].clone()
    adam.step()
    assert float(((adam.state[q]["exp_avg"] - 0.9 * a0) / 0.1).norm()) > 1e4


def test_controller_methods_cap_or_set_r():
    kw = dict(factor=1e4, spike_at=5, spike_steps=1, steps=8, eval_every=1)
    ctrl = stabilizer_run("mlp_ln", "controller", "adam", 1e-3, 0, **kw)
    assert ctrl.r_before[5] > 1 and max(ctrl.r_after) <= 1 + 1e-6
    plain = stabilizer_run("mlp_ln", "plain", "adam", 1e-3, 0, **kw)
    assert plain.stats == []  # bare optimizer
    set_mode = stabilizer_run("mlp_ln", "controller_set", "sgdm", 1e-2, 0, **kw)
    assert all(abs(r - 1.0) < 1e-3 for r in set_mode.r_after)
    lion = stabilizer_run("mlp_ln", "controller", "lion", 3e-4, 0, **kw)
    assert max(lion.r_after) <= 1 + 1e-6


def test_method_settings_and_applicability():
    assert applicable("zclip", "lion") and not applicable("spam", "sgdm")
    with pytest.raises(ValueError, match="Adam variant"):
        method_settings("adagc", "lion")
    with pytest.raises(ValueError, match="method"):
        method_settings("nope")
    assert method_settings("clip_grad")["clip_norm"] == 1.0
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer("rmsprop", [torch.nn.Parameter(torch.zeros(1))], 1e-3)


def test_markov_language_is_a_learnable_bigram_language():
    d = markov_language(seed=0, vocab=16, order=1, seq_len=12, n_train=256, n_test=64)
    assert d.X_train.shape == (256, 12) and d.y_test.shape == (64, 12)
    assert torch.equal(d.X_train[:, 1:], d.y_train[:, :-1])
    again = markov_language(seed=0, vocab=16, order=1, seq_len=12, n_train=256, n_test=64)
    assert torch.equal(d.X_train, again.X_train)
    # the most frequent successor of each token predicts far better than chance (1/16)
    counts = torch.zeros(16, 16)
    counts.index_put_(
        (d.X_train.flatten(), d.y_train.flatten()), torch.ones(256 * 12), accumulate=True
    )
    pred = counts.argmax(1)[d.X_test]
    assert float((pred == d.y_test).float().mean()) > 0.3
    with pytest.raises(ValueError):
        markov_language(order=0)


def test_lrsweep_helpers():
    ratio, lo, hi, n = stable_range([1e-3, 1e-2, 1e-1, 1.0], [0.90, 0.95, 0.94, 0.2], 0.02)
    assert (ratio, lo, hi, n) == (pytest.approx(10.0), 1e-2, 1e-1, 2)
    assert parse_method("adam+set0.5") == dict(
        optimizer="adam", mode="set", target_r=0.5, method="adam+set0.5"
    )
    assert parse_method("sgdm")["wrap"] is False
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("adam+foo")


# ----------------------------------------------------------------------------- quick presets


@pytest.mark.slow
def test_baselines_quick(run_quick):
    res = run_quick("baselines")
    s = res["metrics"]["summary"]
    for length in (1, 25):
        ctrl = s[f"adam/mlp_ln/10000x/{length}/controller"]
        assert ctrl["r_applied_max"] <= 1 + 1e-6
        assert ctrl["median"] > s[f"adam/mlp_ln/10000x/{length}/plain"]["median"] + 0.2
    assert "lion/tinylm/10000x/1/spam" not in s  # Adam variants run with Adam only
    assert s["lion/tinylm/10000x/25/controller"]["loss_median"] < 5.0
    assert {row[0] for row in res["tables"][3]["rows"]} >= {"zclip", "agc", "spam"}


@pytest.mark.slow
def test_lrsweep_quick(run_quick):
    res = run_quick("lrsweep")
    rng = res["metrics"]["stable_range"]
    assert rng["mlp_ln/adam+set1"]["count"] == 3  # set mode ignores the base LR
    finals = res["metrics"]["finals"]
    assert finals["mlp_ln/adam/10"]["median"] < 0.3  # plain Adam at LR 10 fails
    assert res["metrics"]["r_applied_max"]["mlp_ln/adam+clip/10"] <= 1 + 1e-6
