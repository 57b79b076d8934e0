"""The applied update is what the controller measures and scales: every parameter the
inner optimizers move (frozen ones included), the combined update of several inner
optimizers, and a compiled ``step``. Each promise is re-measured independently in
float64 at the old parameters on the training batch (``helpers.realised_r``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import applied_update, build_model, load_digits, parameter_state, realised_r
from torch import nn
from torch._dynamo.utils import counters

from ghoststep.controller import RadiusController

R_TOL = 1.001  # float32: the promise r <= target_r * 1.001


@pytest.fixture(scope="module")
def digits():
    X, y, _, _ = load_digits()
    return X, y


def _batch(digits, step: int, size: int = 64):
    X, y = digits
    g = torch.Generator().manual_seed(1000 + step)
    rows = torch.randint(0, X.shape[0], (size,), generator=g)
    return X[rows], y[rows]


def _proposed(model: nn.Module, optimizers) -> dict[str, torch.Tensor]:
    """The inner optimizers' own update from the current gradients (float64), on a copy."""
    twin_model, twin_opts = copy.deepcopy((model, optimizers))
    for p, q in zip(model.parameters(), twin_model.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    old = parameter_state(twin_model)
    for opt in twin_opts:
        opt.step()
    return applied_update(old, parameter_state(twin_model))


# ----------------------------------------------------------------- frozen mid-run


def _inner(name: str, params) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=0.05, weight_decay=0.5)
    return torch.optim.SGD(params, lr=2.0, momentum=0.9, weight_decay=0.01)


@pytest.mark.parametrize("method", ["jvp", "fast"])
@pytest.mark.parametrize("inner", ["adamw", "sgd"])
def test_frozen_mid_run_is_measured_and_scaled(digits, inner, method):
    """A layer frozen with requires_grad_(False) (gradients zeroed, not None) keeps
    moving by momentum / weight decay: that move is measured and scaled like the rest."""
    torch.manual_seed(0)
    model = build_model("mlp")
    opt = _inner(inner, model.parameters())
    ctrl = RadiusController(opt, model, mode="clip", target_r=1.0, method=method)
    head = model.net[2]
    worst, bound, frozen_moved, frozen_scaled = 0.0, 0, False, True
    for step in range(8):
        if step == 3:
            head.requires_grad_(False)
        x, y = _batch(digits, step)
        ctrl.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        old = parameter_state(model)
        proposed = _proposed(model, [opt]) if step >= 3 else None
        ctrl.step()
        if step < 3:
            continue
        applied = applied_update(old, parameter_state(model))
        worst = max(worst, realised_r(model, old, x, applied))
        frozen = ["net.2.weight", "net.2.bias"]
        frozen_moved |= any(bool(applied[n].abs().max() > 0) for n in frozen)
        scale = ctrl.last.scale
        bound += scale < 1.0
        for n in frozen:  # the frozen layer's move is the inner one times s
            frozen_scaled &= torch.allclose(applied[n], scale * proposed[n], 1e-4, 1e-7)
    print(f"\n{inner} {method}: max realised r {worst:.4f}, clip bound {bound}/5")
    assert worst <= R_TOL, worst
    assert bound >= 1 and frozen_moved and frozen_scaled


# ------------------------------------------------------------ several optimizers


def _muon(params) -> torch.optim.Optimizer:
    """torch.optim.Muon (2-D parameters only) where torch has it, else SGD momentum."""
    if hasattr(torch.optim, "Muon"):
        return torch.optim.Muon(params, lr=0.5, weight_decay=0.01)
    return torch.optim.SGD(params, lr=1.0, momentum=0.95, nesterov=True)


def _muon_adamw(method: str):
    """MLP with Muon on its weight matrices and AdamW on its biases, one controller,
    a scheduler on each inner optimizer."""
    torch.manual_seed(0)
    model = build_model("mlp")
    matrices = [p for p in model.parameters() if p.ndim == 2]
    vectors = [p for p in model.parameters() if p.ndim != 2]
    muon, adamw = _muon(matrices), torch.optim.AdamW(vectors, lr=0.2)
    ctrl = RadiusController([muon, adamw], model, mode="clip", target_r=1.0, method=method)
    schedulers = [
        torch.optim.lr_scheduler.StepLR(muon, step_size=2, gamma=0.5),
        torch.optim.lr_scheduler.LambdaLR(adamw, lambda k: 1.0 / (1 + k)),
    ]
    return model, (muon, adamw), ctrl, schedulers


def _train(digits, model, ctrl, schedulers, steps, start=0, check=False):
    worst, bound = 0.0, 0
    moved = {n: False for n, _ in model.named_parameters()}
    for step in range(start, start + steps):
        x, y = _batch(digits, step)
        ctrl.zero_grad()
        F.cross_entropy(model(x), y).backward()
        old = parameter_state(model)
        ctrl.step()
        for scheduler in schedulers:
            scheduler.step()
        if check:
            applied = applied_update(old, parameter_state(model))
            worst = max(worst, realised_r(model, old, x, applied))
            bound += ctrl.last.scale < 1.0
            for n, u in applied.items():
                moved[n] |= bool(u.abs().max() > 0)
    return worst, bound, moved


@pytest.mark.parametrize("method", ["jvp", "fast"])
def test_muon_and_adamw_in_one_controller(digits, method):
    """Combined update measured and scaled; both parameter sets train; groups, state
    and schedulers of both inner optimizers through the controller."""
    model, (muon, adamw), ctrl, schedulers = _muon_adamw(method)
    assert all(a is b for a, b in zip(ctrl.param_groups, muon.param_groups + adamw.param_groups))
    assert ctrl.optimizers == [muon, adamw] and "optimizers=[" in repr(ctrl)
    worst, bound, moved = _train(digits, model, ctrl, schedulers, 6, check=True)
    print(f"\nmuon+adamw {method}: max realised r {worst:.4f}, clip bound {bound}/6")
    assert worst <= R_TOL, worst
    assert bound >= 1 and all(moved.values()), moved
    # StepLR(2, 0.5) on Muon, LambdaLR 1 / (1 + k) on AdamW, after 6 steps
    assert ctrl.param_groups[0]["lr"] == pytest.approx(0.5 * 0.5**3)
    assert ctrl.param_groups[-1]["lr"] == pytest.approx(0.2 / 7)
    assert len(ctrl.state) == len(list(model.parameters()))
    ctrl.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["jvp", "fast"])
def test_muon_and_adamw_resume_is_bitwise(digits, method):
    """state_dict of the controller (a list of the inner states) and the schedulers:
    4 + 4 steps resumed equal 8 uninterrupted steps bitwise."""
    model, _, ctrl, schedulers = _muon_adamw(method)
    _train(digits, model, ctrl, schedulers, 8)
    expected = parameter_state(model)

    model, _, ctrl, schedulers = _muon_adamw(method)
    _train(digits, model, ctrl, schedulers, 4)
    saved = copy.deepcopy(
        (model.state_dict(), ctrl.state_dict(), [s.state_dict() for s in schedulers])
    )
    # one torch-layout dict over both: the groups concatenated, the ids counted on
    assert len(saved[1]["param_groups"]) == len(ctrl.param_groups) == 2

    model, _, ctrl, schedulers = _muon_adamw(method)
    model.load_state_dict(saved[0])
    ctrl.load_state_dict(saved[1])
    for scheduler, state in zip(schedulers, saved[2], strict=True):
        scheduler.load_state_dict(state)
    _train(digits, model, ctrl, schedulers, 4, start=4)
    for n, p in parameter_state(model).items():
        assert torch.equal(p, expected[n]), n


def test_scheduler_on_the_controller_drives_every_inner_optimizer(digits):
    model, (muon, adamw), ctrl, _ = _muon_adamw("fast")
    scheduler = torch.optim.lr_scheduler.LambdaLR(ctrl, lambda k: 0.5**k)
    _train(digits, model, ctrl, [scheduler], 2)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.5 * 0.25)
    assert adamw.param_groups[0]["lr"] == pytest.approx(0.2 * 0.25)


def test_one_optimizer_state_dict_keeps_its_format(digits):
    torch.manual_seed(0)
    model = build_model("mlp")
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=0.1), model)
    assert ctrl.state_dict()["param_groups"][0]["params"] == list(range(4))
    with pytest.raises(ValueError, match="wraps 2"):
        RadiusController(
            [torch.optim.Adam([model.net[0].weight]), torch.optim.Adam([model.net[2].weight])],
            model,
        ).load_state_dict(ctrl.state_dict())


def test_rerun_with_several_optimizers_is_refused():
    torch.manual_seed(0)
    model = build_model("mlp")
    matrices = [p for p in model.parameters() if p.ndim == 2]
    vectors = [p for p in model.parameters() if p.ndim != 2]
    with pytest.raises(ValueError, match="rerun"):
        RadiusController(
            [torch.optim.SGD(matrices, lr=0.1), torch.optim.Adam(vectors)],
            model,
            scaled_update="rerun",
        )


def test_two_controllers_on_one_model_are_refused(digits):
    """One controller per optimizer measures each part alone while the model moves by
    their sum: the second controller's first step names the list form."""
    torch.manual_seed(0)
    model = build_model("mlp")
    matrices = [p for p in model.parameters() if p.ndim == 2]
    vectors = [p for p in model.parameters() if p.ndim != 2]
    muon, adamw = _muon(matrices), torch.optim.AdamW(vectors, lr=0.2)
    ctrl_a, ctrl_b = RadiusController(muon, model), RadiusController(adamw, model)
    x, y = _batch(digits, 0)
    F.cross_entropy(model(x), y).backward()
    ctrl_a.step()
    with pytest.raises((ValueError, RuntimeError), match=r"RadiusController\(\[opt_a, opt_b\]"):
        ctrl_b.step()


def test_sequential_controllers_on_one_model_are_fine(digits):
    """A new controller after new forwards (the old one idle, or discarded) steps."""
    torch.manual_seed(0)
    model = build_model("mlp")
    first = RadiusController(torch.optim.Adam(model.parameters(), lr=0.1), model)
    for step in range(2):
        x, y = _batch(digits, step)
        first.zero_grad()
        F.cross_entropy(model(x), y).backward()
        first.step()
    second = RadiusController(torch.optim.SGD(model.parameters(), lr=0.1), model)
    for step in range(2, 4):
        x, y = _batch(digits, step)
        second.zero_grad()
        F.cross_entropy(model(x), y).backward()
        second.step()
    assert second.step_count == 2 and first.step_count == 2


# ------------------------------------------------------------------ compiled step


def _compiled_run(digits, mode: str, how: str, method: str = "jvp", steps: int = 5):
    """Parameters and applied r after ``steps`` Adam steps at a 100x learning rate;
    ``how``: "eager", "step" (``opt.step = torch.compile(opt.step)``), "function" (a
    compiled function calling ``opt.step()``) or "plain" (Adam alone)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model("mlp")
    adam = torch.optim.Adam(model.parameters(), lr=0.3)
    opt = adam if how == "plain" else RadiusController(adam, model, mode=mode, method=method)
    if how == "step":
        opt.step = torch.compile(opt.step, backend="eager")
    step_fn = torch.compile(lambda: opt.step(), backend="eager") if how == "function" else opt.step
    worst, bound = 0.0, 0
    for step in range(steps):
        x, y = _batch(digits, step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        old = parameter_state(model)
        step_fn()
        applied = applied_update(old, parameter_state(model))
        worst = max(worst, realised_r(model, old, x, applied))
        bound += how != "plain" and opt.last.scale < 1.0
    return parameter_state(model), worst, bound


@pytest.mark.parametrize("how", ["step", "function"])
@pytest.mark.parametrize(
    ("mode", "method"), [("clip", "jvp"), ("set", "jvp"), ("monitor", "jvp"), ("clip", "fast")]
)
def test_compiled_step_is_the_eager_step(digits, mode, method, how):
    """``opt.step = torch.compile(opt.step)`` and a compiled function calling
    ``opt.step()``: bitwise the uncompiled controller (which binds in clip / set mode)."""
    eager, worst, bound = _compiled_run(digits, mode, "eager", method)
    compiled, worst_c, bound_c = _compiled_run(digits, mode, how, method)
    print(f"\n{mode} {method} {how}: max realised r eager {worst:.4f}, compiled {worst_c:.4f}")
    for n, p in compiled.items():
        assert torch.equal(p, eager[n]), n
    if mode == "monitor":  # bitwise invisible: the plain optimizer's run
        plain, _, _ = _compiled_run(digits, mode, "plain")
        for n, p in compiled.items():
            assert torch.equal(p, plain[n]), n
        assert worst_c > 1.5  # the spike the other modes clip
    else:
        assert worst_c <= R_TOL and bound_c >= 1
        if mode == "set":
            assert worst_c >= 0.95


def test_compiled_inner_optimizer_under_monitor_is_invisible(digits):
    """The user's compiled inner step (inductor) runs compiled inside the controller:
    monitor mode gives the plain compiled optimizer's parameters bitwise."""

    def run(wrapped: bool):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = build_model("mlp")
        adam = torch.optim.Adam(model.parameters(), lr=0.3)
        adam.step = torch.compile(adam.step)
        opt = RadiusController(adam, model, mode="monitor", method="jvp") if wrapped else adam
        for step in range(3):
            x, y = _batch(digits, step)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return parameter_state(model)

    plain = run(False)
    counters.clear()
    monitored = run(True)
    assert counters["stats"]["unique_graphs"] >= 1  # the inner step ran compiled
    for n, p in monitored.items():
        assert torch.equal(p, plain[n]), n
