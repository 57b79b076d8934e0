"""The radius promise in the training stack people run (issue 21): mixed precision,
torch.compile, side forwards, Hugging Face causal LMs, gradient accumulation, degenerate
batches, resume and ``method="auto"``.

Every check re-measures the update the controller actually applied, independently, with
a float64 JVP at the old parameters on the batch the gradient came from
(``helpers.realised_r``), and compares it with the promise: r <= target_r * 1.001 in
float32 whichever method runs, r <= target_r * 1.02 for bf16 / fp16.
"""

from __future__ import annotations

import copy
import inspect
import io
import math
import os
import warnings
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    applied_update,
    build_model,
    digit_batches,
    position_spreads,
    realised_r,
    trainable_state,
)
from torch import nn

from ghoststep.controller import RadiusController, Sampling

FLOAT32_BOUND = 1.001  # the float32 promise, whichever method runs
LOW_BOUND = 1.02  # the bf16 / fp16 promise
METHODS = ("jvp", "fast", "fd", "auto")

pytestmark = pytest.mark.usefixtures("flush_denormals")


def _autocast(dtype):
    return nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)


def _ce(out, y):
    return F.cross_entropy(out.float(), y)


def _run(
    model,
    ctrl,
    batches,
    *,
    call=None,
    loss_fn=_ce,
    body_autocast=None,
    forward_autocast=None,
    step_autocast=None,
    between=None,
    cast_inputs=None,
    measure="jvp",
):
    """A plain loop (zero_grad, forward, backward, [between], step) over ``batches``;
    returns the realised r of every applied update, re-measured in float64."""
    call = model if call is None else call
    rs = []
    for x, y in batches:
        if cast_inputs is not None:
            x = x.to(cast_inputs)
        old = trainable_state(model)
        ctrl.zero_grad()
        with _autocast(body_autocast):
            with _autocast(forward_autocast):
                loss = loss_fn(call(x), y)
            loss.backward()
            if between is not None:
                between()
            with _autocast(step_autocast):
                ctrl.step()
        applied = applied_update(old, trainable_state(model))
        rs.append(realised_r(model, old, x, applied, method=measure))
    return rs


def _bound(ctrl) -> bool:
    """Whether clip bound (s < 1) on at least one step: otherwise the check is vacuous."""
    return any(s.scale < 1.0 for s in ctrl.history if not s.skipped)


def _max(rs):
    return max(rs) if rs else math.nan


def _equal_nested(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(_equal_nested(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return (
            isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(_equal_nested(x, y) for x, y in zip(a, b, strict=True))
        )
    return a == b


# --------------------------------------------------------------------------- the helper


def test_realised_r_helper_closed_form_linear():
    """z = W x + b: the tangent along (dW, db) is dW x + db, its spread is known."""
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    x = torch.randn(7, 5)
    old = trainable_state(model)
    dW, db = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    applied = {"weight": dW, "bias": db}
    tangent = x.double() @ dW.T + db
    spread = tangent.amax(-1) - tangent.amin(-1)
    r = realised_r(model, old, x, applied)
    assert r == pytest.approx(float(spread.max()) / math.pi, rel=1e-12)
    mask = torch.zeros(7, dtype=torch.bool)
    mask[2] = True
    assert realised_r(model, old, x, applied, mask=mask) == pytest.approx(
        float(spread[2]) / math.pi, rel=1e-12
    )
    assert realised_r(model, old, x, applied, temperature=2.0) == pytest.approx(r / 2, rel=1e-12)
    # the old values are those passed, not the module's current ones
    with torch.no_grad():
        model.weight.add_(1.0)
    assert realised_r(model, old, x, applied) == pytest.approx(r, rel=1e-12)


def test_realised_r_helper_batchnorm_matches_central_difference():
    """A train-mode CNN with BatchNorm: the float64 JVP equals a float64 central
    difference of the batch-statistics function; buffers and the RNG are untouched."""
    torch.manual_seed(0)
    model = build_model("cnn_bn").train()
    x = torch.rand(6, 64)
    old = trainable_state(model)
    applied = {n: 1e-2 * torch.randn_like(p, dtype=torch.float64) for n, p in old.items()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    spreads = position_spreads(model, old, x, applied)

    twin = copy.deepcopy(model).double()
    h = 1e-5

    def at(t):
        with torch.no_grad():
            for n, p in twin.named_parameters():
                p.copy_(old[n].double() + t * applied[n])
            return twin(x.double())

    diff = (at(h) - at(-h)) / (2 * h)
    expected = diff.amax(-1) - diff.amin(-1)
    torch.testing.assert_close(spreads, expected, rtol=1e-6, atol=1e-9)
    central = position_spreads(model, old, x, applied, method="central")
    torch.testing.assert_close(central, spreads, rtol=1e-6, atol=1e-9)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert torch.equal(torch.get_rng_state(), rng)


# --------------------------------------------------------------------------- row 1: autocast


def test_fast_step_inside_bf16_autocast_measures_without_it(digits):
    torch.manual_seed(0)
    model = build_model("mlp")
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=1.0), model, method="fast")
    rs = _run(model, ctrl, digit_batches(digits, 3), body_autocast=torch.bfloat16)
    assert _max(rs) <= FLOAT32_BOUND, rs
    assert _bound(ctrl)


def test_jvp_step_inside_bf16_autocast_within_low_precision_bound(digits):
    torch.manual_seed(0)
    model = build_model("mlp")
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=1.0), model, method="jvp")
    rs = _run(model, ctrl, digit_batches(digits, 3), body_autocast=torch.bfloat16)
    assert _max(rs) <= LOW_BOUND, rs
    assert _bound(ctrl)


def test_jvp_autocast_around_step_only_changes_nothing(digits):
    """Training forward in float32, only ``step()`` inside an autocast block: the
    measurement is the float32 one (exact JVP)."""
    torch.manual_seed(0)
    model = build_model("transformer")
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=1.0), model, method="jvp")
    rs = _run(model, ctrl, digit_batches(digits, 3), step_autocast=torch.bfloat16)
    assert _max(rs) <= FLOAT32_BOUND, rs
    assert _bound(ctrl)


# --------------------------------------------------------------------------- row 2: low precision


def test_fast_with_bf16_parameters_refused_at_construction():
    model = build_model("mlp").to(torch.bfloat16)
    with pytest.raises(ValueError, match='"jvp"'):
        RadiusController(torch.optim.Adam(model.parameters(), lr=1.0), model, method="fast")


@pytest.mark.parametrize("method", ["jvp", None], ids=["jvp", "default"])
def test_bf16_parameters_within_low_precision_bound(digits, method):
    torch.manual_seed(0)
    model = build_model("mlp").to(torch.bfloat16)
    kwargs = {} if method is None else {"method": method}
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=1.0), model, **kwargs)
    rs = _run(model, ctrl, digit_batches(digits, 3), cast_inputs=torch.bfloat16)
    assert _max(rs) <= LOW_BOUND, rs
    assert _bound(ctrl)


def _fp16_autocast_supported() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            out = torch.ones(2, 2) @ torch.ones(2, 2)
        return out.dtype == torch.float16
    except (RuntimeError, ValueError):
        return False


def test_fp16_autocast_grad_scaler_default_method(digits):
    if not _fp16_autocast_supported():
        pytest.skip("float16 autocast is not supported on this CPU build")
    torch.manual_seed(0)
    model = build_model("mlp")
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=1.0), model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    rs = []
    for x, y in digit_batches(digits, 4):
        old = trainable_state(model)
        ctrl.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = _ce(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(ctrl)
        scaler.update()
        rs.append(realised_r(model, old, x, applied_update(old, trainable_state(model))))
    assert _max(rs) <= LOW_BOUND, rs
    assert _bound(ctrl)


# --------------------------------------------------------------------------- row 3: compile


@pytest.mark.slow
def test_compiled_model_every_method(digits):
    """``torch.compile(model)`` (inductor, CPU), the controller built on the compiled
    module, the loop calling it: every method runs and keeps the float32 promise. One
    compiled module serves all methods (reset to the same weights in place)."""
    torch.manual_seed(0)
    model = build_model("mlp")
    init = copy.deepcopy(model.state_dict())
    cmodel = torch.compile(model)
    batches = digit_batches(digits, 3)
    failures = {}
    for method in METHODS:
        model.load_state_dict(init)
        ctrl = None
        try:
            ctrl = RadiusController(
                torch.optim.Adam(cmodel.parameters(), lr=1.0), cmodel, method=method
            )
            rs = _run(model, ctrl, batches, call=cmodel)
        except Exception as err:  # noqa: BLE001 -- report every method's outcome
            failures[method] = f"{type(err).__name__}: {str(err)[:200]}"
            continue
        finally:
            if ctrl is not None:
                ctrl.close()
        if not (_max(rs) <= FLOAT32_BOUND and _bound(ctrl)):
            failures[method] = f"realised r {rs}, bound: {_bound(ctrl)}"
    assert not failures, failures


# --------------------------------------------------------------------------- row 4: side forwards


@pytest.mark.parametrize("side", ["no_grad", "inference_mode"])
def test_side_forward_on_another_batch_is_not_the_batch(digits, side):
    """A metrics forward (train mode, no grad) on another, small batch between
    ``backward()`` and ``step()``: the radius is the gradient's batch's."""
    torch.manual_seed(0)
    model = build_model("mlp")
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=1.0), model, method="jvp")
    X_te = digits[2]
    context = torch.no_grad if side == "no_grad" else torch.inference_mode

    def metrics():
        with context():
            model(X_te[:4]).argmax(-1)

    rs = _run(model, ctrl, digit_batches(digits, 3), between=metrics)
    assert _max(rs) <= FLOAT32_BOUND, rs
    assert _bound(ctrl)


# --------------------------------------------------------------------------- row 5: HF causal LM


def _tiny_gpt2():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=100,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager")


@pytest.mark.parametrize("method", ["jvp", None], ids=["jvp", "default"])
def test_hf_causal_lm_mask_shifted_like_the_loss(method):
    torch.manual_seed(0)
    model = _tiny_gpt2().train()
    kwargs = {} if method is None else {"method": method}
    ctrl = RadiusController(
        torch.optim.Adam(model.parameters(), lr=0.5),
        model,
        sampling=Sampling(ignore_index=-100),
        **kwargs,
    )
    g = torch.Generator().manual_seed(1)
    rs = []
    for _ in range(3):
        ids = torch.randint(0, 100, (4, 16), generator=g)
        labels = ids.clone()
        prompt = torch.randint(3, 12, (4,), generator=g)
        for row, length in enumerate(prompt.tolist()):
            labels[row, :length] = -100  # the prompt is not in the loss
        batch = {"input_ids": ids, "labels": labels}
        old = trainable_state(model)
        ctrl.zero_grad()
        model(**batch).loss.backward()
        ctrl.step()
        # the positions in the loss: logits at t predict labels[t + 1]; the last is out
        in_loss = torch.zeros_like(labels, dtype=torch.bool)
        in_loss[:, :-1] = labels[:, 1:] != -100
        applied = applied_update(old, trainable_state(model))
        rs.append(realised_r(model, old, batch, applied, mask=in_loss))
    assert _max(rs) <= FLOAT32_BOUND, rs
    assert _bound(ctrl)


# --------------------------------------------------------------------------- row 6: accumulation


@pytest.mark.parametrize("method", ["jvp", "fast"])
def test_gradient_accumulation_default_bounds_every_micro_batch(digits, method):
    """3 micro-batches, one step, default ``micro_batches``: every micro-batch is inside
    the radius. The first micro-batch (inputs x3) is the bottleneck, not the last."""
    torch.manual_seed(0)
    model = build_model("mlp")
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=1.0), model, method=method)
    batches = digit_batches(digits, 9, size=32)
    rs = []
    for step in range(3):
        micro = batches[3 * step : 3 * step + 3]
        micro = [(3.0 * micro[0][0], micro[0][1]), *micro[1:]]
        old = trainable_state(model)
        ctrl.zero_grad()
        for x, y in micro:
            (_ce(model(x), y) / len(micro)).backward()
        ctrl.step()
        applied = applied_update(old, trainable_state(model))
        rs.append(max(realised_r(model, old, x, applied) for x, _ in micro))
    assert _max(rs) <= FLOAT32_BOUND, rs
    assert _bound(ctrl)


# --------------------------------------------------------------------------- row 7: degenerate


def _warm_up(model, ctrl, batches, loss_fn=_ce):
    for x, y in batches:
        ctrl.zero_grad()
        loss_fn(model(x), y).backward()
        ctrl.step()


def _check_skipped(model, ctrl, bad_step):
    """Run ``bad_step``: one RuntimeWarning, no exception, a skipped step, parameters
    and the inner optimizer's state bitwise unchanged."""
    params = [p.detach().clone() for p in model.parameters()]
    inner = copy.deepcopy(ctrl.optimizer.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bad_step()
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert runtime, [str(w.message) for w in caught]
    assert ctrl.last is not None and ctrl.last.skipped
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert _equal_nested(inner, ctrl.optimizer.state_dict())


@pytest.mark.parametrize("method", ["jvp", "fast"])
def test_empty_batch_is_skipped(digits, method):
    torch.manual_seed(0)
    model = build_model("mlp")
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=1.0), model, method=method)
    _warm_up(model, ctrl, digit_batches(digits, 2))

    def empty():
        ctrl.zero_grad()
        x, y = torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)
        F.cross_entropy(model(x), y, reduction="sum").backward()
        ctrl.step()

    _check_skipped(model, ctrl, empty)


@pytest.mark.parametrize("method", ["jvp", "fast"])
def test_every_position_masked_is_skipped(method):
    torch.manual_seed(0)
    model = build_model("tinylm", vocab_size=50)
    current = {}

    def lm_loss(logits, y):
        current["targets"] = y
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")

    ctrl = RadiusController(
        torch.optim.Adam(model.parameters(), lr=0.1),
        model,
        method=method,
        sampling=Sampling(ignore_index=-100, targets_fn=lambda inputs: current["targets"]),
    )
    g = torch.Generator().manual_seed(0)
    warm = []
    for _ in range(2):
        ids = torch.randint(0, 50, (2, 9), generator=g)
        warm.append((ids[:, :-1], ids[:, 1:]))
    _warm_up(model, ctrl, warm, loss_fn=lm_loss)

    def masked():
        ctrl.zero_grad()
        ids = torch.randint(0, 50, (2, 8), generator=g)
        lm_loss(model(ids), torch.full_like(ids, -100)).backward()
        ctrl.step()

    _check_skipped(model, ctrl, masked)


@pytest.mark.parametrize("how", ["grads_none", "requires_grad_off"])
@pytest.mark.parametrize("method", ["jvp", "fast"])
def test_no_gradient_on_any_parameter_is_skipped(digits, method, how):
    torch.manual_seed(0)
    model = build_model("mlp")
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=1.0), model, method=method)
    _warm_up(model, ctrl, digit_batches(digits, 2))
    x, _ = digit_batches(digits, 1, seed=5)[0]

    def no_gradient():
        ctrl.zero_grad()  # every .grad None
        if how == "requires_grad_off":
            for p in model.parameters():
                p.requires_grad_(False)
        model(x)  # a training forward, but no backward
        ctrl.step()

    _check_skipped(model, ctrl, no_gradient)


# --------------------------------------------------------------------------- row 8: resume


def _resume_model():
    return build_model("mlp", hidden=32)


@pytest.mark.parametrize("method", METHODS)
def test_resume_is_bitwise_the_uninterrupted_run(digits, method):
    batches = digit_batches(digits, 6, size=32)

    def fresh(seed):
        torch.manual_seed(seed)
        model = _resume_model()
        return model, RadiusController(
            torch.optim.Adam(model.parameters(), lr=1.0), model, method=method
        )

    model, ctrl = fresh(0)
    _warm_up(model, ctrl, batches)
    expected = [p.detach().clone() for p in model.parameters()]
    assert _bound(ctrl)

    model, ctrl = fresh(0)
    _warm_up(model, ctrl, batches[:3])
    blob = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": ctrl.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)

    model, ctrl = fresh(1)  # other weights: everything must come from the checkpoint
    model.load_state_dict(saved["model"])
    ctrl.load_state_dict(saved["opt"])
    _warm_up(model, ctrl, batches[3:])
    diffs = [float((a - b).abs().max()) for a, b in zip(expected, model.parameters(), strict=True)]
    assert all(torch.equal(a, b) for a, b in zip(expected, model.parameters(), strict=True)), diffs


# --------------------------------------------------------------------------- row 9: auto


def test_auto_is_the_default_method():
    default = inspect.signature(RadiusController).parameters["method"].default
    assert default == "auto"


def _first_step(model, ctrl, x, y, *, forward_autocast=None):
    ctrl.zero_grad()
    with _autocast(forward_autocast):
        loss = _ce(model(x), y)
    loss.backward()
    ctrl.step()


def _auto_reload(model, ctrl, expected):
    """The choice is in state_dict: a fresh controller that loads it reports it."""
    blob = io.BytesIO()
    torch.save(ctrl.state_dict(), blob)
    blob.seek(0)
    other = RadiusController(torch.optim.Adam(model.parameters(), lr=1.0), model)
    other.load_state_dict(torch.load(blob, weights_only=True))
    assert other.method == expected
    other.close()


@pytest.mark.parametrize(
    ("setting", "expected"),
    [("float32", "fast"), ("autocast_bf16", "jvp"), ("bf16_params", "jvp")],
)
@pytest.mark.parametrize("explicit", [False, True], ids=["default", "auto"])
def test_auto_chooses_by_precision(digits, setting, expected, explicit):
    torch.manual_seed(0)
    model = build_model("mlp")
    x, y = digit_batches(digits, 1)[0]
    if setting == "bf16_params":
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    kwargs = {"method": "auto"} if explicit else {}
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=1.0), model, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback here
        _first_step(
            model,
            ctrl,
            x,
            y,
            forward_autocast=torch.bfloat16 if setting == "autocast_bf16" else None,
        )
    assert ctrl.method == expected
    ctrl.close()
    _auto_reload(model, ctrl, expected)


class _ReluNoJvp(torch.autograd.Function):
    """ReLU as a custom autograd.Function with a backward and no jvp."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0)


class _CustomFunctionMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(_ReluNoJvp.apply(self.fc1(x)))


class _BagClassifier(nn.Module):
    """Bag of token ids -> 10 classes through ``nn.EmbeddingBag`` (no forward AD)."""

    def __init__(self):
        super().__init__()
        self.bag, self.head = nn.EmbeddingBag(40, 16, mode="mean"), nn.Linear(16, 10)

    def forward(self, ids):
        return self.head(self.bag(ids))


@pytest.mark.parametrize("arch", ["custom_function", "embedding_bag"])
def test_auto_falls_back_to_fast_without_forward_ad(digits, arch):
    """Under autocast "auto" prefers "jvp"; an op without forward-mode AD makes it fall
    back to "fast" with one RuntimeWarning, and the step is still inside the radius."""
    torch.manual_seed(0)
    if arch == "custom_function":
        model = _CustomFunctionMLP()
        batches = digit_batches(digits, 3)
    else:
        model = _BagClassifier()
        g = torch.Generator().manual_seed(0)
        batches = [
            (torch.randint(0, 40, (32, 6), generator=g), torch.randint(0, 10, (32,), generator=g))
            for _ in range(3)
        ]
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=1.0), model, method="auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the re-measurement too needs no forward AD: a float64 central difference
        rs = _run(model, ctrl, batches, forward_autocast=torch.bfloat16, measure="central")
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in runtime]
    assert ctrl.method == "fast"
    assert _max(rs) <= FLOAT32_BOUND, rs
    ctrl.close()
    _auto_reload(model, ctrl, "fast")


# --------------------------------------------------------------------------- fast margin


def test_fast_float32_margin_on_tinylm():
    """Float32, clip binding, "fast" on a TinyLM (V = 200, 4 x 16 tokens), 5 steps:
    the secant's error is inside the margin (r <= 1.001 re-measured in float64)."""
    torch.manual_seed(0)
    model = build_model("tinylm", vocab_size=200)
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=0.3), model, method="fast")
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(5):
        ids = torch.randint(0, 200, (4, 17), generator=g)
        batches.append((ids[:, :-1], ids[:, 1:]))

    def lm_loss(logits, y):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    rs = _run(model, ctrl, batches, loss_fn=lm_loss)
    assert _max(rs) <= FLOAT32_BOUND, rs
    assert _bound(ctrl)


def test_bf16_parameters_on_a_tinylm_round_toward_old():
    """bf16 parameters, a TinyLM (V = 512, d = 64, 8 x 32 tokens): rounding old + s p to
    nearest lengthens entries whose step is between half an ulp and one ulp, and the
    realised r went to 1.015 here (1.049 in bench_precision.py) against 0.97 reported;
    rounded toward old it stays below the target (re-measured in float64)."""
    torch.manual_seed(0)
    model = build_model("tinylm", vocab_size=512, d=64).to(torch.bfloat16)
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=1e-2), model)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(8):
        ids = torch.randint(0, 512, (8, 33), generator=g)
        batches.append((ids[:, :-1], ids[:, 1:]))

    def lm_loss(logits, y):
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    rs = _run(model, ctrl, batches, loss_fn=lm_loss)
    assert ctrl.method == "jvp"
    assert _max(rs) <= 1.0, rs
    assert _bound(ctrl)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scaled_16_bit_update_never_lengthens_an_entry(dtype):
    """old + s p in 16 bits: every entry moves at most s |p_i|, in p_i's direction, and
    at most one ulp short of the nearest rounding."""
    from ghoststep.controller._controller import Proposal

    g = torch.Generator().manual_seed(0)
    old = (torch.randn(4096, generator=g) * 0.1).to(dtype)
    new = (old.float() + torch.randn(4096, generator=g) * 1e-3).to(dtype)
    params, proposed = [old.clone()], [new.clone()]
    proposal = Proposal()
    proposal.params, proposal.spare, proposal.at = params, proposed, 0.0
    proposal.apply(0.37)
    step = (new.float() - old.float()) * 0.37
    moved = params[0].float() - old.float()
    assert bool((moved.abs() <= step.abs()).all())
    assert bool((moved * step >= 0).all())
    nearest = (old.float() + step).to(dtype)
    assert bool(((params[0] == nearest) | (params[0] == torch.nextafter(nearest, old))).all())
    assert bool((params[0] != nearest).any())  # rounding to nearest would have lengthened some


class _LogLogit(nn.Module):
    """Logits [c log(theta), 0] for every row: along an update that raises theta the
    slope shrinks (|z''| / z'^2 = 1 / c), so a one-sided secant at the 0.01-logit move
    "fast" uses is 1 - log(1 + h) / h ~ 5 % low at c = 0.1."""

    def __init__(self, c: float = 0.1):
        super().__init__()
        self.c = c
        self.theta = nn.Parameter(torch.ones(()))

    def forward(self, x):
        z = self.c * torch.log(self.theta) * torch.ones(x.shape[0])
        return torch.stack([z, torch.zeros_like(z)], -1)


def test_fast_secant_checked_on_both_sides_near_the_bound():
    """Near the bound "fast" also differences on the other side and averages the two
    spreads: the one-sided secant alone gives realised r ~ 0.98 * 1.05 > 1.001."""
    torch.manual_seed(0)
    model = _LogLogit()
    ctrl = RadiusController(torch.optim.SGD(model.parameters(), lr=1e3), model, method="fast")
    x, y = torch.zeros(4, 1), torch.zeros(4, dtype=torch.long)  # class 0: theta grows
    rs = _run(model, ctrl, [(x, y)] * 3)
    assert _max(rs) <= FLOAT32_BOUND, rs
    assert _bound(ctrl)


def test_mask_that_cannot_be_aligned_is_an_error():
    """Targets that do not line up with the logit positions: a ValueError naming the
    sizes, never a guessed alignment; the parameters keep their old values."""
    torch.manual_seed(0)
    model = build_model("tinylm", vocab_size=50)
    ctrl = RadiusController(
        torch.optim.Adam(model.parameters(), lr=0.5),
        model,
        ignore_index=-100,
        targets_fn=lambda ids: torch.zeros(ids.shape[0], ids.shape[1] + 1),  # one too many
        method="jvp",
    )
    ids = torch.randint(0, 50, (2, 8))
    before = trainable_state(model)
    F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    with pytest.raises(ValueError, match="mask has 18 entries but the logits have 16"):
        ctrl.step()
    after = trainable_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
