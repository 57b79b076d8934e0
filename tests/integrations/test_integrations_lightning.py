"""LightningRadiusCallback in real (tiny, CPU) Lightning runs."""

from __future__ import annotations

import copy
import csv
import importlib
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ghoststep.controller import Recording

L = pytest.importorskip("lightning")
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.loggers.logger import Logger  # noqa: E402

from ghoststep import RadiusController  # noqa: E402
from ghoststep.integrations.lightning import LightningRadiusCallback  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(LeafSpec|resuming from a checkpoint|callbacks used to create).*"
)


def _loader(n: int = 48, batch_size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)


class Classifier(L.LightningModule):
    def __init__(self, lr: float = 5.0, optim: str = "sgd"):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        self.lr, self.optim = lr, optim

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.optim == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ManualClassifier(Classifier):
    def __init__(self):
        super().__init__(lr=5.0)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.manual_backward(loss)
        opt.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _trainer(tmp_path, callbacks, max_steps: int, **kwargs):
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=kwargs.pop("logger", False),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_clip_run_logs_stats_caps_r_and_keeps_scheduler(tmp_path):
    cb = LightningRadiusCallback(mode="clip", target_r=0.5)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = _trainer(tmp_path, [cb], max_steps=5, logger=logger)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Classifier(lr=5.0), _loader())
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]

    history = list(cb.controller.history)
    assert [s.step for s in history] == [1, 2, 3, 4, 5]
    assert all(s.r_after <= 0.5 * (1 + 1e-6) for s in history)
    assert any(s.scale < 1.0 for s in history)  # the clip did bind at lr = 5
    # StepLR(gamma=0.5, interval="step") drives the wrapper's (shared) param groups
    assert [s.lr for s in history] == pytest.approx([5.0 * 0.5**k for k in range(5)])
    assert isinstance(trainer.optimizers[0], RadiusController)

    for key in ("tau", "rho_a", "r_before", "r_after", "scale"):
        assert f"ghoststep/{key}" in trainer.logged_metrics
    assert float(trainer.logged_metrics["ghoststep/r_after"]) == pytest.approx(
        history[-1].r_after, rel=1e-5
    )
    logger.save()
    with open(f"{logger.log_dir}/metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("ghoststep/tau")]
    assert len(rows) == 5
    assert [float(r["ghoststep/r_after"]) for r in rows] == pytest.approx(
        [s.r_after for s in history], rel=1e-5
    )


def test_gradient_accumulation_measures_the_accumulated_update(tmp_path):
    moved = []

    class Probe(L.Callback):  # ||theta after - theta before|| over each 2-batch window
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx % 2 == 0:
                self.before = [p.detach().clone() for p in pl_module.parameters()]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx % 2 == 1:
                now = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
                old = torch.cat([q.flatten() for q in self.before])
                moved.append(float(torch.linalg.vector_norm(now - old)))

    cb = LightningRadiusCallback(mode="monitor", recording=Recording(keep_samples=True))
    trainer = _trainer(tmp_path, [cb, Probe()], max_steps=3, accumulate_grad_batches=2)
    trainer.fit(Classifier(lr=0.1), _loader())
    assert cb.controller.step_count == 3  # 6 batches, 3 optimizer steps
    assert all(s.scale == 1.0 for s in cb.controller.history)
    assert [s.tau for s in cb.controller.history] == pytest.approx(moved, rel=1e-5)
    # the radius covers both micro-batches of 8 samples that built each update
    assert [s.rho_samples.numel() for s in cb.controller.history] == [16, 16, 16]


def test_checkpoint_resume_restores_controller_state(tmp_path):
    options = dict(mode="clip", target_r=1.0, subset=4, window=3, seed=7)
    cb = LightningRadiusCallback(**options)
    trainer = _trainer(tmp_path, [cb], max_steps=4)
    trainer.fit(Classifier(lr=1.0, optim="adam"), _loader())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    saved = cb.controller.state_dict()
    assert saved["ghoststep"]["step_count"] == 4

    ckpt = torch.load(path, weights_only=False)
    assert set(ckpt["optimizer_states"][0]) == {"state", "param_groups"}  # plain Adam dict
    assert "ghoststep" not in ckpt["optimizer_states"][0]["param_groups"][0]

    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update(copy.deepcopy(trainer.optimizers[0].state_dict()))

    cb2 = LightningRadiusCallback(**options)
    trainer2 = _trainer(tmp_path, [cb2, Probe()], max_steps=6)
    trainer2.fit(Classifier(lr=1.0, optim="adam"), _loader(), ckpt_path=path)

    ours, theirs = saved["ghoststep"], seen["ghoststep"]
    assert theirs["step_count"] == ours["step_count"] == 4
    assert theirs["skipped_steps"] == ours["skipped_steps"]
    assert theirs["recent_rhos"] == pytest.approx(ours["recent_rhos"])
    assert torch.equal(theirs["generator"], ours["generator"])
    inner_steps = [float(s["step"]) for s in seen["state"].values()]
    assert inner_steps and all(s == 4 for s in inner_steps)  # Adam state restored too
    assert cb2.controller.step_count == 6

    # the checkpoint still resumes without ghoststep
    trainer3 = _trainer(tmp_path, [], max_steps=5)
    trainer3.fit(Classifier(lr=1.0, optim="adam"), _loader(), ckpt_path=path)
    assert trainer3.global_step == 5


def test_manual_optimization_uses_the_wrapper(tmp_path):
    cb = LightningRadiusCallback(mode="clip", target_r=0.5)
    trainer = _trainer(tmp_path, [cb], max_steps=3)
    trainer.fit(ManualClassifier(), _loader())
    assert cb.controller.step_count == 3
    assert all(s.r_after <= 0.5 * (1 + 1e-6) for s in cb.controller.history)
    assert "ghoststep/r_after" in trainer.callback_metrics  # no logger attached


class PreWrapped(Classifier):
    def configure_optimizers(self):
        return RadiusController(torch.optim.SGD(self.parameters(), lr=5.0), self, target_r=0.5)


class TwoOptimizers(ManualClassifier):
    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.net[0].parameters()),
            torch.optim.SGD(self.net[2].parameters()),
        ]


def test_prewrapped_optimizer_is_kept_and_logged(tmp_path):
    cb = LightningRadiusCallback()
    module = PreWrapped()
    trainer = _trainer(tmp_path, [cb], max_steps=2)
    trainer.fit(module, _loader())
    assert cb.controller is trainer.optimizers[0] and cb.controller.step_count == 2
    assert cb.controller.target_r == 0.5  # the user's settings, not the callback's
    assert "ghoststep/r_after" in trainer.callback_metrics


def test_several_optimizers_are_refused(tmp_path):
    trainer = _trainer(tmp_path, [LightningRadiusCallback()], max_steps=1)
    with pytest.raises(ValueError, match="single optimizer"):
        trainer.fit(TwoOptimizers(), _loader())


def test_missing_extra_raises_helpful_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "ghoststep.integrations.lightning", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'ghoststep\[lightning\]'"):
        importlib.import_module("ghoststep.integrations.lightning")


class _SaveFinalState(L.Callback):
    """Each DDP rank writes its final parameters and controller history."""

    def __init__(self, folder):
        self.folder = str(folder)

    def on_train_end(self, trainer, pl_module):
        controller = next(c for c in trainer.callbacks if isinstance(c, LightningRadiusCallback))
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        history = [(s.scale, s.rho_a) for s in controller.controller.history]
        torch.save(
            {"flat": flat, "history": history}, f"{self.folder}/rank{trainer.global_rank}.pt"
        )


@pytest.mark.slow
def test_ddp_spawn_ranks_apply_the_same_scale(tmp_path):
    # Lightning under DDP routes training_step through the module's __call__; the
    # controller keeps the inner self(x) call and all-reduces the spread.
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=3,
        logger=False,
        callbacks=[LightningRadiusCallback(mode="clip", target_r=0.5), _SaveFinalState(tmp_path)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(Classifier(lr=1.0, optim="adam"), _loader())
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert len(rank0["history"]) == 3 and rank0["history"] == rank1["history"]
    assert any(scale < 1 for scale, _ in rank0["history"])  # the clip did bind
    assert torch.equal(rank0["flat"], rank1["flat"])


class _CaptureLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self):
        super().__init__()
        self.calls = []

    @property
    def name(self):
        return "capture"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))


def test_log_every_logs_each_logged_steps_own_values(tmp_path):
    logger = _CaptureLogger()
    cb = LightningRadiusCallback(mode="clip", target_r=0.5, log_every=2)
    trainer = _trainer(tmp_path, [cb], max_steps=6, logger=logger)
    trainer.fit(Classifier(lr=5.0), _loader())
    history = list(cb.controller.history)
    logged = [(step, m["ghoststep/tau"]) for step, m in logger.calls if "ghoststep/tau" in m]
    print(f"\nlogged (logger step, tau): {logged}\nhistory tau: {[s.tau for s in history]}")
    # Lightning's logger step counts the optimizer steps before this one: k - 1
    assert [step for step, _ in logged] == [1, 3, 5]  # optimizer steps 2, 4, 6, once each
    for step, tau in logged:
        assert history[step].step == step + 1
        assert tau == pytest.approx(history[step].tau, rel=1e-6)
    assert float(trainer.callback_metrics["ghoststep/tau"]) == pytest.approx(history[-1].tau)


class SubmoduleCall(Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)  # not self(x)


def test_training_step_calling_a_submodule_names_module_net(tmp_path):
    trainer = _trainer(tmp_path, [LightningRadiusCallback()], max_steps=1)
    with pytest.raises(RuntimeError, match='module="net"') as caught:
        trainer.fit(SubmoduleCall(), _loader())
    print(f"\n{caught.value}")
    assert "no batch to measure" in str(caught.value)
    cb = LightningRadiusCallback(module="net")  # the fix the message names
    trainer = _trainer(tmp_path, [cb], max_steps=2)
    trainer.fit(SubmoduleCall(), _loader())
    assert cb.controller.step_count == 2
