"""``internal_radii`` (attention and FFN radii of a transformer along a direction)
against central differences, and ``AllRadiiController``: the step set to the smallest
radius, and with the output radius alone the plain ``RadiusController`` bitwise."""

from __future__ import annotations

import math

import pytest
import torch

from ghoststep import RadiusController
from ghoststep.controller import AllRadiiController, internal_radii
from tests.helpers import build_model, load_digits


def _digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    X, y, _, _ = load_digits()
    return X[:n], y[:n]


def test_internal_radii_match_central_differences():
    torch.manual_seed(0)
    model = build_model("transformer", d=16).double()
    x = torch.rand(6, 64, dtype=torch.float64)
    direction = [torch.randn_like(p) for p in model.parameters()]
    radii = internal_radii(model, x, direction, ffn_quantile=0.05)

    def internals(sign, h=1e-6):
        with torch.no_grad():
            for p, d in zip(model.parameters(), direction):
                p.add_(sign * h * d)
            _, out = model(x, return_internals=True)
            for p, d in zip(model.parameters(), direction):
                p.sub_(sign * h * d)
        return out

    plus, minus, zero = internals(1), internals(-1), internals(0)
    h = 1e-6
    spread = max(
        float(((a - b) / (2 * h)).amax(-1).sub(((a - b) / (2 * h)).amin(-1)).max())
        for a, b in zip(plus["attention_logits"], minus["attention_logits"])
    )
    assert radii["attn"] == pytest.approx(math.pi / spread, rel=1e-5)
    hv = torch.cat([p.reshape(-1) for p in zero["ffn_preacts"]])
    dh = torch.cat(
        [((a - b) / (2 * h)).reshape(-1) for a, b in zip(plus["ffn_preacts"], minus["ffn_preacts"])]
    ).abs()
    ratio = (hv.abs() / dh)[dh > 0].sort().values
    k = math.ceil(0.05 * ratio.numel())
    assert radii["ffn"] == pytest.approx(float(ratio[k - 1]), rel=1e-4)
    # the radii are in units of t along the direction: doubling it halves them
    doubled = internal_radii(model, x, [2 * d for d in direction], ffn_quantile=0.05)
    assert doubled["attn"] == pytest.approx(radii["attn"] / 2, rel=1e-9)
    assert doubled["ffn"] == pytest.approx(radii["ffn"] / 2, rel=1e-9)


def test_internal_radii_leave_masked_keys_out():
    torch.manual_seed(0)
    model = build_model("tinylm")
    tokens = torch.randint(0, 97, (2, 12))
    direction = [torch.randn_like(p) for p in model.parameters()]
    radii = internal_radii(model, tokens, direction)
    assert 0 < radii["attn"] < math.inf and 0 < radii["ffn"] < math.inf


def test_all_radii_controller_sets_step_to_min_radius():
    torch.manual_seed(1)
    model = build_model("transformer")
    ctrl = AllRadiiController(
        torch.optim.Adam(model.parameters(), lr=1e-3), model, mode="set", target_r=1.0, method="jvp"
    )
    x, y = _digits(32)
    before = [p.detach().clone() for p in model.parameters()]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    ctrl.step()
    moved = math.sqrt(
        sum(float((p.detach() - q).pow(2).sum()) for p, q in zip(model.parameters(), before))
    )
    radii = ctrl.last_radii
    assert set(radii) == {"out", "attn", "ffn"}
    assert ctrl.last_binding == min(radii, key=radii.get)
    assert ctrl.last.radius == pytest.approx(min(radii.values()), rel=1e-9)
    assert ctrl.last.rho_a == radii["out"]
    assert moved == pytest.approx(min(radii.values()), rel=1e-4)
    ctrl.close()
    with pytest.raises(ValueError, match="limit_by"):
        AllRadiiController(torch.optim.Adam(model.parameters()), model, limit_by=("foo",))
    with pytest.raises(ValueError, match="ffn_quantile"):
        AllRadiiController(torch.optim.Adam(model.parameters()), model, ffn_quantile=0.0)


def test_output_only_equals_radius_controller():
    def one_step(cls, **kw):
        torch.manual_seed(2)
        model = build_model("transformer")
        opt = cls(torch.optim.Adam(model.parameters(), lr=1e-3), model, mode="set", **kw)
        x, y = _digits(16)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return [p.detach().clone() for p in model.parameters()]

    a = one_step(AllRadiiController, limit_by=("out",))
    b = one_step(RadiusController)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
