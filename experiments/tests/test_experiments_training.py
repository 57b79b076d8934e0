"""Experiments spike, archgrid, transformer, resnet and their shared training loop.

Each quick preset runs end to end through the runner (results validated, report and
figures written), with science checks that hold even at quick size. The protocol
helpers get small unit tests: plain == bare Adam, the lab's transformers feeding
``internal_radii``, the parallel map's determinism.
"""

from __future__ import annotations

import math

import pytest
import torch

from ghoststep.controller import internal_radii
from ghoststep_lab.common.data import digits, fake_cifar10
from ghoststep_lab.common.models import TinyLM, build_model
from ghoststep_lab.common.results import ClaimRule, evaluate_claims
from ghoststep_lab.common.runner import parallel_map, run_experiment
from ghoststep_lab.common.training import loop, set_seed, spike_run, train
from ghoststep_lab.resnet import augment_cifar, resnet_run

# ----------------------------------------------------------------------------- quick presets


@pytest.mark.slow
def test_spike_quick(tmp_path, run_quick):
    res = run_quick("spike")
    s = res["metrics"]["summary"]
    # the controller never applies r > 1, plain Adam does at the big spikes
    for lr in ("0.0001", "0.001", "0.01"):
        assert s[f"lr={lr}/controller"]["r_applied_max"] <= 1 + 1e-6
    assert s["lr=0.01/plain"]["r_applied_max"] > 10
    # r at the spiked step grows with the spiked learning rate
    assert s["lr=0.01/plain"]["r_at_spike"] > 10 * s["lr=0.0001/plain"]["r_at_spike"]
    # at eta0 = 1e-2 the spike kills plain Adam; the controller keeps learning
    assert s["lr=0.01/plain"]["median"] < 0.3
    assert s["lr=0.01/controller"]["median"] > s["lr=0.01/plain"]["median"] + 0.4
    assert "Test accuracy" in (tmp_path / "spike" / "report.md").read_text()


@pytest.mark.slow
def test_archgrid_quick(run_quick):
    res = run_quick("archgrid")
    s = res["metrics"]["summary"]
    for arch in ("transformer", "mlp_ln", "cnn_bn"):
        ctrl, plain = s[f"{arch}/10000x/controller"], s[f"{arch}/10000x/plain"]
        assert ctrl["r_applied_max"] <= 1 + 1e-6
        assert ctrl["median"] > plain["median"] + 0.2
    assert res["tables"][0]["rows"][0][0] == "Transformer"
    # the one-step spike of the paper's code runs beside the held one
    assert list(res["config"]["spike_lengths"]) == [1, 25]
    for arch in ("transformer", "mlp_ln", "cnn_bn"):
        one = s[f"{arch}/10000x/controller/1-step"]
        assert one["r_applied_max"] <= 1 + 1e-6
    assert "ours, 1-step" in res["tables"][0]["columns"]
    assert any(c["claim"].startswith("[1-step spike]") for c in res["claims"])
    one_step = res["metrics"]["curves"]["mlp_ln/10000x/plain/1-step"]["test_acc"][0]
    held = res["metrics"]["curves"]["mlp_ln/10000x/plain"]["test_acc"][0]
    assert one_step[:4] == held[:4]  # identical until the spike (step 15, evals every 5)


@pytest.mark.slow
def test_transformer_quick(run_quick):
    res = run_quick("transformer")
    binding = res["metrics"]["binding"]
    assert sum(b["n"] for b in binding.values()) == len(res["metrics"]["logged_steps"])
    for b in binding.values():
        assert sum(b["counts"].values()) == b["n"]
    runs = res["metrics"]["runs"]
    # the all-radii step is never longer than the output-only radius allows
    radii = runs["all_radii"]["radii"]
    for out, attn, ffn, bind in zip(
        radii["out"][0], radii["attn"][0], radii["ffn"][0], runs["all_radii"]["binding"][0]
    ):
        assert {"out": out, "attn": attn, "ffn": ffn}[bind] == min(out, attn, ffn)
    f = res["metrics"]["finals"]
    assert all(math.isfinite(f[m]["train_loss"]) for m in f)
    assert f["fixed_1x"]["train_loss"] < f["fixed_1x"]["initial_loss"]


@pytest.mark.slow
def test_resnet_quick(run_quick):
    res = run_quick("resnet")
    s = res["metrics"]["summary"]
    assert abs(s["set r*=1"]["max_r"] - 1.0) <= 1e-5 + 1e-9  # the jvp margin, 1e-5
    assert s["lr=0.5"]["max_r"] > 5 * s["lr=0.01"]["max_r"]
    # fake data: no claim may be reported as reproduced
    assert not any(c["reproduced"] for c in res["claims"])
    assert "FAKE DATA" in " ".join(res["notes"])


def test_resnet_without_data_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        run_experiment("resnet", "paper", out=tmp_path / "a", progress=False)
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        run_experiment(
            "resnet",
            "paper",
            out=tmp_path / "b",
            progress=False,
            overrides={"data_dir": str(tmp_path / "nowhere")},
        )


# ----------------------------------------------------------------------------- protocols


def test_plain_method_is_bare_adam():
    rec = spike_run("mlp", "plain", 1e-3, 1000.0, seed=3, steps=12, spike_at=6, eval_every=6)
    data = digits()
    gen = set_seed(3)
    model = build_model("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = train(
        model, data, opt, 12, 64, lr_schedule=lambda s: 1000.0 if s >= 6 else 1.0, generator=gen
    )
    assert losses == rec.train_loss
    assert rec.eval_steps == [0, 6, 12]
    assert rec.r_before == rec.r_after and rec.r_before[6] > rec.r_before[5]


def test_controller_method_caps_and_clip_grad_differs():
    ctrl = spike_run("mlp", "controller", 1e-2, 1000.0, seed=0, steps=8, spike_at=4)
    assert max(ctrl.r_after) <= 1 + 1e-9
    assert ctrl.r_before[4] > 1  # the spike proposes an unsafe step, the cap shortens it
    plain = spike_run("mlp", "plain", 1e-2, 1000.0, seed=0, steps=8, spike_at=4)
    clipped = spike_run("mlp", "clip_grad", 1e-2, 1000.0, seed=0, steps=8, spike_at=4)
    assert plain.train_loss[:1] == clipped.train_loss[:1]
    assert plain.train_loss != clipped.train_loss
    with pytest.raises(ValueError, match="method"):
        spike_run("mlp", "sgd", 1e-3, 10.0, seed=0, steps=2, spike_at=1)


@pytest.mark.parametrize("arch", ["transformer", "tinylm"])
def test_the_lab_transformers_give_internal_radii(arch):
    """The lab's transformers expose what ``internal_radii`` reads (its own accuracy is
    the library's tests' concern)."""
    torch.manual_seed(0)
    if arch == "transformer":
        model, x = build_model(arch, d_model=16, n_layers=2, n_heads=2), torch.rand(6, 64)
    else:
        model, x = TinyLM(vocab_size=31, d_model=16, n_heads=2), torch.randint(0, 31, (2, 9))
    direction = [torch.randn_like(p) for p in model.parameters()]
    radii = internal_radii(model, x, direction)
    assert set(radii) == {"attn", "ffn"}
    assert all(0 < r < math.inf for r in radii.values())


@pytest.mark.slow
def test_parallel_map_workers_match_serial():
    jobs = [
        dict(
            arch="mlp",
            method="controller",
            base_lr=1e-3,
            factor=100.0,
            seed=s,
            steps=6,
            spike_at=3,
            eval_every=3,
        )
        for s in (0, 1)
    ]
    serial = parallel_map(spike_run, jobs, workers=1, threads=1)
    pooled = parallel_map(spike_run, jobs, workers=2, threads=1)
    for a, b in zip(serial, pooled):
        assert a.train_loss == b.train_loss and a.test_acc == b.test_acc


def test_augment_cifar_and_resnet_run_arguments():
    x, y = fake_cifar10(8, seed=0)
    a = augment_cifar(x, torch.Generator().manual_seed(0))
    b = augment_cifar(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    same = augment_cifar(x, torch.Generator().manual_seed(0), pad=0)
    for img, out in zip(x, same):  # pad 0: each image is itself or its mirror
        assert torch.equal(out, img) or torch.equal(out, img.flip(-1))
    with pytest.raises(ValueError, match="exactly one"):
        resnet_run((x, y), (x, y), seed=0, lr=0.1, target_r=1.0)


def test_spike_run_passes_slope_method_to_the_controller():
    fast = spike_run("mlp", "controller", 1e-3, 1000.0, seed=0, steps=4, spike_at=2,
                     slope_method="fast")  # fmt: skip
    exact = spike_run("mlp", "controller", 1e-3, 1000.0, seed=0, steps=4, spike_at=2)
    assert max(fast.r_after) <= 1.0 + 1e-6
    # the first step starts from the same parameters: the radii agree to fast's error,
    # and differ (a finite difference is not the JVP) in the low digits
    assert fast.rho_a[0] == pytest.approx(exact.rho_a[0], rel=2e-2)
    assert fast.rho_a[0] != exact.rho_a[0]
    with pytest.raises(ValueError, match="method must be"):
        spike_run("mlp", "controller", 1e-3, 10.0, seed=0, steps=2, slope_method="exact")


def test_loop_runs_hooks_in_order_and_stops_before_backward():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = iter([(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))] * 3)
    calls = []

    def after_loss(info):
        calls.append(("after_loss", info.step, model.weight.grad is None))
        return "stop" if info.step == 2 else None

    loop(
        model, opt, batches, 3, start_step=0,
        lr_schedule=lambda step: 10.0 if step == 1 else 1.0,
        after_loss=after_loss,
        before_step=lambda info: calls.append(("before_step", info.step, info.lr)),
        optimizer_step=lambda info: (calls.append(("step", info.step, None)), opt.step()),
        on_step=lambda info: calls.append(("on_step", info.step, info.loss > 0)),
    )  # fmt: skip
    assert [c[:2] for c in calls] == [
        ("after_loss", 0), ("before_step", 0), ("step", 0), ("on_step", 0),
        ("after_loss", 1), ("before_step", 1), ("step", 1), ("on_step", 1),
        ("after_loss", 2),
    ]  # fmt: skip
    assert all(c[2] for c in calls if c[0] == "after_loss")  # zero_grad before the forward
    assert [c[2] for c in calls if c[0] == "before_step"] == [pytest.approx(0.1), 1.0]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # step 2 reset the spike


def test_claim_rules_are_evaluated_in_order_and_skipped_without_data():
    rules = (
        ClaimRule(
            "acc >= {c:.0%}", "90%", lambda x: x.acc,
            holds=lambda v, x: v >= x.c, ours=lambda v, x: f"{v:.1%}",
            note=lambda v, x: "too low",
        ),
        ClaimRule("missing", "-", lambda x: None, holds=lambda v, x: True, ours=lambda v, x: "-"),
        ClaimRule(
            lambda x: f"always noted ({x.acc})", lambda x: "p", lambda x: 1.0,
            holds=lambda v, x: True, ours=lambda v, x: v,
            note=lambda v, x: "why", always_note=True,
        ),
    )  # fmt: skip
    low = evaluate_claims(rules, acc=0.5, c=0.9)
    assert [(c.claim, c.reproduced, c.note) for c in low] == [
        ("acc >= 90%", False, "too low"),
        ("always noted (0.5)", True, "why"),
    ]
    assert evaluate_claims(rules, acc=0.95, c=0.9)[0].note is None
    untested = evaluate_claims(rules, untested="smoke test", acc=0.95, c=0.9)
    assert [(c.reproduced, c.note) for c in untested] == [(False, "smoke test")] * 2
