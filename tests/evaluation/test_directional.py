"""The one evaluation path: jvp / fd / fast agree, leave no trace, and the controller's
one-forward "fast" radius matches the exact one (dropout masks, BatchNorm included)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import build_model
from torch import nn

from ghoststep.controller import RadiusController, Sampling
from ghoststep.evaluation import (
    call_at,
    directional,
    fast_step,
    forward,
    full_float32,
    refined_step,
    resolve_direction,
    tf32_allowed,
)
from ghoststep.evaluation._replay import capture_rng, preserved_buffers
from ghoststep.radius import logit_spread, radius_from_spread, step_scale


class DropoutTransformer(nn.Module):
    """One pre-LN attention block with dropout on the attention weights, the attention
    output and the FFN output (explicit softmax: forward AD works on the CPU)."""

    def __init__(self, d: int = 16, heads: int = 2, classes: int = 5, p: float = 0.2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(4, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff1, self.ff2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.drop = nn.Dropout(p)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, t, d = h.shape
        q, k, v = (
            z.reshape(b, t, self.heads, -1).transpose(1, 2)
            for z in self.qkv(self.ln1(h)).chunk(3, -1)
        )
        weights = self.drop(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1))
        h = h + self.drop(self.proj((weights @ v).transpose(1, 2).reshape(b, t, d)))
        h = h + self.drop(self.ff2(F.gelu(self.ff1(self.ln2(h)))))
        return self.head(h.mean(1))


def _case(name: str):
    """(model in train mode, inputs, targets) for each model family of the issue."""
    torch.manual_seed(0)
    if name == "transformer_dropout":
        return DropoutTransformer().train(), torch.randn(16, 6, 4), torch.randint(0, 5, (16,))
    if name == "tinylm":
        model = build_model("tinylm", vocab_size=97, max_len=16)
        idx = torch.randint(0, 97, (8, 17))
        return model.train(), idx[:, :-1], idx[:, 1:]
    model = build_model(name)
    return model.train(), torch.rand(32, 64), torch.randint(0, 10, (32,))


def _random(model):
    return {n: torch.randn_like(p) for n, p in model.named_parameters()}


def _loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


CASES = ["mlp", "cnn_bn", "transformer_dropout", "tinylm"]


@pytest.mark.parametrize("name", CASES)
def test_fast_agrees_with_jvp_and_fd(name):
    model, x, _ = _case(name)
    tangents = resolve_direction(model, _random(model))
    rng = capture_rng()
    _, exact = directional(model, (x,), {}, tangents, method="jvp", rng=rng)
    _, central = directional(model, (x,), {}, tangents, method="fd", rng=rng)
    _, fast = directional(model, (x,), {}, tangents, method="fast", rng=rng)
    ref = logit_spread(central.double())
    assert torch.allclose(logit_spread(exact.double()), ref, rtol=1e-4, atol=1e-6)
    # "fast" is a float32 one-sided difference: the batch radius within 1 %, the typical
    # sample too (a secant: single samples of ReLU nets can be off where units switch)
    error = logit_spread(fast.double()) / ref - 1
    assert abs(float(logit_spread(fast.double()).max() / ref.max()) - 1) < 1e-2
    assert float(error.abs().median()) < 1e-2


def test_fast_needs_the_same_dropout_masks():
    """The test above can fail: a baseline drawn with other masks is far off."""
    model, x, _ = _case("transformer_dropout")
    tangents = resolve_direction(model, _random(model))
    rng = capture_rng()
    _, exact = directional(model, (x,), {}, tangents, method="jvp", rng=rng)
    torch.manual_seed(123)
    other = forward(model, (x,), {}, rng=capture_rng())  # other masks
    _, wrong = directional(model, (x,), {}, tangents, method="fast", rng=rng, baseline=other)
    assert float(logit_spread(wrong).max()) > 10 * float(logit_spread(exact).max())


@pytest.mark.parametrize("method", ["jvp", "fd", "fast"])
def test_evaluation_leaves_no_trace(method):
    model, x, _ = _case("cnn_bn")  # BatchNorm in train mode updates its buffers
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    tangents = resolve_direction(model, _random(model))
    rng = torch.get_rng_state()
    directional(model, (x,), {}, tangents, method=method)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers, strict=True))
    assert torch.equal(torch.get_rng_state(), rng)


class CountingNorm(nn.Module):
    """A BatchNorm beside a module-owned counter that its forward increments."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.norm(x)


def test_preserved_buffers_restores_every_buffer_even_on_error():
    model = CountingNorm().train()
    x = torch.randn(8, 4) * 3 + 1
    before = [b.clone() for b in model.buffers()]
    with preserved_buffers(model):
        inside = model(x)  # BatchNorm writes nothing; the counter is restored below
        assert model.norm.num_batches_tracked == 0 and model.calls == 1
    assert model.norm.track_running_stats
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), before, strict=True))
    # the same normalization as a training forward (batch statistics)
    torch.testing.assert_close(inside, copy.deepcopy(model)(x), rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError), preserved_buffers(model):
        model(x)
        raise RuntimeError("boom")
    assert model.norm.track_running_stats
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), before, strict=True))


def test_full_float32_turns_tf32_off_and_restores_it():
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
        assert tf32_allowed()
        with full_float32():
            assert not tf32_allowed()
        assert torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tf32", [True, False])
def test_cuda_fast_radius_matches_exact_with_and_without_tf32(tf32, monkeypatch):
    """On a GPU the training forward's convolutions round to TF32 by default: "fast"
    then measures its own full-float32 baseline; either way the radius is the exact
    one (a full-float32 JVP of the applied update at the same parameters) within 2 %."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    model, x, y = _case("cnn_bn")
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    ctrl = RadiusController(
        torch.optim.Adam(model.parameters(), lr=1e-2), model, mode="monitor", method="fast"
    )
    for step in range(4):
        old = [p.detach().clone() for p in model.parameters()]
        _train_step(model, ctrl, x, y, seed=step)
        new = [p.detach().clone() for p in model.parameters()]
        update = [a - b for a, b in zip(new, old, strict=True)]
        tau = math.sqrt(sum(float(u.double().pow(2).sum()) for u in update))
        with torch.no_grad():
            for p, o in zip(model.parameters(), old, strict=True):
                p.copy_(o)
        with full_float32():
            _, slopes = directional(model, (x,), {}, update, method="jvp")
        rho = radius_from_spread(float(logit_spread(slopes).max()), 1.0) * tau
        assert ctrl.last.rho_a == pytest.approx(rho, rel=0.02)
        with torch.no_grad():
            for p, n in zip(model.parameters(), new, strict=True):
                p.copy_(n)


def test_fast_refuses_low_precision_and_refines_its_step():
    model = nn.Linear(4, 3).to(torch.bfloat16)
    tangents = resolve_direction(model, [torch.ones_like(p) for p in model.parameters()])
    with pytest.raises(ValueError, match='method="jvp"'):
        directional(model, (torch.ones(2, 4, dtype=torch.bfloat16),), {}, tangents, method="fast")
    assert refined_step(1.0, 0.05) is None  # moved 0.05: fine
    assert refined_step(1.0, 10.0) == pytest.approx(0.001)  # too far: 1000x smaller
    assert refined_step(2.0, 1e-4) == pytest.approx(200.0)  # too little
    assert refined_step(1.0, 0.0) is None and refined_step(1.0, math.nan) is None
    assert fast_step(100.0, 2.0, torch.float32) == pytest.approx(
        math.sqrt(torch.finfo(torch.float32).eps) * 50.0
    )
    # a known move per unit step sets it, and the parameter norm is never computed
    assert fast_step(lambda: 1 / 0, 1.0, torch.float32, moved_per_step=0.5) == 0.02


def test_call_at_is_differentiable_in_t():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    tangents = resolve_direction(model, _random(model))
    t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    (dz,) = torch.autograd.grad(call_at(model, (x,), {}, tangents, t).sum(), t)
    _, a = directional(model, (x,), {}, tangents, method="jvp")
    assert float(dz) == pytest.approx(float(a.sum()), rel=1e-10)


# ------------------------------------------------------------------ step rule (radius)


def test_radius_from_spread_and_step_scale_closed_forms():
    assert radius_from_spread(2.0, 3.0) == pytest.approx(1.5 * math.pi)
    assert radius_from_spread(0.0) == math.inf
    spread = torch.tensor([0.0, math.pi, math.inf], dtype=torch.float64)
    assert radius_from_spread(spread).tolist() == [math.inf, 1.0, 0.0]
    assert radius_from_spread(radius_from_spread(0.7, 2.0), 2.0) == pytest.approx(0.7)
    assert step_scale(4.0, 1.0, "clip", 2.0) == pytest.approx(0.5)
    assert step_scale(0.5, 1.0, "clip") == 1.0  # inside: untouched
    assert step_scale(0.5, 1.0, "set", 2.0) == pytest.approx(4.0)  # set may grow the step
    assert step_scale(4.0, 1.0, "monitor") == 1.0
    assert step_scale(4.0, math.inf, "set") == 1.0
    with pytest.raises(ValueError, match="mode must be one of"):
        step_scale(1.0, 1.0, "cap")


# ------------------------------------------------------------------------ controller


def _twins(name: str, methods, mode: str = "monitor", lr: float = 1e-2):
    model, x, y = _case(name)
    runs = []
    for method in methods:
        twin = copy.deepcopy(model)
        opt = torch.optim.Adam(twin.parameters(), lr=lr)
        if method is not None:
            opt = RadiusController(opt, twin, mode=mode, method=method)
        runs.append((twin, opt))
    return runs, x, y


def _train_step(model, opt, x, y, seed: int):
    torch.manual_seed(seed)  # the same dropout masks in every twin's training forward
    opt.zero_grad()
    _loss(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("name", CASES)
def test_controller_fast_radius_matches_jvp(name):
    (m_jvp, jvp), (m_fast, fast), (m_plain, plain) = _twins(name, ["jvp", "fast", None])[0]
    _, x, y = _case(name)
    ratios = []
    for step in range(6):
        for model, opt in ((m_jvp, jvp), (m_fast, fast), (m_plain, plain)):
            _train_step(model, opt, x, y, seed=step)
        ratios.append(fast.last.rho_a / jvp.last.rho_a)
        # monitor mode: both follow the bare optimizer bitwise; buffers as in plain training
        for a, b, c in zip(m_jvp.parameters(), m_fast.parameters(), m_plain.parameters()):
            assert torch.equal(a, c) and torch.equal(b, c)
        for a, b, c in zip(m_jvp.buffers(), m_fast.buffers(), m_plain.buffers()):
            assert torch.equal(a, c) and torch.equal(b, c)
    assert max(abs(r - 1.0) for r in ratios) < 0.02, ratios


@pytest.mark.parametrize("method", ["jvp", "fd", "fast"])
def test_controller_clips_and_keeps_rng_for_every_method(method):
    ((model, ctrl),) = _twins("transformer_dropout", [method], mode="clip", lr=10.0)[0]
    _, x, y = _case("transformer_dropout")
    torch.manual_seed(0)
    model.train()
    for _ in range(3):
        ctrl.zero_grad()
        _loss(model(x), y).backward()
        before = torch.get_rng_state()
        ctrl.step()
        assert torch.equal(torch.get_rng_state(), before)  # training RNG stream untouched
        assert ctrl.last.scale < 1.0  # lr 10: the clip binds
        # at the clip, less the method's margin (jvp 1e-5, fd / fast 1e-2)
        assert 1.0 - ctrl.margin - 1e-4 <= ctrl.last.r_after <= 1.0 - ctrl.margin


def test_controller_fast_under_autocast_measures_its_own_baseline():
    (model, ctrl), (twin, exact) = _twins("mlp", ["fast", "jvp"])[0]
    _, x, y = _case("mlp")
    for m, opt in ((model, ctrl), (twin, exact)):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(x)
        _loss(logits.float(), y).backward()
        opt.step()
    assert ctrl.last.rho_a == pytest.approx(exact.last.rho_a, rel=0.02)


@pytest.mark.parametrize(
    "name, reused", [("mlp", True), ("cnn_bn", False), ("transformer_dropout", False)]
)
def test_sampled_fast_reuses_training_logits_only_for_independent_rows(name, reused):
    """subset=8, buffer_size=4: the subset's baseline is sliced from the training
    forward's logits when rows are independent (no RNG drawn, no train-mode BatchNorm),
    so only the 4 buffer rows get a baseline forward; otherwise all 12 rows do. Either
    way the radius agrees with the exact sampled one."""
    (model, inner), (twin, inner_twin) = _twins(name, [None, None])[0]
    fast = RadiusController(
        inner, model, mode="monitor", method="fast", sampling=Sampling(subset=8, buffer_size=4)
    )
    exact = RadiusController(
        inner_twin, twin, mode="monitor", sampling=Sampling(subset=8, buffer_size=4)
    )
    _, x, y = _case(name)
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    for step in range(3):
        for m, opt in ((model, fast), (twin, exact)):
            torch.manual_seed(step)
            opt.zero_grad()
            _loss(m(x), y).backward()
            sizes.clear()
            opt.step()
            if opt is fast:
                forwards = list(sizes)
        assert abs(fast.last.rho_a / exact.last.rho_a - 1.0) < 0.02
        if reused:  # step 0: only the shift (and maybe a redo); then the 4 buffer rows first
            assert forwards[0] == (8 if step == 0 else 4), forwards
            assert step > 0 or set(forwards) == {8}
        else:  # a baseline forward of all evaluated rows first
            assert forwards[0] == (8 if step == 0 else 12), forwards
            assert len(forwards) >= 2
