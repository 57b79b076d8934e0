"""``internal_radii`` (attention and FFN radii of a transformer along a direction)
against central differences, and ``AllRadiiController``: the step set to the smallest
radius, with the output radius alone the plain ``RadiusController`` bitwise, and the
radii it reads from its own pass ("jvp") or secant forwards ("fast") against a second
JVP by ``internal_radii`` (the two-pass ``extra_radii`` hook)."""

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


# ------------------------------------------------- the radii read in the controller's pass


def _reference_hook(model, inputs, update):
    """The two-pass reference: ``internal_radii``'s own JVP along the update."""
    return internal_radii(model, inputs, update)


def _lm_run(make, steps: int = 3, seed: int = 3):
    """``steps`` AdamW steps of the causal TinyLM (V = 97, 4 x 16 tokens, a high LR so
    that the radii bind) under ``make(model)``: the radii of each step and the model's
    forward calls (the training forwards and the controller's own)."""
    torch.manual_seed(seed)
    model = build_model("tinylm")
    opt = make(model, torch.optim.AdamW(model.parameters(), lr=0.1))
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    g = torch.Generator().manual_seed(seed)
    radii = []
    for _ in range(steps):
        tokens = torch.randint(0, 97, (4, 17), generator=g)
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
        radii.append(dict(opt.last.radii or {}))
    return radii, len(calls), [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "limit_by, chunk_size",
    [(("out", "attn", "ffn"), None), (("out", "attn"), None), (("out", "attn", "ffn"), 3)],
)
def test_one_pass_radii_equal_the_two_pass_reference(limit_by, chunk_size):
    """The radii read inside the controller's JVP (chunked: accumulated over the
    chunks) are those of a second JVP by ``internal_radii``, and so is the trajectory;
    the one pass calls the model as often as the output-only controller does."""
    kw = dict(mode="clip", method="jvp", class_dim=-1, chunk_size=chunk_size)
    one, one_calls, one_params = _lm_run(
        lambda m, o: AllRadiiController(o, m, limit_by=limit_by, **kw)
    )
    two, _, two_params = _lm_run(
        lambda m, o: RadiusController(o, m, extra_radii=_reference_hook, limit_by=limit_by, **kw)
    )
    _, out_calls, _ = _lm_run(lambda m, o: RadiusController(o, m, **kw))
    for a, b in zip(one, two, strict=True):
        assert set(a) == set(limit_by)
        for k in limit_by:
            assert a[k] == pytest.approx(b[k], rel=1e-6)
    for p, q in zip(one_params, two_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert one_calls == out_calls


def test_reported_radii_are_measured_without_binding():
    """``report``: recorded beside ``limit_by`` and equal to the reference; the step is
    the output-only controller's, bitwise."""
    kw = dict(mode="clip", method="jvp", class_dim=-1)
    reported, _, params = _lm_run(
        lambda m, o: AllRadiiController(o, m, limit_by=("out",), report=("attn", "ffn"), **kw)
    )
    reference, _, _ = _lm_run(
        lambda m, o: RadiusController(o, m, extra_radii=_reference_hook, limit_by=("out",), **kw)
    )
    _, _, plain = _lm_run(lambda m, o: RadiusController(o, m, **kw))
    assert all(torch.equal(p, q) for p, q in zip(params, plain, strict=True))
    for a, b in zip(reported, reference, strict=True):
        assert set(a) == {"out", "attn", "ffn"}
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-6)
    with pytest.raises(ValueError, match="report"):
        AllRadiiController(torch.optim.Adam([torch.zeros(1)]), torch.nn.Linear(1, 1), report=("x",))


@pytest.mark.parametrize("mode, extra_forwards", [("monitor", 1), ("set", 0)])
def test_fast_reads_the_internal_radii_from_its_secant_forwards(mode, extra_forwards):
    """``"fast"``: the radii from the central difference of the internals at old +/- f p
    match the two-pass JVP reference to the secant's accuracy. The + side is the
    controller's own forward; the - side costs one more forward, none where the
    controller takes it anyway (set mode rechecks every step)."""
    kw = dict(mode=mode, method="fast", class_dim=-1, limit_by=("out", "attn", "ffn"))
    fast, fast_calls, _ = _lm_run(lambda m, o: AllRadiiController(o, m, **kw))
    reference, _, _ = _lm_run(
        lambda m, o: RadiusController(o, m, extra_radii=_reference_hook, **kw)
    )
    _, out_calls, _ = _lm_run(lambda m, o: RadiusController(o, m, **dict(kw, limit_by=None)))
    for a, b in zip(fast, reference, strict=True):
        assert set(a) == {"out", "attn", "ffn"}
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-2)
    assert fast_calls == out_calls + extra_forwards * len(fast)
