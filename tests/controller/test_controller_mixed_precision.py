"""The precision is read from what the training forward did (issue 22, item 3).

Accelerate's ``mixed_precision="bf16"`` (the Hugging Face ``Trainer(bf16=True)`` path)
applies autocast inside a wrapped ``model.forward``, out of sight of a hook on the
module; a frozen bfloat16 base under float32 adapters (peft's default) computes in
bfloat16 with float32 trainable parameters. Both must get the method (``"jvp"``) and
the margin of bfloat16: the applied update, re-measured independently in float64 at
the old parameters on the batch (``helpers.realised_r``), keeps r <= 1.02.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import applied_update, build_model, digit_batches, realised_r, trainable_state
from torch import nn

from ghoststep.controller import RadiusController

LOW_BOUND = 1.02  # the bf16 / fp16 promise


def _bound(ctrl) -> bool:
    return any(s.scale < 1.0 for s in ctrl.history if not s.skipped)


@pytest.fixture
def fresh_accelerate():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield accelerate
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("method", ["auto", "fast"])
@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_accelerate_bf16_picks_jvp_and_keeps_the_bound(digits, fresh_accelerate, name, method):
    """``"auto"`` resolves to ``"jvp"`` (run under the autocast the wrapped forward
    applied); an explicit ``"fast"`` differences float32 forwards of the model's own
    forward (the wrapper's autocast left out)."""
    torch.manual_seed(0)
    model = build_model(name)
    plain = copy.deepcopy(model)  # the re-measurement's twin, without the wrapped forward
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=1.0), model, method=method)
    accelerator = fresh_accelerate.Accelerator(mixed_precision="bf16", cpu=True)
    wrapped, opt = accelerator.prepare(model, ctrl)
    rs = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for x, y in digit_batches(digits, 4):
            old = trainable_state(model)
            opt.zero_grad()
            accelerator.backward(F.cross_entropy(wrapped(x), y))
            opt.step()
            rs.append(realised_r(plain, old, x, applied_update(old, trainable_state(model))))
    print(f"accelerate bf16 {name} {method}: method {ctrl.method}, realised r {max(rs):.5f}")
    assert ctrl.method == ("jvp" if method == "auto" else "fast")
    assert not [w for w in record if issubclass(w.category, RuntimeWarning)]
    assert max(rs) <= LOW_BOUND, rs
    if method == "fast":  # float32 secants: the radius to within the margin, no over-clip
        assert max(rs) >= 0.97, rs
    assert _bound(ctrl)
    assert min(s.scale for s in ctrl.history) > 1e-3


# --------------------------------------------------------------------------- HF Trainer


def test_hf_trainer_bf16_on_cpu_picks_jvp_and_keeps_the_bound(tmp_path, fresh_accelerate):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    from ghoststep.integrations.transformers import add_radius_control

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    plain = copy.deepcopy(model)

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            ids = torch.randint(1, 100, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids.clone()}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=8,
        learning_rate=1.0, lr_scheduler_type="constant", logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, bf16=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens())
    callback = add_radius_control(trainer, mode="clip", target_r=1.0)
    ctrl = callback.controller
    seen, rs = {}, []

    def remember(module, a, kwargs):
        if module.training and torch.is_grad_enabled():
            seen["inputs"] = {k: v.detach().clone() for k, v in kwargs.items()}

    class Measure(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            seen["old"] = trainable_state(model)

        def on_optimizer_step(self, args, state, control, **kw):
            old, inputs = seen["old"], seen["inputs"]
            applied = applied_update(old, trainable_state(model))
            mask = torch.zeros_like(inputs["labels"], dtype=torch.bool)
            mask[:, :-1] = inputs["labels"][:, 1:] != -100  # logits at t score label t + 1
            rs.append(realised_r(plain, old, inputs, applied, mask=mask))

    model.register_forward_pre_hook(remember, with_kwargs=True)
    trainer.add_callback(Measure())
    trainer.train()
    print(f"HF Trainer bf16: method {ctrl.method}, realised r {max(rs):.5f}")
    assert len(rs) == 4
    assert ctrl.method == "jvp"
    assert max(rs) <= LOW_BOUND, rs
    assert _bound(ctrl)


# --------------------------------------------------------------------------- frozen bf16 base


class Adapted(nn.Module):
    """A frozen linear layer in bfloat16 plus a trainable float32 low-rank adapter
    (peft's LoRA defaults: B starts at 0, each input cast to the layer's dtype)."""

    def __init__(self, d_in: int, d_out: int, rank: int = 4) -> None:
        super().__init__()
        self.base = nn.Linear(d_in, d_out).to(torch.bfloat16).requires_grad_(False)
        self.A = nn.Linear(d_in, rank, bias=False)
        self.B = nn.Linear(rank, d_out, bias=False)
        nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base(x.to(self.base.weight.dtype))
        return base + 2.0 * self.B(self.A(x.to(self.A.weight.dtype)))


def test_frozen_bf16_base_with_float32_adapters_picks_jvp(digits):
    torch.manual_seed(0)
    model = nn.Sequential(Adapted(64, 128), nn.Tanh(), Adapted(128, 10))
    trainable = [p for p in model.parameters() if p.requires_grad]
    ctrl = RadiusController(torch.optim.Adam(trainable, lr=1.0), model)
    rs = []
    for x, y in digit_batches(digits, 4):
        old = trainable_state(model)
        ctrl.zero_grad()
        F.cross_entropy(model(x).float(), y).backward()
        ctrl.step()
        rs.append(realised_r(model, old, x, applied_update(old, trainable_state(model))))
    print(f"bf16 base + float32 adapters: method {ctrl.method}, realised r {max(rs):.5f}")
    assert ctrl.method == "jvp"
    assert ctrl.margin_for("half") == pytest.approx(3e-2)
    assert max(rs) <= LOW_BOUND, rs
    assert _bound(ctrl)


# --------------------------------------------------------------------------- Lightning


def test_lightning_bf16_mixed_picks_jvp_and_keeps_the_bound(tmp_path, digits):
    L = pytest.importorskip("lightning")
    from ghoststep.integrations.lightning import LightningRadiusCallback

    class Digits(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = build_model("mlp")

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x).float(), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1.0)

    rs = []

    class Measure(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.old = trainable_state(module.net)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            applied = applied_update(self.old, trainable_state(module.net))
            rs.append(realised_r(module.net, self.old, batch[0], applied))

    X, y = digit_batches(digits, 1, size=256)[0]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=64)
    radius = LightningRadiusCallback(mode="clip", target_r=1.0)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=4, precision="bf16-mixed", logger=False,
        callbacks=[radius, Measure()], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(Digits(), loader)
    ctrl = radius.controller
    print(f"Lightning bf16-mixed: method {ctrl.method}, realised r {max(rs):.5f}")
    assert len(rs) == 4
    assert ctrl.method == "jvp"
    assert max(rs) <= LOW_BOUND, rs
    assert _bound(ctrl)
