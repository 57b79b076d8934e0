"""Unit tests for the controller's proposal (``controller._controller``): the spare copy, the swap
float64 reference, the evaluation point and the applied step old + s p (bitwise at s = 1,
rounded toward the old values for 16-bit parameters), the optimizer snapshot and the
finiteness check."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ghoststep.controller._checks import check_supported, holds_iterate
from ghoststep.controller._controller import Proposal, all_finite, check_dense, rerun_scaled
from ghoststep.evaluation._updates import OptimizerSnapshot


@pytest.fixture(autouse=True)
def _no_grad():
    """The controller does its parameter arithmetic under ``torch.no_grad()``."""
    with torch.no_grad():
        yield


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,)]
    return [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _step(params, seed=1, scale=0.1):
    """An 'inner optimizer step': params <- params + scale * noise, in place."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_((scale * torch.randn(p.shape, generator=g)).to(p.dtype))


def _swapped(dtype=torch.float32, scale=0.1):
    """(proposal, params at old, spare at new, old clones, new clones, tau)."""
    params = _params(dtype)
    proposal = Proposal()
    spare = proposal.begin(params, None)
    old = [p.detach().clone() for p in params]
    _step(params, scale=scale)
    new = [p.detach().clone() for p in params]
    tau = proposal.swap()
    return proposal, params, spare, old, new, tau


def _reference_tau(old, new) -> float:
    return math.sqrt(sum(float(((q.double() - p.double()) ** 2).sum()) for p, q in zip(old, new)))


def _bitwise(a, b) -> bool:
    return all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------- begin / swap


def test_begin_copies_into_a_reused_spare():
    params = _params()
    proposal = Proposal()
    spare = proposal.begin(params, None)
    assert _bitwise(spare, [p.detach() for p in params])
    assert all(s.data_ptr() != p.data_ptr() for s, p in zip(spare, params))
    again = proposal.begin(params, None)
    assert all(a is b for a, b in zip(again, spare))  # kept between steps
    other = proposal.begin(params[:2], None)  # another parameter list: a new spare
    assert len(other) == 2 and other[0] is not spare[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_swap_exchanges_bitwise_and_returns_tau(dtype):
    proposal, params, spare, old, new, tau = _swapped(dtype)
    assert _bitwise([p.detach() for p in params], old)
    assert _bitwise(spare, new)
    assert proposal.at == 0.0
    assert tau == pytest.approx(_reference_tau(old, new), rel=1e-6)


def test_swap_tau_survives_a_float32_norm_overflow():
    params = [nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(3))]
    proposal = Proposal()
    proposal.begin(params, None)
    params[0].fill_(3e38)  # ||p|| = 6e38 overflows float32, every entry finite
    params[1].fill_(-1e38)
    new = [p.detach().clone() for p in params]
    tau = proposal.swap()
    assert math.isfinite(tau)
    assert tau == pytest.approx(_reference_tau([torch.zeros(4), torch.zeros(3)], new), rel=1e-12)


def test_norm_is_the_global_two_norm():
    params = _params()
    expected = math.sqrt(sum(float((p.double() ** 2).sum()) for p in params))
    proposal = Proposal()
    proposal.begin(params, None)
    assert proposal.norm() == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------ move_to / apply


def _close_to(params, old, new, f, rtol=1e-6):
    for p, o, n in zip(params, old, new, strict=True):
        expected = o.double() + f * (n.double() - o.double())
        torch.testing.assert_close(p.detach().double(), expected, rtol=rtol, atol=1e-6)


def test_move_to_and_apply_follow_old_plus_s_p():
    proposal, params, spare, old, new, _ = _swapped()
    proposal.move_to(0.25)
    assert proposal.at == 0.25
    _close_to(params, old, new, 0.25)
    before = [p.detach().clone() for p in params]
    proposal.move_to(0.25)  # already there: untouched
    assert _bitwise([p.detach() for p in params], before)
    proposal.move_to(-0.25)  # the other side of old
    _close_to(params, old, new, -0.25)
    proposal.apply(0.6)
    assert proposal.at == 0.6
    _close_to(params, old, new, 0.6)
    assert _bitwise(spare, new)  # the proposal itself never moves


@pytest.mark.parametrize("start", [0.0, 0.3, -0.4])
def test_apply_one_gives_the_proposal_bitwise(start):
    proposal, params, spare, old, new, _ = _swapped()
    if start:
        proposal.move_to(start)
    proposal.apply(1.0)
    assert proposal.at == 1.0
    assert _bitwise([p.detach() for p in params], new)


def test_apply_zero_from_old_leaves_the_parameters_bitwise():
    proposal, params, spare, old, _, _ = _swapped()
    proposal.apply(0.0)
    assert _bitwise([p.detach() for p in params], old)


ULP = 2.0**-7  # bfloat16 spacing in [1, 2)


@pytest.mark.parametrize(
    "old, new, scale, expected",
    [
        (1.0, 1.0 + ULP, 0.6, 1.0),  # nearest (1 ulp) is longer than 0.6 ulp
        (1.0, 1.0 + ULP, 0.4, 1.0),
        (1.0, 1.0 + 3 * ULP, 0.5, 1.0 + ULP),  # 1.5 ulp: the tie rounds to 2 ulp
        (-1.0, -1.0 - 3 * ULP, 0.5, -1.0 - ULP),
        (1.0, 1.0 + 4 * ULP, 0.5, 1.0 + 2 * ULP),  # exact
        (1.0, 1.0 + 10 * ULP, 0.37, 1.0 + 3 * ULP),  # 3.7 ulp
        (1.0, 1.0 + 10 * ULP, 0.33, 1.0 + 3 * ULP),  # 3.3 ulp
    ],
)
def test_apply_rounds_16_bit_steps_toward_old(old, new, scale, expected):
    params = [nn.Parameter(torch.tensor([old], dtype=torch.bfloat16))]
    proposal = Proposal()
    proposal.begin(params, None)
    params[0].fill_(new)
    proposal.swap()
    proposal.apply(scale)
    assert params[0].item() == expected
    assert proposal.at == scale


def test_apply_16_bit_never_lengthens_an_entry_and_leaves_float32_to_lerp():
    params = _params(torch.bfloat16) + [nn.Parameter(torch.randn(6))]
    proposal = Proposal()
    proposal.begin(params, None)
    old = [p.detach().clone() for p in params]
    _step(params, scale=0.05)
    new = [p.detach().clone() for p in params]
    proposal.swap()
    scale = 0.37
    proposal.apply(scale)
    for p, o, n in zip(params[:-1], old[:-1], new[:-1]):
        got, o, n = p.detach().double(), o.double(), n.double()
        step, target = scale * (n - o), o + scale * (n - o)
        assert bool(((got - o).abs() <= step.abs() * (1 + 1e-6)).all())  # never longer
        assert bool(((got - o) * step >= 0).all())  # never backwards
        spacing = torch.nextafter(p.detach(), torch.full_like(p, math.inf)).double() - got
        assert bool(((got - target).abs() <= spacing.abs()).all())  # at most one ulp short
    torch.testing.assert_close(params[-1].detach(), old[-1] + scale * (new[-1] - old[-1]))


# ------------------------------------------------------------------------- snapshot


def _model_and_grads(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    with torch.enable_grad():
        model(torch.randn(8, 4)).square().sum().backward()
    return model, list(model.parameters())


def test_snapshot_restore_returns_state_and_parameters_bitwise():
    model, params = _model_and_grads()
    opt = torch.optim.Adam(params, lr=0.1)
    opt.step()  # some state to save
    snap = OptimizerSnapshot(opt, params)
    before = [p.detach().clone() for p in params]
    opt.step()
    reference = [p.detach().clone() for p in params]
    reference_state = [s["exp_avg_sq"].clone() for s in opt.state.values()]
    opt.step()
    snap.restore(opt, params)
    assert _bitwise([p.detach() for p in params], before)
    opt.step()  # from the restored state: the same second step
    assert _bitwise([p.detach() for p in params], reference)
    assert _bitwise([s["exp_avg_sq"] for s in opt.state.values()], reference_state)


def test_snapshot_rerun_scales_the_learning_rate():
    model, params = _model_and_grads()
    opt = torch.optim.SGD(params, lr=0.5)
    old = [p.detach().clone() for p in params]
    snap = OptimizerSnapshot(opt, params)
    opt.step()
    length = rerun_scaled(snap, opt, params, 0.2)
    assert opt.param_groups[0]["lr"] == 0.5  # restored after the rerun
    grads = [p.grad.detach() for p in params]
    for p, o, g in zip(params, old, grads):  # plain SGD: old - lr s g
        torch.testing.assert_close(p.detach(), o - 0.5 * 0.2 * g)
    expected = 0.1 * math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    assert length == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- checks


def test_all_finite():
    assert all_finite([torch.ones(3), torch.zeros(2, 2)])
    assert all_finite([torch.full((4,), 3e38)])  # the norm overflows, entries are finite
    assert not all_finite([torch.ones(3), torch.tensor([1.0, math.nan])])
    assert not all_finite([torch.tensor([math.inf]), torch.ones(2)])
    assert not all_finite([torch.tensor([-math.inf], dtype=torch.bfloat16)])


def test_optimizer_checks():
    params = [nn.Parameter(torch.ones(2))]

    class ScheduleFreeAdamW(torch.optim.SGD):
        pass

    assert holds_iterate(ScheduleFreeAdamW(params, lr=0.1))
    assert not holds_iterate(torch.optim.Adam(params))
    with pytest.raises(ValueError, match="LBFGS"):
        check_supported(torch.optim.LBFGS(params))

    class SAM(torch.optim.SGD):
        first_step = second_step = None
        base_optimizer = None

    with pytest.raises(ValueError, match="closure"):
        check_supported(SAM(params, lr=0.1))
    check_supported(torch.optim.Adam(params))

    emb = nn.Embedding(5, 2, sparse=True)
    with torch.enable_grad():
        emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        check_dense(list(emb.parameters()))
    check_dense(params)  # no gradient: fine
