"""The controller with the optimizers and heads people use (issue: real clients).

Schedule-free and Lookahead (an iterate of their own), SAM and LBFGS (closures),
binary classifiers (one logit), a measurement that fails, the clip guarantee after
float rounding, and batches whose every position is masked.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import build_model
from torch import nn

from ghoststep import RadiusController, measure
from ghoststep.controller import Sampling


def _accuracy(model, X, y) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


# ------------------------------------------------------------- optimizers with an iterate


def _schedule_free_spike(digits, scaled_update: str | None) -> float:
    """AdamW schedule-free on digits, LR x10^4 from step 50 to 200; test accuracy."""
    schedulefree = pytest.importorskip("schedulefree")
    Xtr, ytr, Xte, yte = digits
    torch.manual_seed(0)
    model = build_model("mlp")
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=2e-3)
    if scaled_update is not None:
        opt = RadiusController(opt, model, mode="clip", scaled_update=scaled_update)
    opt.train()
    gen = torch.Generator().manual_seed(0)
    for step in range(200):
        if step == 50:
            for group in opt.param_groups:
                group["lr"] *= 1e4
        idx = torch.randperm(len(Xtr), generator=gen)[:64]
        opt.zero_grad()
        F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
        opt.step()
    opt.eval()  # schedule-free: the parameters become the average x
    return _accuracy(model, Xte, yte)


def test_schedule_free_survives_a_10000x_spike(digits):
    rerun = _schedule_free_spike(digits, "auto")
    rescaled = _schedule_free_spike(digits, "interpolate")  # rescaling y alone
    bare = _schedule_free_spike(digits, None)
    print(f"\nschedule-free x1e4: rerun {rerun:.3f}, interpolate {rescaled:.3f}, bare {bare:.3f}")
    assert rerun >= 0.90
    assert rescaled < 0.5 and bare < 0.5  # what "rerun" exists for


def test_iterate_optimizers_are_detected_and_train_eval_forwarded():
    schedulefree = pytest.importorskip("schedulefree")
    model = build_model("mlp")
    sf = schedulefree.AdamWScheduleFree(model.parameters(), lr=1e-3)
    ctrl = RadiusController(sf, model)
    assert ctrl.scaled_update == "rerun"
    ctrl.train()
    assert sf.param_groups[0]["train_mode"] is True
    ctrl.eval()
    assert sf.param_groups[0]["train_mode"] is False
    adam = RadiusController(torch.optim.Adam(model.parameters()), model)
    assert adam.scaled_update == "interpolate"
    adam.train(), adam.eval()  # no-ops for optimizers without them
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    lookahead = pytorch_optimizer.Lookahead(torch.optim.SGD(model.parameters(), lr=0.1))
    assert RadiusController(lookahead, model).scaled_update == "rerun"
    with pytest.raises(ValueError, match="scaled_update"):
        RadiusController(torch.optim.SGD(model.parameters(), lr=0.1), model, scaled_update="x")


def test_rerun_scales_the_learning_rate_from_the_restored_state(digits):
    """With plain Adam, "rerun" must give old + (s-scaled Adam step): Adam's update is
    linear in lr, so it equals the interpolated one, and the inner state advances once."""
    Xtr, ytr, _, _ = digits
    runs = {}
    for kind in ("interpolate", "rerun"):
        torch.manual_seed(0)
        model = build_model("mlp")
        opt = RadiusController(
            torch.optim.Adam(model.parameters(), lr=1.0), model, scaled_update=kind
        )
        for i in range(3):
            opt.zero_grad()
            F.cross_entropy(
                model(Xtr[64 * i : 64 * (i + 1)]), ytr[64 * i : 64 * (i + 1)]
            ).backward()
            opt.step()
            assert opt.last.scale < 1.0 and opt.last.r_after <= 1.0
        assert opt.param_groups[0]["lr"] == 1.0  # restored after the rerun
        runs[kind] = (model, opt)
    (a, opt_a), (b, opt_b) = runs["interpolate"], runs["rerun"]
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert int(sa["step"]) == int(sb["step"]) == 3
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"])


# ------------------------------------------------------------------ closure optimizers


def test_lbfgs_is_refused_at_construction():
    model = build_model("mlp")
    with pytest.raises(ValueError, match="LBFGS"):
        RadiusController(torch.optim.LBFGS(model.parameters()), model)


def test_sam_is_refused_with_the_recipe_and_the_recipe_works(digits):
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    Xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = build_model("mlp")
    sam = pytorch_optimizer.SAM(model.parameters(), torch.optim.Adam, lr=1.0)
    with pytest.raises(ValueError, match=r"sam.base_optimizer = RadiusController"):
        RadiusController(sam, model)
    sam.base_optimizer = RadiusController(sam.base_optimizer, model, mode="clip")
    for i in range(3):
        x, y = Xtr[64 * i : 64 * (i + 1)], ytr[64 * i : 64 * (i + 1)]
        F.cross_entropy(model(x), y).backward()
        sam.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        sam.second_step(zero_grad=True)
    history = sam.base_optimizer.history
    assert len(history) == 3 and all(s.scale < 1.0 and s.r_after <= 1.0 for s in history)


# ---------------------------------------------------------------------- binary heads


class _Binary(nn.Module):
    def __init__(self, flat: bool):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
        self.flat = flat

    def forward(self, x):
        z = self.net(x)
        return z[:, 0] if self.flat else z  # (B,) or (B, 1)


@pytest.mark.parametrize("flat", [False, True], ids=["B1", "B"])
def test_binary_logit_is_the_two_class_softmax(flat):
    torch.manual_seed(0)
    model = _Binary(flat)
    x = torch.randn(9, 6)
    v = [torch.randn_like(p) for p in model.parameters()]
    m = measure(model, x, v, exact=True)
    # independent: the raw single logit z and its slope a (torch.func), closed forms
    params = {n: p.detach() for n, p in model.named_parameters()}
    z, a = torch.func.jvp(
        lambda ps: torch.func.functional_call(model, ps, (x,)).reshape(-1),
        (params,),
        (dict(zip(params, v, strict=True)),),
    )
    z, a = z.double(), a.double()
    assert m.rho_a == pytest.approx(math.pi / float(a.abs().max()), rel=1e-6)
    torch.testing.assert_close(m.rho_samples.double(), math.pi / a.abs(), rtol=1e-6, atol=0)
    exact = torch.sqrt(z**2 + math.pi**2) / a.abs()
    torch.testing.assert_close(m.exact.double(), exact, rtol=1e-5, atol=0)

    ctrl = RadiusController(
        torch.optim.SGD(model.parameters(), lr=50.0), model, mode="clip", method="jvp"
    )
    y = (x[:, 0] > 0).float()
    old = copy.deepcopy(model)
    out = model(x)
    F.binary_cross_entropy_with_logits(out, y if flat else y[:, None]).backward()
    ctrl.step()
    assert ctrl.last.scale < 1.0
    step = [(p - q).detach() for p, q in zip(model.parameters(), old.parameters(), strict=True)]
    assert 0.99 < measure(old, x, step, tau=1.0).r <= 1.0


# ------------------------------------------------------------- a measurement that fails


class _FusedAttention(nn.Module):
    """Calls the CPU flash-attention op directly: it has no forward-mode AD."""

    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.proj(x)[:, None]
        h = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(h, h, h)[0]
        return self.head(h[:, 0].mean(1))


def test_failed_measurement_leaves_the_optimizer_as_before():
    torch.manual_seed(0)
    model = _FusedAttention()
    before = [p.detach().clone() for p in model.parameters()]
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=0.1), model, method="jvp")
    x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        ctrl.step()
    assert len(ctrl.optimizer.state) == 0  # Adam never saw the gradient
    assert ctrl.step_count == 0 and not ctrl.history
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    # the same gradient, now with a method that works: one step, counted once
    ctrl.method = "fast"
    model(x)  # the training forward the step measures
    ctrl.step()
    assert ctrl.step_count == 1 and len(ctrl.history) == 1
    assert all(int(s["step"]) == 1 for s in ctrl.optimizer.state.values())


# ------------------------------------------------------- the clip after float rounding


def test_clip_holds_after_float32_rounding():
    """Large weights (|w| ~ 3000): rounding old + s p in float32 moves each weight by up
    to half an ulp (1.2e-4), a visible share of a step of length ~rho. The realised step,
    re-measured in float64, must still be within target_r."""
    torch.manual_seed(0)
    model = nn.Linear(20, 5)
    with torch.no_grad():
        model.weight.add_(3000.0)
    x = torch.randn(32, 20)
    y = torch.randint(0, 5, (32,))
    ctrl = RadiusController(
        torch.optim.SGD(model.parameters(), lr=1e3), model, mode="clip", method="jvp"
    )
    worst = 0.0
    for _ in range(5):
        old = copy.deepcopy(model).double()
        ctrl.zero_grad()
        F.cross_entropy(model(x), y).backward()
        ctrl.step()
        assert ctrl.last.scale < 1.0
        step = [p.detach().double() - q for p, q in zip(model.parameters(), old.parameters())]
        worst = max(worst, measure(old, x.double(), step, tau=1.0).r)
    assert 0.99 < worst <= 1.0


# ----------------------------------------------------------------- fully masked batches


@pytest.mark.parametrize("mode", ["clip", "monitor"])
def test_fully_masked_batch_warns_and_follows_the_policy(mode):
    torch.manual_seed(0)
    model = build_model("mlp")
    twin = copy.deepcopy(model)
    ctrl = RadiusController(
        torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
        model,
        mode=mode,
        sampling=Sampling(
            ignore_index=-100, targets_fn=lambda inputs: torch.full((inputs.shape[0],), -100)
        ),
    )
    bare = torch.optim.SGD(twin.parameters(), lr=0.5, momentum=0.9)
    x, y = torch.rand(16, 64), torch.randint(0, 10, (16,))
    before = [p.detach().clone() for p in model.parameters()]
    for m, opt in ((model, ctrl), (twin, bare)):
        F.cross_entropy(m(x), y).backward()
        if opt is ctrl:
            with pytest.warns(RuntimeWarning, match="every position"):
                opt.step()
        else:
            opt.step()
    if mode == "clip":  # no radius bounds the update: skipped before the inner step
        assert ctrl.last.skipped and ctrl.skipped_steps == 1
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
        assert not ctrl.optimizer.state  # SGD's momentum never saw the gradient
    else:  # monitor never changes an update
        assert not ctrl.last.skipped and math.isinf(ctrl.last.rho_a)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
