"""RadiusController as a torch.optim.Optimizer everywhere (issue 24): deep copies and
whole-object saves of model + controller, argument types, parameters frozen after
construction."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import build_model
from torch import nn

from ghoststep.controller import RadiusController, Recording, Sampling
from ghoststep.controller._capture import _CaptureHook
from ghoststep.monitor import CSVSink


def _batches(n_rows: int, n: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, n_rows, (size,), generator=g) for _ in range(n)]


def _fresh(method: str, options: dict | None = None):
    torch.manual_seed(0)
    model = build_model("cnn_bn")
    inner = torch.optim.Adam(model.parameters(), lr=0.05)
    return model, RadiusController(inner, model, method=method, seed=7, **options or {})


def _train(model, ctrl, Xtr, ytr, batches, seed: int = 11) -> None:
    torch.manual_seed(seed)  # the same global RNG for every continuation compared
    for idx in batches:
        ctrl.zero_grad()
        F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
        ctrl.step()


def _record(stats) -> dict[str, str]:
    """StepStats scalars but the wall time, as reprs (equal reprs: bitwise-equal floats)."""
    return {k: repr(v) for k, v in stats.as_dict().items() if k != "radius_seconds"}


def _same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same_tree, a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def _assert_same_run(model_a, ctrl_a, model_b, ctrl_b, n_last: int) -> None:
    """Bitwise: model state (parameters and BatchNorm buffers), the last n StepStats,
    the inner optimizer's state and the controller's own state."""
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    hist_a, hist_b = list(ctrl_a.history)[-n_last:], list(ctrl_b.history)[-n_last:]
    assert len(hist_a) == len(hist_b) == n_last
    assert [_record(s) for s in hist_a] == [_record(s) for s in hist_b]
    assert _same_tree(ctrl_a.optimizer.state_dict(), ctrl_b.optimizer.state_dict())
    assert _same_tree(ctrl_a.state_dict()["ghoststep"], ctrl_b.state_dict()["ghoststep"])


def _capture_hooks(model: nn.Module) -> list[_CaptureHook]:
    hooks = [*model._forward_pre_hooks.values(), *model._forward_hooks.values()]
    return [h for h in hooks if isinstance(h, _CaptureHook)]


def _hook_table(model: nn.Module) -> list[tuple[int, object, object]]:
    """(id, hook object, the capture it feeds) for the model's capture hooks."""
    table = []
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key, hook in hooks.items():
            if isinstance(hook, _CaptureHook):
                table.append((key, hook, hook._ref and hook._ref()))
    return table


def _save_load(obj):
    blob = io.BytesIO()
    torch.save(obj, blob)
    blob.seek(0)
    return torch.load(blob, weights_only=False)


COPIERS = {"deepcopy": copy.deepcopy, "torch_save": _save_load}
CASES = [
    ("jvp", {}),
    ("fast", {}),
    ("fd", {}),
    ("auto", {}),
    ("jvp", {"subset": 24, "buffer_size": 6, "window": 3, "mode": "set", "target_r": 0.8}),
    ("fast", {"subset": 24, "buffer_size": 6, "window": 3}),
]


@pytest.mark.parametrize("copier", list(COPIERS))
@pytest.mark.parametrize(
    "method, options", CASES, ids=["jvp", "fast", "fd", "auto", "jvp_sampling", "fast_sampling"]
)
def test_copy_with_model_continues_bitwise(digits, copier, method, options):
    """deepcopy / torch.save+load of {"model": m, "opt": ctrl} after 4 steps, then 4 more
    steps on the original and on the copy: both equal, bitwise, an uninterrupted run
    that was never copied; the original's hooks are the very same objects."""
    Xtr, ytr, _, _ = digits
    batches = _batches(len(Xtr), 8, 48, seed=3)

    model_ref, ctrl_ref = _fresh(method, options)  # never copied
    _train(model_ref, ctrl_ref, Xtr, ytr, batches[:4], seed=1)
    _train(model_ref, ctrl_ref, Xtr, ytr, batches[4:], seed=2)

    model, ctrl = _fresh(method, options)
    _train(model, ctrl, Xtr, ytr, batches[:4], seed=1)
    hooks_before = _hook_table(model)
    assert len(hooks_before) == 2 and all(c is ctrl._capture for _, _, c in hooks_before)

    bundle = COPIERS[copier]({"model": model, "opt": ctrl})
    model2, ctrl2 = bundle["model"], bundle["opt"]
    assert model2 is not model and ctrl2 is not ctrl
    assert isinstance(ctrl2, torch.optim.Optimizer) and ctrl2.model is model2
    # wired to the copied model: its parameters, groups shared with its inner optimizer
    assert ctrl2.param_groups is ctrl2.optimizer.param_groups
    assert ctrl2.state is ctrl2.optimizer.state
    copied = {id(p) for p in model2.parameters()}
    assert all(id(p) in copied for g in ctrl2.param_groups for p in g["params"])
    assert ctrl2.method == ctrl.method and ctrl2.step_count == ctrl.step_count == 4
    # the original's hooks are untouched: same ids, same objects, same capture
    assert _hook_table(model) == hooks_before
    # the copy's hooks (same ids, same order) feed the copy's capture
    assert [k for k, _, _ in _hook_table(model2)] == [k for k, _, _ in hooks_before]
    assert all(c is ctrl2._capture for _, _, c in _hook_table(model2))

    _train(model, ctrl, Xtr, ytr, batches[4:], seed=2)
    _train(model2, ctrl2, Xtr, ytr, batches[4:], seed=2)
    _assert_same_run(model_ref, ctrl_ref, model, ctrl, n_last=4)
    _assert_same_run(model_ref, ctrl_ref, model2, ctrl2, n_last=4)
    assert _hook_table(model) == hooks_before
    assert ctrl_ref.history[-1].step == ctrl.history[-1].step == ctrl2.history[-1].step == 8
    print(
        f"{copier} {method} {options}: original and copy continue bitwise; "
        f"last r_after {ctrl2.last.r_after:.6g}, scales "
        f"{[round(s.scale, 6) for s in list(ctrl2.history)[4:]]}"
    )


@pytest.mark.parametrize("copier", list(COPIERS))
def test_copy_hooks_fire_on_the_copy_only(digits, copier):
    """Forwards of the copied model feed the copy's capture, forwards of the original the
    original's; with micro_batches="last" a crossed hook would replace the batch."""
    Xtr, ytr, _, _ = digits
    model, ctrl = _fresh("jvp", {"micro_batches": "last"})
    _train(model, ctrl, Xtr, ytr, _batches(len(Xtr), 2, 32), seed=1)
    bundle = COPIERS[copier]({"model": model, "opt": ctrl})
    model2, ctrl2 = bundle["model"], bundle["opt"]
    xa, xb, xc = Xtr[:20], Xtr[20:50], Xtr[50:90]

    model(xa)
    assert [e.args[0] for e in ctrl._capture.entries] == [xa]
    assert ctrl2._capture.entries == []
    model2(xb)
    assert [e.args[0] for e in ctrl2._capture.entries] == [xb]
    assert [e.args[0] for e in ctrl._capture.entries] == [xa]  # not replaced by xb
    model(xc)
    assert [e.args[0] for e in ctrl._capture.entries] == [xc]
    assert [e.args[0] for e in ctrl2._capture.entries] == [xb]

    # and the steps measure on their own batches: 30 rows for the copy, 40 for the
    # original (the bottleneck index is a row of the batch measured)
    for m, c, x, y in ((model2, ctrl2, xb, ytr[20:50]), (model, ctrl, xc, ytr[50:90])):
        c.zero_grad()
        F.cross_entropy(m(x), y).backward()
        c.step()
        assert c.last is not None and not c.last.skipped and 0 <= c.last.bottleneck < len(x)
    # a copy of the model alone (EMA twin) still never feeds either controller
    twin = copy.deepcopy(model)
    assert all(h._ref is None for h in _capture_hooks(twin))
    twin(Xtr[:5])
    assert ctrl._capture.entries == [] and ctrl2._capture.entries == []
    print(f"{copier}: copy captured {len(xb)} rows, original {len(xc)} rows, EMA twin none")


@pytest.mark.parametrize("copier", list(COPIERS))
def test_copy_of_controller_alone_brings_its_own_model(digits, copier):
    """Documented behaviour (as for any torch.optim optimizer, whose copy alone holds
    copies of the parameters): a copy of the controller alone gets its own copy of the
    model, ``copy.model``, wired to it; the original model does not feed it."""
    Xtr, ytr, _, _ = digits
    batches = _batches(len(Xtr), 6, 40, seed=5)
    model, ctrl = _fresh("jvp")
    _train(model, ctrl, Xtr, ytr, batches[:3], seed=1)
    ctrl2 = COPIERS[copier](ctrl)
    assert ctrl2.model is not model and isinstance(ctrl2.model, type(model))
    own = {id(p) for p in ctrl2.model.parameters()}
    assert all(id(p) in own for g in ctrl2.param_groups for p in g["params"])

    kept = copy.deepcopy(model.state_dict())
    model(Xtr[:8])  # the original model's forward is the original controller's
    assert len(ctrl._capture.entries) == 1 and ctrl2._capture.entries == []
    ctrl._capture.entries = []
    model.load_state_dict(kept)  # undo that forward's BatchNorm statistics
    _train(model, ctrl, Xtr, ytr, batches[3:], seed=2)
    _train(ctrl2.model, ctrl2, Xtr, ytr, batches[3:], seed=2)
    _assert_same_run(model, ctrl, ctrl2.model, ctrl2, n_last=3)


def test_copy_with_scheduler_and_sink(digits, tmp_path):
    """An LR scheduler patches ``step`` on the instance (a closure over the original):
    the copy drops it, so its step is its own and the bundle pickles. Sinks (open files)
    stay with the original; the copy starts with none."""
    Xtr, ytr, _, _ = digits
    batches = _batches(len(Xtr), 6, 32, seed=6)
    torch.manual_seed(0)
    model = build_model("mlp")
    sink = CSVSink(tmp_path / "stats.csv")
    ctrl = RadiusController(
        torch.optim.SGD(model.parameters(), lr=0.5), model, recording=Recording(sinks=[sink])
    )
    sched = torch.optim.lr_scheduler.StepLR(ctrl, step_size=2, gamma=0.5)
    assert "step" in ctrl.__dict__  # the scheduler's wrapper
    for idx in batches[:3]:
        ctrl.zero_grad()
        F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
        ctrl.step()
        sched.step()

    for copier in COPIERS.values():
        bundle = copier({"model": model, "opt": ctrl, "sched": sched})
        model2, ctrl2, sched2 = bundle["model"], bundle["opt"], bundle["sched"]
        assert sched2.optimizer is ctrl2 and ctrl2.sinks == [] and ctrl.sinks == [sink]
        assert ctrl2.param_groups[0]["lr"] == ctrl.param_groups[0]["lr"]
        before = ctrl.step_count
        for idx in batches[3:]:
            ctrl2.zero_grad()
            F.cross_entropy(model2(Xtr[idx]), ytr[idx]).backward()
            ctrl2.step()
            sched2.step()
        assert ctrl.step_count == before and ctrl2.step_count == before + 3
        assert ctrl2.param_groups[0]["lr"] == 0.5 * 0.5**3
        assert ctrl.param_groups[0]["lr"] == 0.5 * 0.5
    ctrl.close()
    rows = (tmp_path / "stats.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3  # header and the original's three steps only


# ------------------------------------------------------------------ argument types

BAD_ARGUMENTS = [
    ("target_r", True),
    ("target_r", "1.0"),
    ("target_r", None),
    ("target_r", torch.tensor(1.0)),
    ("temperature", True),
    ("temperature", "2"),
    ("margin", True),
    ("margin", "0.1"),
    ("quantile", True),
    ("quantile", "0.5"),
    ("seed", True),
    ("seed", 1.5),
    ("seed", "3"),
    ("chunk_size", True),
    ("chunk_size", 0),
    ("chunk_size", 2.0),
    ("subset", True),
    ("buffer_size", True),
    ("window", True),
    ("history_size", True),
]


@pytest.mark.parametrize("name, value", BAD_ARGUMENTS, ids=[f"{n}={v!r}" for n, v in BAD_ARGUMENTS])
def test_non_numbers_are_rejected_with_the_argument_named(name, value):
    model = nn.Linear(3, 2)
    with pytest.raises((TypeError, ValueError), match=name) as err:
        RadiusController(torch.optim.SGD(model.parameters(), lr=0.1), model, **{name: value})
    print(f"{name}={value!r}: {type(err.value).__name__}: {err.value}")


def test_numbers_of_other_types_are_accepted():
    np = pytest.importorskip("numpy")
    model = nn.Linear(3, 2)
    ctrl = RadiusController(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model,
        target_r=1,
        temperature=np.float32(2.0),
        margin=0,
        sampling=Sampling(quantile=1, seed=np.int64(3)),
    )
    assert ctrl.target_r == 1.0 and type(ctrl.target_r) is float
    assert ctrl.temperature == 2.0 and ctrl.margin == 0.0


# ------------------------------------------------------------------ frozen after construction


def _frozen_case(digits, how: str):
    Xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = build_model("mlp")
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=0.01), model)
    _train(model, ctrl, Xtr, ytr, _batches(len(Xtr), 2, 32), seed=1)
    if how == "requires_grad_off":
        for p in model.parameters():
            p.requires_grad_(False)
        ctrl.zero_grad()
        model(Xtr[:32])  # a training forward (nothing to backward through)
    else:  # "no_gradient": trainable, but no backward since zero_grad(set_to_none)
        ctrl.zero_grad()
        model(Xtr[:32])
    return model, ctrl


@pytest.mark.parametrize("how", ["requires_grad_off", "no_gradient"])
def test_no_parameter_with_a_gradient_skips_with_a_warning(digits, how):
    """Item 3 (implemented in RadiusController.step by another change): every parameter
    frozen after construction, or no parameter with a gradient, gives a RuntimeWarning
    and a skipped step; parameters and inner optimizer state bitwise unchanged."""
    model, ctrl = _frozen_case(digits, how)
    params = [p.detach().clone() for p in model.parameters()]
    inner = copy.deepcopy(ctrl.optimizer.state_dict())
    skipped = ctrl.skipped_steps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctrl.step()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert messages, "expected a RuntimeWarning"
    assert ctrl.last is not None and ctrl.last.skipped
    assert ctrl.skipped_steps == skipped + 1
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert _same_tree(inner, ctrl.optimizer.state_dict())
    print(f"{how}: RuntimeWarning {messages[0]!r}; last.skipped={ctrl.last.skipped}")


def test_whole_object_save_of_a_causal_lm_with_ignore_index():
    """ignore_index on a Hugging Face causal LM builds the shifted label mask: picklable
    (a partial of a module-level function), so the whole-object save works there too."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    ctrl = RadiusController(
        torch.optim.AdamW(model.parameters(), lr=0.05),
        model,
        sampling=Sampling(ignore_index=-100),
        method="jvp",
    )
    assert ctrl.sampling.mask_fn is not None  # the shifted label mask
    tokens = torch.randint(1, 50, (4, 12), generator=torch.Generator().manual_seed(1))
    labels = tokens.clone()
    labels[:, 8:] = -100

    def train(m, c):
        c.zero_grad()
        m(input_ids=tokens, labels=labels).loss.backward()
        c.step()

    train(model, ctrl)
    bundle = _save_load({"model": model, "opt": ctrl})
    train(model, ctrl)
    train(bundle["model"], bundle["opt"])
    for a, b in zip(model.parameters(), bundle["model"].parameters(), strict=True):
        assert torch.equal(a, b)
    assert _record(ctrl.last) == _record(bundle["opt"].last)
