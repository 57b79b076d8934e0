"""RadiusController: exact composition with the inner optimizer, radius control, plumbing."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import build_model, gloo_rank
from torch import nn
from torch.utils import _pytree as pytree

import ghoststep.evaluation._directional
from ghoststep.controller import RadiusController, Sampling
from ghoststep.measurement import logit_slopes

pytestmark = pytest.mark.usefixtures("flush_denormals")


def _batches(n_rows: int, n: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, n_rows, (size,), generator=g) for _ in range(n)]


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _params_copy(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in _trainable(model)]


def _r_of_update(model_at_old: nn.Module, x: torch.Tensor, update: list[torch.Tensor]) -> float:
    """Reference: r = ||d|| / rho_a(d) = max_x spread(slopes along d) / pi (d unnormalized)."""
    _, slopes = logit_slopes(model_at_old, x, update)
    spread = slopes.amax(-1) - slopes.amin(-1)
    return float(spread.max()) / math.pi


OPTIMIZERS = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "sgd_nesterov": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.1),
    "rmsprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr, momentum=0.5),
    "two_groups": lambda params, lr: torch.optim.Adam(
        [{"params": params[:2], "lr": lr}, {"params": params[2:], "lr": lr / 3}], lr=lr
    ),
}
# learning rates large enough that clipping binds for most steps
BIG_LR = {"sgd": 5.0, "sgd_nesterov": 2.0, "adam": 0.3, "adamw": 0.3, "rmsprop": 0.1}


def _make_opt(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return OPTIMIZERS[name](_trainable(model), lr)


def _state_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> bool:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    if sa.keys() != sb.keys():
        return False
    for k in sa:
        for key, va in sa[k].items():
            vb = sb[k][key]
            if isinstance(va, torch.Tensor):
                if not torch.equal(va, vb):
                    return False
            elif va != vb:
                return False
    return True


@pytest.mark.parametrize("mode", ["clip", "set"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_applied_update_is_scaled_inner_update(digits, opt_name, mode):
    Xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = build_model("mlp").double()
    lr = BIG_LR.get(opt_name, 0.3)
    target = 1.0 if mode == "clip" else 0.5
    ctrl = RadiusController(
        _make_opt(opt_name, model, lr), model, mode=mode, target_r=target, method="jvp"
    )
    scales = []
    for idx in _batches(len(Xtr), 4, 64, seed=1):
        x, y = Xtr[idx].double(), ytr[idx]
        # unwrapped twin from the identical state: same parameters, same inner state
        twin = copy.deepcopy(model)
        twin_opt = _make_opt(opt_name, twin, lr)
        twin_opt.load_state_dict(copy.deepcopy(ctrl.optimizer.state_dict()))
        at_old = copy.deepcopy(model)
        old = _params_copy(model)

        ctrl.zero_grad()
        F.cross_entropy(model(x), y).backward()
        ctrl.step()
        twin_opt.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        twin_opt.step()

        s = ctrl.last.scale
        scales.append(s)
        applied = [p.detach() - o for p, o in zip(_trainable(model), old, strict=True)]
        proposed = [p.detach() - o for p, o in zip(_trainable(twin), old, strict=True)]
        for d, p in zip(applied, proposed, strict=True):
            torch.testing.assert_close(d, s * p, rtol=1e-9, atol=1e-12)
        # the inner optimizer's state advanced exactly as without the wrapper
        assert _state_equal(ctrl.optimizer, twin_opt)
        # r after control, recomputed independently along the applied update
        r_after = _r_of_update(at_old, x, applied)
        tau = math.sqrt(sum(float(p.pow(2).sum()) for p in proposed))
        assert ctrl.last.tau == pytest.approx(tau, rel=1e-9)
        assert r_after == pytest.approx(ctrl.last.r_after, rel=1e-6)
        if mode == "clip":
            assert r_after <= target + 1e-6
            assert s <= 1.0
        else:  # the target, less the jvp margin (1e-5)
            assert r_after == pytest.approx(target * (1.0 - ctrl.margin), rel=1e-6)
    if mode == "clip":
        assert min(scales) < 1.0  # the cap actually bound


@pytest.mark.parametrize("model_name", ["mlp", "cnn_bn"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_monitor_mode_is_identity(digits, opt_name, model_name):
    Xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = build_model(model_name).double()
    twin = copy.deepcopy(model)
    ctrl = RadiusController(_make_opt(opt_name, model, 0.01), model, mode="monitor")
    twin_opt = _make_opt(opt_name, twin, 0.01)
    for idx in _batches(len(Xtr), 5, 32, seed=2):
        x, y = Xtr[idx].double(), ytr[idx]
        for m, o in ((model, ctrl), (twin, twin_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        assert ctrl.last.scale == 1.0 and not ctrl.last.skipped
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p, q)  # bitwise, step for step
        for b, c in zip(model.buffers(), twin.buffers(), strict=True):
            assert torch.equal(b, c)  # BatchNorm running stats untouched by the measurement
    assert _state_equal(ctrl.optimizer, twin_opt)


def _lr_spike_run(digits, controlled: bool, seed: int = 0) -> float:
    Xtr, ytr, Xte, yte = digits
    torch.manual_seed(seed)
    model = build_model("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if controlled:
        opt = RadiusController(opt, model, mode="clip", target_r=1.0)
    for step, idx in enumerate(_batches(len(Xtr), 200, 64, seed=seed)):
        if step == 50:
            for group in opt.param_groups:
                group["lr"] *= 1000.0
        opt.zero_grad()
        F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
        opt.step()
    with torch.no_grad():
        return float((model(Xte).argmax(1) == yte).float().mean())


def test_lr_spike_protocol(digits):
    """The paper's spike protocol in miniature: Adam 1e-3, LR x1000 at step 50 for 150 steps."""
    plain = _lr_spike_run(digits, controlled=False)
    controlled = _lr_spike_run(digits, controlled=True)
    print(f"\nLR spike x1000: plain Adam acc {plain:.3f}, controller acc {controlled:.3f}")
    assert controlled >= 0.90
    assert plain < 0.60


def test_onecycle_scheduler_drives_inner_lr(digits):
    Xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = build_model("mlp")
    inner = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ctrl = RadiusController(inner, model)
    sched = torch.optim.lr_scheduler.OneCycleLR(ctrl, max_lr=0.5, total_steps=12)
    ref_opt = torch.optim.SGD(build_model("mlp").parameters(), lr=0.01, momentum=0.9)
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.5, total_steps=12)
    assert ctrl.param_groups is inner.param_groups
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "scheduler.step() before optimizer.step()"
        for i, idx in enumerate(_batches(len(Xtr), 10, 32)):
            ctrl.zero_grad()
            F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            lr_now = inner.param_groups[0]["lr"]
            ctrl.step()
            assert ctrl.last.lr == lr_now
            sched.step()
            ref_opt.step()
            ref.step()
            seen.append(inner.param_groups[0]["lr"])
            assert inner.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
            assert ctrl.param_groups[0]["momentum"] == inner.param_groups[0]["momentum"]
            if i == 4:  # Accelerate does this on prepare; the groups must stay shared
                ctrl.load_state_dict(ctrl.state_dict())
                assert ctrl.param_groups is inner.param_groups
    assert len(set(seen)) > 5  # the LR really moved


def _record(stats) -> dict[str, str]:
    """The scalar fields of a StepStats but its wall time, as reprs (equal reprs:
    bitwise-equal floats, NaN included)."""
    return {k: repr(v) for k, v in stats.as_dict().items() if k != "radius_seconds"}


def _tree_equal(a, b) -> bool:
    """Nested containers with equal structure and bitwise-equal tensors / equal values."""
    leaves_a, spec_a = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    return spec_a == spec_b and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        for x, y in zip(leaves_a, leaves_b, strict=True)
    )


def _train(model, ctrl, Xtr, ytr, batches):
    for idx in batches:
        ctrl.zero_grad()
        F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
        ctrl.step()


@pytest.mark.parametrize(
    "options",
    [{}, {"subset": 24, "buffer_size": 6, "window": 4, "mode": "set", "target_r": 0.8}],
    ids=["default", "subset_buffer_window"],
)
def test_checkpoint_resume_is_bit_identical(digits, options):
    Xtr, ytr, _, _ = digits
    batches = _batches(len(Xtr), 16, 48, seed=3)

    def fresh():
        torch.manual_seed(0)
        model = build_model("cnn_bn")
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        return model, RadiusController(opt, model, seed=7, **options)

    model, ctrl = fresh()
    _train(model, ctrl, Xtr, ytr, batches[:8])
    blob = io.BytesIO()
    saved = {"model": model.state_dict(), "opt": ctrl.state_dict()}
    torch.save(saved, blob)
    reference = copy.deepcopy(saved)
    _train(model, ctrl, Xtr, ytr, batches[8:])

    blob.seek(0)
    loaded = torch.load(blob, weights_only=False)
    model2, ctrl2 = fresh()
    model2.load_state_dict(loaded["model"])
    ctrl2.load_state_dict(loaded["opt"])
    assert ctrl2.param_groups is ctrl2.optimizer.param_groups
    _train(model2, ctrl2, Xtr, ytr, batches[8:])

    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert ctrl.step_count == ctrl2.step_count == 16
    assert [s.scale for s in list(ctrl.history)[8:]] == [s.scale for s in ctrl2.history]
    # saving did not alias live state
    assert torch.equal(
        saved["opt"]["ghoststep"]["generator"], reference["opt"]["ghoststep"]["generator"]
    )
    # the resumed run continues the uninterrupted one exactly: every StepStats field
    # (but the wall time), the inner optimizer's state and the controller's own state
    assert [_record(s) for s in list(ctrl.history)[8:]] == [_record(s) for s in ctrl2.history]
    assert _state_equal(ctrl.optimizer, ctrl2.optimizer)
    assert _tree_equal(ctrl.state_dict()["ghoststep"], ctrl2.state_dict()["ghoststep"])
    if options:
        assert ctrl2._buffer is not None and ctrl2._buffer.shape == (6, 64)


def test_nan_gradient_skips_step(digits):
    Xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = build_model("mlp")
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=0.01), model)
    _train(model, ctrl, Xtr, ytr, _batches(len(Xtr), 2, 32))
    before = _params_copy(model)
    inner_before = copy.deepcopy(ctrl.optimizer.state_dict())

    def nan_step():
        ctrl.zero_grad()
        F.cross_entropy(model(Xtr[:32]), ytr[:32]).backward()
        next(model.parameters()).grad[0, 0] = float("nan")
        ctrl.step()

    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        nan_step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # warned once per controller
        nan_step()
    for p, b in zip(_trainable(model), before, strict=True):
        assert torch.equal(p, b)
    # the inner optimizer never saw the bad gradient
    after = ctrl.optimizer.state_dict()["state"]
    for k, st in inner_before["state"].items():
        for key, value in st.items():
            assert torch.equal(value, after[k][key])
    assert ctrl.skipped_steps == 2 and ctrl.step_count == 4
    assert ctrl.last.skipped and ctrl.last.scale == 0.0
    # training goes on
    _train(model, ctrl, Xtr, ytr, _batches(len(Xtr), 1, 32))
    assert not ctrl.last.skipped


def test_nonfinite_update_restores_parameters(digits):
    Xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = build_model("linear")
    ctrl = RadiusController(torch.optim.SGD(model.parameters(), lr=math.inf), model)
    before = _params_copy(model)
    with pytest.warns(RuntimeWarning, match="non-finite update"):
        _train(model, ctrl, Xtr, ytr, _batches(len(Xtr), 1, 32))
    for p, b in zip(_trainable(model), before, strict=True):
        assert torch.equal(p, b)
    assert ctrl.skipped_steps == 1


def test_nonfinite_raises_when_asked(digits):
    Xtr, ytr, _, _ = digits
    model = build_model("mlp")
    ctrl = RadiusController(torch.optim.Adam(model.parameters()), model, on_nonfinite="raise")
    before = _params_copy(model)
    F.cross_entropy(model(Xtr[:8]), ytr[:8]).backward()
    next(model.parameters()).grad.fill_(math.inf)
    with pytest.raises(FloatingPointError, match="gradient"):
        ctrl.step()
    for p, b in zip(_trainable(model), before, strict=True):
        assert torch.equal(p, b)


def test_missing_batch_is_an_error(digits):
    Xtr, ytr, _, _ = digits
    model = build_model("mlp")
    ctrl = RadiusController(torch.optim.SGD(model.parameters(), lr=0.1), model)
    loss = F.cross_entropy(model(Xtr[:8]), ytr[:8])
    loss.backward()
    ctrl.step()  # captured by the forward pre-hook
    with pytest.raises(RuntimeError, match="inputs="):
        ctrl.step()  # no new forward since the last step
    model.eval()
    model(Xtr[:8])  # eval-mode forwards are not training batches
    model.train()
    with pytest.raises(RuntimeError, match="inputs="):
        ctrl.step()
    ctrl.step(inputs=Xtr[:8])  # explicit batch
    assert ctrl.step_count == 2


def test_closure_is_called_first_and_loss_recorded(digits):
    Xtr, ytr, _, _ = digits
    model = build_model("mlp")
    ctrl = RadiusController(torch.optim.SGD(model.parameters(), lr=0.1), model)

    def closure():
        ctrl.zero_grad()
        loss = F.cross_entropy(model(Xtr[:16]), ytr[:16])
        loss.backward()
        return loss

    loss = ctrl.step(closure)
    assert ctrl.last.loss == pytest.approx(float(loss))
    assert ctrl.last.radius_seconds > 0


def test_dict_and_mixed_inputs_are_replayed():
    class KwModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4)

        def forward(self, x, scale=None):
            return self.fc(x) * scale

    torch.manual_seed(0)
    model = KwModel()
    ctrl = RadiusController(torch.optim.SGD(model.parameters(), lr=50.0), model, method="jvp")
    x, scale = torch.randn(10, 6), torch.full((10, 1), 2.0)
    y = torch.randint(0, 4, (10,))
    for call in (lambda: model(x=x, scale=scale), lambda: model(x, scale=scale)):
        ctrl.zero_grad()
        F.cross_entropy(call(), y).backward()
        ctrl.step()
        assert 1.0 - 1e-4 <= ctrl.last.r_after <= 1.0  # the clip margin (jvp: 1e-5)


def test_sequence_model_with_mask():
    class TokenModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.head = nn.Linear(8, 20)

        def forward(self, input_ids):
            return self.head(torch.tanh(self.emb(input_ids)))  # (B, T, V)

    torch.manual_seed(0)
    model = TokenModel()
    ids = torch.randint(0, 20, (4, 7))
    labels = ids.clone()
    labels[:, 5:] = -100
    ctrl = RadiusController(
        torch.optim.SGD(model.parameters(), lr=20.0),
        model,
        sampling=Sampling(ignore_index=-100, targets_fn=lambda inputs: labels),
    )
    at_old = copy.deepcopy(model)
    old = _params_copy(model)
    logits = model(ids)
    F.cross_entropy(logits.reshape(-1, 20), labels.reshape(-1), ignore_index=-100).backward()
    ctrl.step()
    applied = [p.detach() - o for p, o in zip(_trainable(model), old, strict=True)]
    _, slopes = logit_slopes(at_old, ids, applied)
    spread = (slopes.amax(-1) - slopes.amin(-1))[:, :5]  # only the kept positions
    assert float(spread.max()) / math.pi <= 1.0 + 1e-5
    assert ctrl.last.bottleneck % 7 < 5  # a flat (b * T + t) index of a kept position


def test_sample_options(digits):
    Xtr, ytr, _, _ = digits
    idx = _batches(len(Xtr), 1, 64, seed=5)[0]

    def one_step(**options):
        torch.manual_seed(0)
        model = build_model("mlp")
        ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=0.1), model, **options)
        F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
        ctrl.step()
        return ctrl

    full = one_step()
    sub = one_step(subset=8)
    quant = one_step(quantile=0.5)
    buf = one_step(buffer_size=5)
    assert sub.last.rho_a >= full.last.rho_a  # fewer samples: larger (weaker) radius
    assert quant.last.rho_a >= full.last.rho_a
    assert quant.last.spread <= full.last.spread
    assert buf.last.rho_a == pytest.approx(full.last.rho_a)
    assert buf._buffer.shape == (5, 64)
    # the buffer holds the bottleneck row of the batch
    assert any(torch.equal(row, Xtr[idx][full.last.bottleneck]) for row in buf._buffer)


def test_window_takes_running_minimum(digits):
    Xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = build_model("mlp")
    ctrl = RadiusController(
        torch.optim.Adam(model.parameters(), lr=0.05),
        model,
        sampling=Sampling(window=3),
        mode="monitor",
    )
    rho_now = []
    for idx in _batches(len(Xtr), 6, 32, seed=4):
        ctrl.zero_grad()
        F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
        ctrl.step()
        rho_now.append(math.pi / ctrl.last.spread)
        assert ctrl.last.radius == pytest.approx(min(rho_now[-3:]))
        assert ctrl.last.rho_a == pytest.approx(rho_now[-1])


def test_buffer_rows_are_rechecked(digits):
    Xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = build_model("mlp").double()
    ctrl = RadiusController(
        torch.optim.SGD(model.parameters(), lr=5.0), model, sampling=Sampling(buffer_size=4)
    )
    for idx in _batches(len(Xtr), 3, 32, seed=6):
        x = Xtr[idx].double()
        buffer = None if ctrl._buffer is None else ctrl._buffer.clone()
        at_old, old = copy.deepcopy(model), _params_copy(model)
        ctrl.zero_grad()
        F.cross_entropy(model(x), ytr[idx]).backward()
        ctrl.step()
        if buffer is not None:  # the guarantee covers batch and buffer
            applied = [p.detach() - o for p, o in zip(_trainable(model), old, strict=True)]
            assert _r_of_update(at_old, torch.cat([x, buffer]), applied) <= 1.0 + 1e-6


def test_fast_subset_and_buffer_measure_exactly_the_rows_drawn(monkeypatch):
    """ "fast" with a subset and a buffer on independent rows: the subset's baseline
    comes from the training forward, the buffer's from its own forward, each chunk is
    differenced against its own part (tiny blocks force the blocked spread); the
    radius is the exact JVP radius of exactly those rows."""
    monkeypatch.setattr(ghoststep.evaluation._directional, "_BLOCK_BYTES", 64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 40))
    ctrl = RadiusController(
        torch.optim.Adam(model.parameters(), lr=0.05),
        model,
        method="fast",
        mode="monitor",
        sampling=Sampling(subset=6, buffer_size=5),
    )
    for step in range(3):
        x, y = torch.randn(20, 12), torch.randint(0, 40, (20,))
        buffer = None if ctrl._buffer is None else ctrl._buffer.clone()
        drawn = torch.randperm(20, generator=copy.deepcopy(ctrl._generator))[:6]
        at_old, old = copy.deepcopy(model), _params_copy(model)
        ctrl.zero_grad()
        F.cross_entropy(model(x), y).backward()
        ctrl.step()
        rows = x[drawn] if buffer is None else torch.cat([x[drawn], buffer])
        applied = [p.detach() - o for p, o in zip(_trainable(model), old, strict=True)]
        tau = math.sqrt(sum(float(u.pow(2).sum()) for u in applied))
        _, slopes = logit_slopes(at_old, rows, applied)
        exact = float((slopes.amax(-1) - slopes.amin(-1)).max()) / tau
        assert ctrl.last.spread == pytest.approx(exact, rel=0.02), step
    assert buffer is not None and buffer.shape == (5, 12)


def test_sparse_gradients_rejected():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 3))
    ctrl = RadiusController(torch.optim.SGD(model.parameters(), lr=0.1), model)
    ids = torch.randint(0, 10, (5,))
    F.cross_entropy(model(ids), torch.randint(0, 3, (5,))).backward()
    with pytest.raises(RuntimeError, match="sparse"):
        ctrl.step()


def test_grad_scaler_accepts_the_wrapper(digits):
    Xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = build_model("mlp")
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=0.5), model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for idx in _batches(len(Xtr), 3, 32):
        ctrl.zero_grad()
        scaler.scale(F.cross_entropy(model(Xtr[idx]), ytr[idx])).backward()
        scaler.step(ctrl)
        scaler.update()
        assert ctrl.last.r_after <= 1.0 + 1e-6


def test_add_param_group_and_state_dict_layout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    inner = torch.optim.Adam(model[0].parameters(), lr=0.1)
    ctrl = RadiusController(inner, model)
    ctrl.add_param_group({"params": model[2].parameters(), "lr": 0.01})
    assert len(inner.param_groups) == 2 and ctrl.param_groups is inner.param_groups
    assert ctrl.state is inner.state
    sd = ctrl.state_dict()
    assert set(sd) == {"state", "param_groups", "ghoststep"}  # a torch optimizer's layout
    ctrl.load_state_dict(inner.state_dict())  # a bare optimizer checkpoint also loads
    with pytest.raises(ValueError, match="belong to `model`"):
        RadiusController(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1), model)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "nope"}, "mode"),
        ({"target_r": 0.0}, "target_r"),
        ({"temperature": -1.0}, "temperature"),
        ({"subset": 0}, "subset"),
        ({"window": 0}, "window"),
        ({"quantile": 1.5}, "quantile"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite"),
        ({"buffer_size": -1}, "buffer_size"),
    ],
)
def test_argument_validation(kwargs, match):
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=match):
        RadiusController(torch.optim.SGD(model.parameters(), lr=0.1), model, **kwargs)


def test_temperature_scales_radius(digits):
    Xtr, ytr, _, _ = digits
    rhos = []
    for temperature in (1.0, 4.0):
        torch.manual_seed(0)
        model = build_model("mlp")
        ctrl = RadiusController(
            torch.optim.SGD(model.parameters(), lr=0.1),
            model,
            mode="monitor",
            temperature=temperature,
        )
        F.cross_entropy(model(Xtr[:32]) / temperature, ytr[:32]).backward()
        ctrl.step()
        rhos.append(ctrl.last.rho_a * ctrl.last.spread / temperature)
    assert rhos[0] == pytest.approx(math.pi) and rhos[1] == pytest.approx(math.pi)


# ---------------------------------------------------------------- distributed (gloo)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:

    with gloo_rank(rank, world, init_file):
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))
        ddp = nn.parallel.DistributedDataParallel(model)
        ctrl = RadiusController(torch.optim.Adam(ddp.parameters(), lr=0.5), ddp)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        for _ in range(4):
            x, y = torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)
            ctrl.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            ctrl.step()
        torch.save(
            {
                "params": [p.detach() for p in model.parameters()],
                "scales": [s.scale for s in ctrl.history],
            },
            f"{out_dir}/rank{rank}.pt",
        )


@pytest.mark.slow
def test_ddp_ranks_apply_the_same_scale(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "pg_init"), str(tmp_path)), nprocs=2)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0["scales"] == r1["scales"]
    assert min(r0["scales"]) < 1.0  # clipping was active
    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model_name", ["mlp", "cnn_bn"])
def test_cuda_clip_and_monitor(digits, model_name, monkeypatch):
    # cuDNN's default convolution backward is not bitwise reproducible between two models
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    Xtr, ytr, _, _ = (t.cuda() for t in digits)
    torch.manual_seed(0)
    model = build_model(model_name).cuda()
    twin = copy.deepcopy(model)
    clip = RadiusController(torch.optim.Adam(model.parameters(), lr=0.3), model)
    watch = RadiusController(torch.optim.Adam(twin.parameters(), lr=0.3), twin, mode="monitor")
    bare_model = copy.deepcopy(twin)
    bare = torch.optim.Adam(bare_model.parameters(), lr=0.3)
    for idx in _batches(len(Xtr), 4, 64, seed=8):
        idx = idx.cuda()
        at_old, old = copy.deepcopy(model), _params_copy(model)
        for m, o in ((model, clip), (twin, watch), (bare_model, bare)):
            o.zero_grad()
            F.cross_entropy(m(Xtr[idx]), ytr[idx]).backward()
            o.step()
        applied = [p.detach() - o for p, o in zip(_trainable(model), old, strict=True)]
        assert _r_of_update(at_old, Xtr[idx], applied) <= 1.0 + 1e-3  # float32 on GPU
        for p, q in zip(twin.parameters(), bare_model.parameters(), strict=True):
            assert torch.equal(p, q)


def test_extra_radii_hook_limits_or_only_records(digits):
    Xtr, ytr, _, _ = digits
    seen = {}

    def hook(model, inputs, update):
        seen["shapes"] = [u.shape for u in update]
        seen["inputs"] = inputs
        return {"tiny": 0.01}  # in units of the update: 1% of the proposed step

    applied, scales = {}, {}
    for limit_by in (None, ("out",)):
        torch.manual_seed(0)
        model = build_model("mlp")
        old = [p.detach().clone() for p in model.parameters()]
        twin = copy.deepcopy(model)
        ctrl = RadiusController(
            torch.optim.SGD(model.parameters(), lr=1e-3),
            model,
            mode="clip",
            extra_radii=hook,
            limit_by=limit_by,
            method="jvp",
        )
        bare = torch.optim.SGD(twin.parameters(), lr=1e-3)
        for m, opt in ((model, ctrl), (twin, bare)):
            F.cross_entropy(m(Xtr[:32]), ytr[:32]).backward()
            opt.step()
        stats = ctrl.last
        assert set(stats.radii) == {"out", "tiny"}
        assert stats.radii["tiny"] == pytest.approx(0.01 * stats.tau)
        assert seen["shapes"] == [p.shape for p in model.parameters()]
        steps = [p.detach() - o for p, o in zip(model.parameters(), old)]
        proposed = [p.detach() - o for p, o in zip(twin.parameters(), old)]
        ratio = (
            torch.cat([s.flatten() for s in steps]).norm()
            / torch.cat([s.flatten() for s in proposed]).norm()
        )
        applied[limit_by] = float(ratio)
        scales[limit_by] = stats.scale
        assert stats.binding == min(stats.radii, key=stats.radii.get)
    # the hook's radius binds, less the clip margin for float32 rounding (eps ||old||):
    # this step is so small that the rounding of old + s p is a visible part of it
    assert applied[None] == pytest.approx(scales[None], rel=1e-3)
    assert 0.5 * 0.01 < scales[None] < 0.01
    assert applied[("out",)] == pytest.approx(1.0, rel=1e-3)  # recorded, not binding
    with pytest.raises(ValueError, match="extra_radii is None"):
        RadiusController(torch.optim.SGD(model.parameters(), lr=0.1), model, limit_by=("x",))


class _TwoDeviceMLP(torch.nn.Module):
    """First layer on the CPU, second on the GPU (naive model parallelism)."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(64, 32)
        self.second = torch.nn.Linear(32, 10).cuda()

    def forward(self, x):
        return self.second(torch.relu(self.first(x)).cuda())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_parameters_on_two_devices(digits):
    Xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = _TwoDeviceMLP()
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=1.0), model, target_r=0.5)
    for idx in _batches(len(Xtr), 3, 64, seed=2):
        ctrl.zero_grad()
        F.cross_entropy(model(Xtr[idx]), ytr[idx].cuda()).backward()
        ctrl.step()
        assert ctrl.last.r_after <= 0.5 + 1e-5 and not ctrl.last.skipped
    assert model.first.weight.device.type == "cpu" and model.second.weight.is_cuda


@pytest.mark.parametrize("micro_batches", ["last", "all"])
def test_gradient_accumulation_micro_batches(digits, micro_batches):
    Xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = build_model("mlp")
    ctrl = RadiusController(
        torch.optim.Adam(model.parameters(), lr=0.5),
        model,
        sampling=Sampling(micro_batches=micro_batches),
        method="jvp",
    )
    # With these batches the first micro-batch has the larger spread along the update.
    early, late = _batches(len(Xtr), 2, 32, seed=4)[::-1]
    at_old, old = copy.deepcopy(model), _params_copy(model)
    ctrl.zero_grad()
    for idx in (early, late):  # two micro-batches, one update
        (F.cross_entropy(model(Xtr[idx]), ytr[idx]) / 2).backward()
    ctrl.step()
    applied = [p.detach() - o for p, o in zip(_trainable(model), old, strict=True)]
    r_early = _r_of_update(at_old, Xtr[early], applied)
    r_late = _r_of_update(at_old, Xtr[late], applied)
    assert ctrl.last.scale < 1  # the clip binds at this learning rate
    if micro_batches == "all":  # inside the radius of both micro-batches
        assert r_early == pytest.approx(1.0, rel=1e-4) and r_late < 1.0
        assert 0 <= ctrl.last.bottleneck < 32  # a position of the early micro-batch
    else:  # only the last micro-batch sets the radius: the early one is overshot
        assert r_late == pytest.approx(1.0, rel=1e-4) and r_early > 1.0
    with pytest.raises(RuntimeError, match="inputs="):
        ctrl.step()  # the captured micro-batches were used up
