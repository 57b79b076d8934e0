"""Tests for ghoststep.measurement._slopes: JVP slopes vs finite differences, side effects,
chunking, masking, direction helpers and error messages."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ARCHITECTURES, MLP, TinyLM, build_model
from torch import nn

from ghoststep import RadiusController
from ghoststep.evaluation import (
    direction_norm,
    gradient_direction,
    optimizer_update_direction,
    random_direction,
)
from ghoststep.measurement import (
    Measurement,
    flatten_samples,
    logit_slopes,
    measure,
    per_sample_spread,
)

VOCAB = 97


# ------------------------------------------------------------------------ helpers


def _inputs(name: str, batch: int = 12):
    g = torch.Generator().manual_seed(123)
    if name == "tinylm":
        x = torch.randint(0, VOCAB, (3, 9), generator=g)
        y = torch.randint(0, VOCAB, (3, 9), generator=g)
        return x, y
    return torch.rand(batch, 64, generator=g), torch.randint(0, 10, (batch,), generator=g)


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name)


def _ce(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def fd_reference(model, x, direction, h=1e-6):
    """Independent float64 central difference: a float64 deep copy at theta +- h v.

    Each side runs on its own copy in the model's mode (train mode: batch statistics,
    like the JVP), with the same RNG state (same dropout mask).
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    xx = x.double() if x.is_floating_point() else x
    outs = []
    rng = torch.get_rng_state()
    for sign in (1.0, -1.0):
        twin = copy.deepcopy(model).double()
        params = dict(twin.named_parameters())
        with torch.no_grad():
            for n in names:
                params[n].add_(sign * h * direction[n].double())
            torch.set_rng_state(rng)
            outs.append(twin(xx))
    torch.set_rng_state(rng)
    return (outs[0] - outs[1]) / (2 * h)


def rel_err(a, ref):
    return float((a.double() - ref).abs().max() / ref.abs().max())


def snapshot(model):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
        "grads": [p.grad for p in model.parameters()],
    }


def assert_unchanged(model, snap):
    for n, p in model.named_parameters():
        assert torch.equal(p, snap["params"][n]), n
    for n, b in model.named_buffers():
        assert b.dtype == snap["buffers"][n].dtype
        assert torch.equal(b, snap["buffers"][n]), n
    assert [m.training for m in model.modules()] == snap["training"]
    assert torch.equal(torch.get_rng_state(), snap["rng"])
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------- JVP vs FD accuracy

MODELS = ARCHITECTURES + ("tinylm",)
JVP_ERRORS: dict[tuple[str, str], float] = {}


@pytest.mark.parametrize("kind", ["gradient", "random"])
@pytest.mark.parametrize("name", MODELS)
def test_jvp_matches_float64_finite_differences(name, kind):
    model = _model(name)  # train mode: BatchNorm uses batch statistics in both
    x, y = _inputs(name)
    if kind == "gradient":
        v, gnorm = gradient_direction(model, _ce, x, y)
        assert float(gnorm) > 0
    else:
        v = random_direction(model, seed=7)
    assert math.isclose(float(direction_norm(v)), 1.0, rel_tol=1e-6)
    logits, slopes = logit_slopes(model, x, v)
    with torch.no_grad():
        plain = model(x)
    ref = fd_reference(model, x, v)
    assert slopes.shape == logits.shape == plain.shape
    torch.testing.assert_close(logits, plain, rtol=1e-6, atol=1e-6)
    err = rel_err(slopes, ref)
    JVP_ERRORS[(name, kind)] = err
    print(f"\n{name:12s} {kind:9s} max relative error JVP(float32) vs FD(float64): {err:.2e}")
    assert err < 1e-5
    # The library's own FD path agrees as well.
    _, fd = logit_slopes(model, x, v, method="fd")
    assert rel_err(fd, ref) < 1e-5


def test_float64_model_jvp_is_tight():
    model = _model("mlp_ln").double()
    x, _ = _inputs("mlp_ln")
    v = random_direction(model, seed=3)
    _, slopes = logit_slopes(model, x.double(), v)
    assert slopes.dtype == torch.float64
    assert rel_err(slopes, fd_reference(model, x, v)) < 1e-8


def test_resnet18_small_width_runs_in_train_mode():
    torch.manual_seed(0)
    model = build_model("resnet18", width=4)
    x = torch.rand(4, 3, 32, 32)
    v = random_direction(model, seed=0)
    snap = snapshot(model)
    logits, slopes = logit_slopes(model, x, v)
    assert slopes.shape == (4, 10)
    assert_unchanged(model, snap)
    assert rel_err(slopes, fd_reference(model, x, v)) < 1e-4


# ------------------------------------------------------------------- side effects


@pytest.mark.parametrize("method", ["jvp", "fd"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["cnn_bn", "dropout_mlp", "tinylm"])
def test_no_side_effects(name, mode, method):
    torch.manual_seed(0)
    model = MLP(hidden=32, dropout=0.5) if name == "dropout_mlp" else build_model(name)
    model.train(mode == "train")
    x, y = _inputs("tinylm" if name == "tinylm" else "mlp")
    v = random_direction(model, seed=1)
    snap = snapshot(model)
    logit_slopes(model, x, v, method=method)
    measure(model, x, v, tau=0.5, targets=y, method=method)
    per_sample_spread(model, x, v, method=method)
    assert_unchanged(model, snap)
    # The training RNG stream continues exactly as if nothing had happened.
    torch.set_rng_state(snap["rng"])
    expected = torch.rand(3)
    torch.set_rng_state(snap["rng"])
    logit_slopes(model, x, v, method=method)
    assert torch.equal(torch.rand(3), expected)


def test_gradient_direction_has_no_side_effects_and_matches_autograd():
    model = _model("cnn_bn")
    x, y = _inputs("cnn_bn")
    snap = snapshot(model)
    v, gnorm = gradient_direction(model, _ce, x, y)
    assert_unchanged(model, snap)
    twin = copy.deepcopy(model)
    _ce(twin(x), y).backward()
    g = torch.cat([p.grad.flatten() for p in twin.parameters()])
    assert math.isclose(float(gnorm), float(g.norm()), rel_tol=1e-5)
    got = torch.cat([t.flatten() for t in v.values()])
    torch.testing.assert_close(got, g / g.norm(), rtol=1e-5, atol=1e-7)
    # A scalar loss tensor works too and keeps its graph.
    loss = _ce(model(x), y)
    v2, n2 = gradient_direction(model, loss)
    loss.backward()
    assert math.isclose(float(n2), float(gnorm), rel_tol=1e-5)


def test_dropout_same_mask_for_logits_and_slopes():
    torch.manual_seed(0)
    model = MLP(hidden=64, dropout=0.5).train()
    x, _ = _inputs("mlp")
    v = random_direction(model, seed=2)
    state = torch.get_rng_state()
    logits, slopes = logit_slopes(model, x, v)
    with torch.no_grad():
        plain = model(x)  # same RNG state -> same mask
    torch.testing.assert_close(logits, plain)
    torch.set_rng_state(state)
    ref = fd_reference(model, x, v)
    assert rel_err(slopes, ref) < 1e-5


def test_random_direction_seeded_unit_and_rng_free():
    model = _model("mlp")
    state = torch.get_rng_state()
    a = random_direction(model, seed=5)
    b = random_direction(model, seed=5)
    c = random_direction(model, seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["net.0.weight"], c["net.0.weight"])
    assert math.isclose(float(direction_norm(a)), 1.0, rel_tol=1e-6)


# ---------------------------------------------------------------- chunking, masks


def _lm_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (5, 12), generator=g)
    y = torch.randint(0, VOCAB, (5, 12), generator=g)
    return x, y


def test_chunked_equals_unchunked():
    model = _model("tinylm")
    x, y = _lm_batch()
    v = random_direction(model, seed=0)
    z, a = logit_slopes(model, x, v)
    for chunk in (1, 2, 5, 100):
        z2, a2 = logit_slopes(model, x, v, chunk_size=chunk)
        torch.testing.assert_close(z2, z, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a2, a, rtol=1e-6, atol=1e-6)
        s = per_sample_spread(model, x, v, chunk_size=chunk)
        torch.testing.assert_close(s, (a.amax(-1) - a.amin(-1)).reshape(-1))
    m0 = measure(model, x, v, targets=y, exact=True)
    m1 = measure(model, x, v, targets=y, exact=True, chunk_size=2)
    m2 = measure(model, x, v, targets=y, chunk_size=2)
    torch.testing.assert_close(m1.spread, m0.spread)
    torch.testing.assert_close(m2.spread, m0.spread)
    torch.testing.assert_close(m1.exact, m0.exact, equal_nan=True)
    assert m0.bottleneck == m1.bottleneck == m2.bottleneck
    assert math.isclose(m0.rho_a, m2.rho_a, rel_tol=1e-6)


def test_chunking_refused_for_batchnorm_in_train_mode():
    model = _model("cnn_bn")
    x, _ = _inputs("cnn_bn")
    v = random_direction(model, seed=0)
    with pytest.raises(ValueError, match="BatchNorm .* batch statistics"):
        per_sample_spread(model, x, v, chunk_size=4)
    model.eval()  # running statistics: per-sample, chunking is exact
    s = per_sample_spread(model, x, v, chunk_size=4)
    torch.testing.assert_close(s, per_sample_spread(model, x, v))


def test_masked_positions_do_not_change_statistics():
    model = _model("tinylm")
    x, y = _lm_batch()
    v = random_direction(model, seed=0)
    lengths = torch.tensor([12, 7, 3, 10, 1])
    mask = torch.arange(12)[None, :] < lengths[:, None]  # trailing padding
    x2 = torch.where(mask, x, (x + 11) % VOCAB)  # change the padded tokens (causal LM)
    y2 = torch.where(mask, y, (y + 5) % VOCAB)
    results = []
    for xx, yy in ((x, y), (x2, y2)):
        for chunk in (None, 2):
            m = measure(model, xx, v, targets=yy, mask=mask, exact=True, chunk_size=chunk)
            results.append(m)
            assert torch.equal(m.sample_index, torch.nonzero(mask.reshape(-1))[:, 0])
    base = results[0]
    for m in results[1:]:
        torch.testing.assert_close(m.spread, base.spread, rtol=1e-6, atol=0)
        torch.testing.assert_close(m.top2, base.top2, rtol=1e-5, atol=0)
        assert m.bottleneck == base.bottleneck
        assert math.isclose(m.rho_a, base.rho_a, rel_tol=1e-6)
    # ignore_index with targets gives the same selection.
    y_ign = torch.where(mask, y2, torch.full_like(y2, -100))
    m_ign = measure(model, x2, v, targets=y_ign, ignore_index=-100)
    torch.testing.assert_close(m_ign.spread, base.spread, rtol=1e-6, atol=0)
    assert m_ign.bottleneck == base.bottleneck
    # The bottleneck is the position with the largest spread among kept positions.
    _, a = logit_slopes(model, x, v)
    spread = (a.amax(-1) - a.amin(-1)).masked_fill(~mask, -1.0)
    assert base.bottleneck == int(spread.reshape(-1).argmax())
    # flatten_samples: edits of the logits at masked positions are invisible.
    z, _ = logit_slopes(model, x, v)
    rows, srows = flatten_samples(z, a, mask)
    z_bad = z.masked_fill(~mask[..., None], 1e6)
    rows2, _ = flatten_samples(z_bad, a, mask)
    assert rows.shape == (int(mask.sum()), VOCAB) and torch.equal(rows, rows2)
    assert torch.equal(srows, a[mask])


# --------------------------------------------------------------- measure


def test_measure_fields_and_serialization():
    model = _model("mlp")
    x, y = _inputs("mlp")
    v = random_direction(model, seed=0)
    _, a = logit_slopes(model, x, v)
    spread = a.amax(-1) - a.amin(-1)
    m = measure(model, x, v, tau=0.3, targets=y, exact=True)
    assert isinstance(m, Measurement)
    torch.testing.assert_close(m.spread, spread)
    torch.testing.assert_close(m.rho_samples, math.pi / spread)
    assert math.isclose(m.rho_a, math.pi / float(spread.max()), rel_tol=1e-6)
    assert m.bottleneck == int(spread.argmax())
    assert math.isclose(m.r, 0.3 / m.rho_a, rel_tol=1e-9)
    assert bool((m.exact >= m.rho_samples * (1 - 1e-5)).all())  # rho_a is a lower bound
    assert m.top2.shape == m.exact.shape == (12,)
    text = repr(m)
    assert text.startswith("Measurement(") and "rho_a=" in text and len(text) < 300
    d = json.loads(json.dumps(m.to_dict()))
    assert d["bottleneck"] == m.bottleneck and len(d["spread"]) == 12
    # Temperature scales every radius by T; a quantile aggregate is >= the min.
    m_t = measure(model, x, v, temperature=2.0)
    assert math.isclose(m_t.rho_a, 2 * m.rho_a, rel_tol=1e-6)
    m_q = measure(model, x, v, aggregate=("quantile", 0.5))
    assert m_q.rho_a >= m.rho_a


def test_zero_direction_gives_infinite_radius():
    model = _model("linear")
    x, _ = _inputs("linear")
    v = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    m = measure(model, x, v, tau=1.0)
    assert math.isinf(m.rho_a) and m.r == 0.0


# ----------------------------------------------------------- direction formats


def test_direction_formats_agree_and_frozen_parameters_take_no_part():
    model = _model("mlp")
    x, _ = _inputs("mlp")
    v = random_direction(model, seed=0)
    _, a_dict = logit_slopes(model, x, v)
    _, a_list = logit_slopes(model, x, list(v.values()))
    _, a_flat = logit_slopes(model, x, torch.cat([t.flatten() for t in v.values()]))
    params = dict(model.named_parameters())
    _, a_keyed = logit_slopes(model, x, {params[n]: t for n, t in v.items()})
    for other in (a_list, a_flat, a_keyed):
        torch.testing.assert_close(other, a_dict)
    # Freeze the first layer: its entries are ignored, the rest still counts.
    model.net[0].weight.requires_grad_(False)
    _, a_frozen = logit_slopes(model, x, v)
    zeroed = dict(v, **{"net.0.weight": torch.zeros_like(v["net.0.weight"])})
    model.net[0].weight.requires_grad_(True)
    _, a_zero = logit_slopes(model, x, zeroed)
    torch.testing.assert_close(a_frozen, a_zero)


def test_tied_weights_alias_name_accepted():
    model = _model("tinylm")
    assert model.lm_head.weight is model.tok_emb.weight
    x, _ = _inputs("tinylm")
    v = random_direction(model, seed=0)
    assert "lm_head.weight" not in v
    alias = {("lm_head.weight" if k == "tok_emb.weight" else k): t for k, t in v.items()}
    torch.testing.assert_close(logit_slopes(model, x, alias)[1], logit_slopes(model, x, v)[1])


# ------------------------------------------------------------------- bad input


def test_errors_are_clear():
    model = _model("mlp")
    x, _ = _inputs("mlp")
    v = random_direction(model, seed=0)
    bad = dict(v, **{"net.2.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"'net\.2\.weight' has shape \(3, 3\), expected"):
        logit_slopes(model, x, bad)
    seq = list(v.values())
    seq[1] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"parameter 'net\.0\.bias' has shape"):
        logit_slopes(model, x, seq)
    with pytest.raises(ValueError, match="has 3 entries but the model has 4"):
        logit_slopes(model, x, seq[:3])
    with pytest.raises(ValueError, match="flat 1-D vector of length"):
        logit_slopes(model, x, torch.zeros(7))
    with pytest.raises(ValueError, match="unknown parameter 'nope'"):
        logit_slopes(model, x, dict(v, nope=torch.zeros(1)))
    with pytest.raises(ValueError, match="no entry for trainable parameter 'net.0.bias'"):
        logit_slopes(model, x, {k: t for k, t in v.items() if k != "net.0.bias"})
    nan = dict(v, **{"net.0.bias": torch.full_like(v["net.0.bias"], float("nan"))})
    with pytest.raises(ValueError, match="'net.0.bias' has non-finite values"):
        logit_slopes(model, x, nan)
    with pytest.raises(
        TypeError, match="inputs must be a tensor, a tuple/list of tensors.*got ndarray"
    ):
        logit_slopes(model, x.numpy(), v)
    with pytest.raises(TypeError, match=r"inputs\[0\] is a list"):
        logit_slopes(model, [x.tolist()], v)
    with pytest.raises(ValueError, match="method must be one of"):
        logit_slopes(model, x, v, method="reverse")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        logit_slopes(model, x, v, chunk_size=0)
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        logit_slopes(frozen, x, [])
    with pytest.raises(ValueError, match="mask must have the sample shape"):
        measure(model, x, v, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="ignore_index needs targets"):
        measure(model, x, v, ignore_index=-100)
    assert isinstance(np.zeros(1), np.ndarray)


class _SdpaModel(nn.Module):
    def __init__(self, fused_op: bool = False):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.fused_op = fused_op

    def forward(self, x):
        h = self.proj(x)[:, None]
        if self.fused_op:  # the CPU flash kernel called directly: no forward AD
            h = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(h, h, h)[0]
        else:  # the public function: the JVP selects its math kernel
            h = F.scaled_dot_product_attention(h, h, h)
        return self.head(h[:, 0].mean(1))


def test_default_sdpa_needs_no_change_and_matches_fd():
    torch.manual_seed(0)
    model = _SdpaModel()
    x = torch.randn(2, 5, 8)
    v = random_direction(model, seed=0)
    _, a = logit_slopes(model, x, v)  # default kernel selection, as in training
    _, fd = logit_slopes(model, x, v, method="fd")
    assert rel_err(a, fd.double()) < 1e-5


def test_op_without_forward_ad_names_it_and_suggests_fd():
    torch.manual_seed(0)
    model = _SdpaModel(fused_op=True)
    x = torch.randn(2, 5, 8)
    v = random_direction(model, seed=0)
    with pytest.raises(NotImplementedError, match=r"flash_attention_for_cpu.*method=\"fast\""):
        logit_slopes(model, x, v)
    _, fd = logit_slopes(model, x, v, method="fd")
    _, fast = logit_slopes(model, x, v, method="fast")  # no forward AD needed
    assert rel_err(fast.double(), fd.double()) < 1e-2


# -------------------------------------------------------- optimizer update direction


def _trained_pair(opt_factory):
    model = _model("mlp")
    opt = opt_factory(model.parameters())
    x, y = _inputs("mlp")
    for _ in range(3):
        opt.zero_grad()
        _ce(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    _ce(model(x), y).backward()
    return model, opt


@pytest.mark.parametrize(
    "factory",
    [
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
        lambda p: torch.optim.AdamW(p, lr=1e-2),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
    ],
    ids=["adam", "adamw", "sgd_momentum"],
)
def test_optimizer_update_direction_matches_twin_step(factory):
    model, opt = _trained_pair(factory)
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        q.grad = p.grad.clone()
    twin_opt = factory(twin.parameters())
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    before_params = [p.detach().clone() for p in model.parameters()]
    before_state = copy.deepcopy(opt.state_dict())
    state_objects = {id(p): dict(opt.state[p]) for p in model.parameters()}

    update = optimizer_update_direction(opt, model)
    as_list = optimizer_update_direction(opt)

    for p, b in zip(model.parameters(), before_params, strict=True):
        assert torch.equal(p, b)
    after_state = opt.state_dict()
    assert after_state["param_groups"] == before_state["param_groups"]
    for k, entry in before_state["state"].items():
        for key, val in entry.items():
            assert torch.equal(torch.as_tensor(after_state["state"][k][key]), torch.as_tensor(val))
    for p in model.parameters():  # same tensor objects in the state
        assert all(opt.state[p][k] is obj for k, obj in state_objects[id(p)].items())

    old = [p.detach().clone() for p in twin.parameters()]
    twin_opt.step()
    for (name, u), lst, p, o in zip(update.items(), as_list, twin.parameters(), old, strict=True):
        assert torch.equal(u, lst), name
        torch.testing.assert_close(u, p.detach() - o, rtol=1e-6, atol=1e-8)
    # The real optimizer then steps exactly like the twin did.
    opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    assert direction_norm(update) > 0


def test_optimizer_update_direction_on_fresh_optimizer_leaves_state_empty():
    model = _model("linear")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = _inputs("linear")
    _ce(model(x), y).backward()
    update = optimizer_update_direction(opt, model)
    assert len(opt.state) == 0
    # Adam's first step moves every entry by about lr (sign of the gradient).
    flat = torch.cat([u.flatten() for u in update.values()])
    assert torch.allclose(flat.abs().max(), torch.tensor(1e-3), rtol=1e-3)
    m = measure(model, x, update, tau=1.0)  # unnormalized direction, t = 1
    m_unit = measure(
        model,
        x,
        {k: u / direction_norm(update) for k, u in update.items()},
        tau=float(direction_norm(update)),
    )
    assert math.isclose(m.r, m_unit.r, rel_tol=1e-4)


# ------------------------------------------------------------- output containers


class _Output:
    def __init__(self, logits):
        self.logits = logits
        self.hidden = logits * 2


class _Wrapped(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.body = MLP(hidden=16)

    def forward(self, x, scale=None):
        z = self.body(x)
        if scale is not None:
            z = z * scale[:, None]
        if self.kind == "hf":
            return _Output(z)
        if self.kind == "dict":
            return {"hidden": z.sum(), "logits": z}
        return (z.sum(), z)  # a Hugging Face return_dict=False (loss, logits)


@pytest.mark.parametrize("kind", ["hf", "dict", "tuple"])
def test_structured_outputs_and_dict_inputs(kind):
    torch.manual_seed(0)
    model = _Wrapped(kind)
    x, _ = _inputs("mlp")
    v = random_direction(model, seed=0)
    _, ref = logit_slopes(model.body, x, {k[len("body.") :]: t for k, t in v.items()})
    logits, slopes = logit_slopes(model, x, v)
    torch.testing.assert_close(slopes, ref)
    assert logits.shape == (12, 10)
    scale = torch.linspace(0.5, 2.0, 12)
    _, scaled = logit_slopes(model, {"x": x, "scale": scale}, v, chunk_size=5)
    torch.testing.assert_close(scaled, ref * scale[:, None])
    _, custom = logit_slopes(model, (x,), v, logits_fn=lambda out: model_logits(out, kind))
    torch.testing.assert_close(custom, ref)


def model_logits(out, kind):
    if kind == "hf":
        return out.logits
    if kind == "dict":
        return out["logits"]
    return out[1]


def test_ambiguous_output_is_refused_not_guessed():
    class FeaturesAndLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.tanh(self.body(x))
            return h, self.head(h)  # the first tensor is not the logits

    torch.manual_seed(0)
    model = FeaturesAndLogits()
    x = torch.randn(5, 4)
    v = random_direction(model, seed=0)
    with pytest.raises(TypeError, match=r"tuple\(Tensor\(5, 6\), Tensor\(5, 3\)\).*logits_fn"):
        measure(model, x, v)
    ctrl = RadiusController(torch.optim.SGD(model.parameters(), lr=0.1), model)
    model(x)[1].sum().backward()
    with pytest.raises(TypeError, match="logits_fn"):
        ctrl.step()
    right = measure(model, x, v, logits_fn=lambda out: out[1])
    plain = nn.Sequential(model.body, nn.Tanh(), model.head)
    _, ref = logit_slopes(plain, x, [v[n] for n, _ in model.named_parameters()])
    assert right.rho_a == pytest.approx(
        math.pi / float((ref.amax(-1) - ref.amin(-1)).max()), rel=1e-6
    )


def test_hugging_face_gpt2_with_eager_attention():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=50,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 50, (2, 6))
    attn = torch.ones(2, 6, dtype=torch.long)
    v = random_direction(model, seed=0)
    snap = snapshot(model)
    logits, slopes = logit_slopes(model, {"input_ids": ids, "attention_mask": attn}, v)
    assert slopes.shape == (2, 6, 50)
    assert_unchanged(model, snap)
    _, fd = logit_slopes(model, {"input_ids": ids, "attention_mask": attn}, v, method="fd")
    assert rel_err(slopes, fd.double()) < 1e-4


def test_a_direction_on_a_tied_weight_moves_both_of_its_uses():
    """TinyLM ties lm_head.weight to tok_emb.weight: the slopes along that one matrix
    are the sum of the slopes along its two uses in an untied copy."""
    torch.manual_seed(0)
    model = TinyLM().eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    d = torch.randn(model.tok_emb.weight.shape, generator=torch.Generator().manual_seed(1))

    def along(net, name):
        direction = {n: None for n, _ in net.named_parameters()}
        direction[name] = d
        return logit_slopes(net, ids, direction)[1]

    untied = copy.deepcopy(model)
    untied.lm_head.weight = nn.Parameter(model.tok_emb.weight.detach().clone())
    embedding, head = along(untied, "tok_emb.weight"), along(untied, "lm_head.weight")
    assert embedding.abs().max() > 1e-3 and head.abs().max() > 1e-3
    torch.testing.assert_close(along(model, "tok_emb.weight"), embedding + head)
