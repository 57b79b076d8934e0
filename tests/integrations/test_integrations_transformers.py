"""add_radius_control / TrainerRadiusCallback in real (tiny, offline, CPU) Trainer runs."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

from ghoststep.controller import Sampling

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from helpers import Exact, applied_update, realised_r, trainable_state  # noqa: E402

import ghoststep  # noqa: E402
from ghoststep import RadiusController  # noqa: E402
from ghoststep.integrations.transformers import (  # noqa: E402
    STATE_NAME,
    TrainerRadiusCallback,
    add_radius_control,
    is_causal_lm,
    label_mask_fn,
)

T, VALID = 16, 4  # sequence length; labels are -100 from position VALID on


def _gpt2(attn: str = "eager"):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)


class TokenData(torch.utils.data.Dataset):
    """Random tokens; labels = tokens with -100 from VALID on; ``tail_seed`` redraws
    only the tokens at those ignored positions."""

    def __init__(self, n: int = 24, tail_seed: int | None = None):
        self.n, self.tail_seed = n, tail_seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        ids = torch.randint(1, 100, (T,), generator=torch.Generator().manual_seed(i))
        labels = ids.clone()
        labels[VALID:] = -100
        if self.tail_seed is not None:
            g = torch.Generator().manual_seed(1000 * self.tail_seed + i)
            ids[VALID:] = torch.randint(1, 100, (T - VALID,), generator=g)
        return {"input_ids": ids, "labels": labels}


def _args(tmp_path, **kwargs):
    base = dict(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=8,
        learning_rate=5e-2, lr_scheduler_type="linear", logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    base.update(kwargs)
    return transformers.TrainingArguments(**base)


def _train(tmp_path, data, **kwargs):
    options = {k: kwargs.pop(k) for k in ("mode", "target_r", "mask_fn") if k in kwargs}
    args = _args(tmp_path, **kwargs)
    trainer = transformers.Trainer(model=_gpt2(), args=args, train_dataset=data)
    callback = add_radius_control(trainer, **{"mode": "clip", "target_r": 0.5, **options})
    trainer.train()
    return trainer, callback


def _train_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def test_stats_in_log_history_and_tensorboard_scheduler_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, callback = _train(tmp_path, TokenData(), report_to=["tensorboard"])
    controller = callback.controller
    assert isinstance(controller, RadiusController)
    assert trainer.callback_handler.callbacks[0] is callback

    logs = _train_logs(trainer)
    assert [h["step"] for h in logs] == [1, 2, 3, 4]
    for key in ("tau", "rho_a", "r_before", "r_after", "scale", "r_after_max", "skipped"):
        assert all(f"ghoststep/{key}" in h for h in logs), key
    history = list(controller.history)
    assert [h["ghoststep/r_after"] for h in logs] == pytest.approx([s.r_after for s in history])
    assert all(s.r_after <= 0.5 * (1 + 1e-6) for s in history)

    # the Trainer's linear schedule drives the wrapper: LR falls step by step
    lrs = [h["learning_rate"] for h in logs]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert [s.lr for s in history] == pytest.approx(lrs)

    # inserted before the TensorBoard callback: the values reach the event file
    out = tmp_path / "out"  # transformers 5 writes TensorBoard events under output_dir/runs
    runs = [d for d, _, files in os.walk(out) if any("tfevents" in f for f in files)]
    acc = EventAccumulator(runs[0])
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/ghoststep/r_after" in tags and "train/ghoststep/rho_a" in tags
    assert len(acc.Scalars("train/ghoststep/r_after")) == 4


def test_ignored_label_positions_do_not_influence_the_radius(tmp_path):
    # two data sets that differ only in the tokens at label -100 positions: with causal
    # attention those tokens reach only logits whose targets are ignored
    t1, c1 = _train(tmp_path / "a", TokenData(), max_steps=3, mode="monitor")
    t2, c2 = _train(tmp_path / "b", TokenData(tail_seed=1), max_steps=3, mode="monitor")
    rho1 = [s.rho_a for s in c1.controller.history]
    rho2 = [s.rho_a for s in c2.controller.history]
    assert rho1 == pytest.approx(rho2, rel=1e-9)
    # the bottleneck is always a scored position: logits t predict label t + 1
    for s in [*c1.controller.history, *c2.controller.history]:
        assert 0 <= s.bottleneck % T <= VALID - 2

    # control: scoring every position, the changed tokens do move the radius
    def every(inputs):
        return torch.ones_like(inputs["input_ids"], dtype=torch.bool)

    _, u1 = _train(tmp_path / "c", TokenData(), max_steps=3, mode="monitor", mask_fn=every)
    _, u2 = _train(tmp_path / "d", TokenData(tail_seed=1), max_steps=3, mode="monitor",
                   mask_fn=every)  # fmt: skip
    assert [s.rho_a for s in u1.controller.history] != pytest.approx(
        [s.rho_a for s in u2.controller.history], rel=1e-9
    )


def test_label_mask_shift_semantics():
    labels = torch.tensor([[5, 6, 7, -100, -100]])
    shifted = label_mask_fn(shift=True)({"labels": labels})
    assert shifted.tolist() == [[True, True, False, False, False]]
    plain = label_mask_fn(shift=False)({"labels": labels})
    assert plain.tolist() == [[True, True, True, False, False]]
    cls = label_mask_fn(shift=False)({"labels": torch.tensor([2, -100, 0])})
    assert cls.tolist() == [True, False, True]
    assert label_mask_fn(shift=False)({"labels": torch.rand(3, 4)}).tolist() == [True] * 3
    with pytest.raises(ValueError, match="mask_fn"):
        label_mask_fn(shift=False)({"input_ids": labels})
    # labels the model did not receive (popped by the Trainer), or from targets_fn
    popped = ghoststep.Call(input_ids=labels).with_targets(labels)
    assert label_mask_fn(shift=True)(popped).tolist() == shifted.tolist()
    from_fn = label_mask_fn(shift=True, targets_fn=lambda inputs: inputs["y"])
    assert from_fn({"input_ids": labels, "y": labels}).tolist() == shifted.tolist()
    assert is_causal_lm(_gpt2())
    bert = transformers.BertForSequenceClassification(
        transformers.BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=3,
        )  # fmt: skip
    )
    assert not is_causal_lm(bert)


class ClassData(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        ids = torch.randint(1, 100, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long),
                "labels": torch.tensor(i % 3)}  # fmt: skip


def test_sequence_classification_with_class_logits(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(
        transformers.BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=3,
            attn_implementation="eager",
        )  # fmt: skip
    )
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path, max_steps=2), train_dataset=ClassData()
    )
    cb = add_radius_control(trainer, mode="clip", target_r=0.5)
    trainer.train()
    assert cb.controller.step_count == 2
    assert all(0 <= s.bottleneck < 8 for s in cb.controller.history)  # (B, C): one per row
    assert all("ghoststep/rho_a" in h for h in _train_logs(trainer))


def test_checkpoint_resume_restores_controller(tmp_path):
    args = dict(save_strategy="steps", save_steps=2, max_steps=2, subset=4)
    sub = args.pop("subset")
    trainer = transformers.Trainer(
        model=_gpt2(), args=_args(tmp_path, **args), train_dataset=TokenData()
    )
    cb = add_radius_control(trainer, mode="clip", target_r=0.5, sampling=Sampling(subset=sub))
    trainer.train()
    saved = cb.controller.state_dict()["ghoststep"]

    args["max_steps"] = 3
    trainer2 = transformers.Trainer(
        model=_gpt2(), args=_args(tmp_path, **args), train_dataset=TokenData()
    )
    cb2 = add_radius_control(trainer2, mode="clip", target_r=0.5, sampling=Sampling(subset=sub))
    trainer2.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert cb2.controller.step_count == 3  # continued from the saved 2
    assert cb2.controller.history[0].step == 3
    assert saved["step_count"] == 2


def test_checkpoint_resumes_without_add_radius_control(tmp_path):
    args = dict(save_strategy="steps", save_steps=2, max_steps=2)
    trainer = transformers.Trainer(
        model=_gpt2(), args=_args(tmp_path, **args), train_dataset=TokenData()
    )
    add_radius_control(trainer, mode="clip", target_r=0.5)
    trainer.train()
    folder = tmp_path / "out" / "checkpoint-2"
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    ours = torch.load(folder / STATE_NAME, weights_only=True)
    print(f"\noptimizer.pt keys {sorted(optimizer)}, {STATE_NAME} step_count {ours['step_count']}")
    assert set(optimizer) == {"state", "param_groups"}  # a plain AdamW state dict
    assert ours["step_count"] == 2

    # a plain Trainer: the optimizer state alone (today's torch raised KeyError 'param_groups')
    args["max_steps"] = 3
    plain = transformers.Trainer(
        model=_gpt2(), args=_args(tmp_path, **args), train_dataset=TokenData()
    )
    plain.train(resume_from_checkpoint=str(folder))
    assert plain.state.global_step == 3
    steps = {float(s["step"]) for s in plain.optimizer.optimizer.state_dict()["state"].values()}
    assert steps == {3.0}  # AdamW's state continued from the checkpoint's 2 steps


def test_default_attention_is_kept_and_trains(tmp_path, recwarn):
    trainer = transformers.Trainer(
        model=_gpt2("sdpa"), args=_args(tmp_path, max_steps=2), train_dataset=TokenData(8)
    )
    callback = add_radius_control(trainer, mode="clip", target_r=0.5)
    trainer.train()
    assert trainer.model.config._attn_implementation == "sdpa"  # the user's model, unchanged
    assert not [w for w in recwarn if "eager" in str(w.message)]
    history = callback.controller.history
    assert len(history) == 2 and all(0 < s.r_after <= 0.5 for s in history)


def test_prewrapped_optimizer_via_optimizers_argument(tmp_path):
    model = _gpt2()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    controller = RadiusController(
        inner, model, mode="monitor", sampling=Sampling(mask_fn=label_mask_fn(shift=True))
    )
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path, max_steps=2), train_dataset=TokenData(16),
        optimizers=(controller, None),
    )  # fmt: skip
    cb = add_radius_control(trainer)  # only adds the reporting
    assert isinstance(cb, TrainerRadiusCallback) and cb.controller is controller
    trainer.train()
    assert controller.step_count == 2
    assert all("ghoststep/tau" in h for h in _train_logs(trainer))


def test_missing_extra_raises_helpful_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "ghoststep.integrations.transformers", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'ghoststep\[transformers\]'"):
        importlib.import_module("ghoststep.integrations.transformers")


def _shifted_mask(labels: torch.Tensor) -> torch.Tensor:
    """The positions a causal LM's loss scores: logits t against labels t + 1."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[..., :-1] = labels[..., 1:] != -100
    return mask


def test_causal_lm_targets_fn_with_ignore_index_shifts_like_the_loss():
    # every other label ignored: an unshifted mask would count exactly the positions
    # the loss ignores (the realised r then reached 1.59)
    model = _gpt2()
    opt = RadiusController(
        torch.optim.Adam(model.parameters(), lr=5e-2),
        model,
        mode="clip",
        target_r=1.0,
        sampling=Sampling(ignore_index=-100, targets_fn=lambda inputs: inputs["labels"]),
    )
    start, worst, bound = trainable_state(model), 0.0, 0
    for i in range(4):
        ids = torch.randint(1, 100, (8, T), generator=torch.Generator().manual_seed(i))
        labels = ids.clone()
        labels[:, 1::2] = -100
        old = trainable_state(model)
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        applied = applied_update(old, trainable_state(model))
        r = realised_r(model, old, {"input_ids": ids}, applied, mask=_shifted_mask(labels))
        worst, bound = max(worst, r), bound + (opt.last.scale < 1.0)
    print(f"causal LM targets_fn + ignore_index: max realised r {worst:.6f}, bound {bound}/4")
    assert worst <= 1.001 and bound >= 1
    assert max(float((trainable_state(model)[n] - p).abs().max()) for n, p in start.items()) > 0


class _Remeasure(transformers.TrainerCallback):
    """Re-measures every applied update in float64 at the old parameters on the call
    that fed the gradient (kept by a forward pre-hook of the test's own)."""

    def __init__(self, model):
        self.model, self.calls, self.worst, self.old = model, [], 0.0, None
        model.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            self.calls.append((args, dict(kwargs)))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.old = trainable_state(self.model)

    def on_optimizer_step(self, args, state, control, **kwargs):
        applied = applied_update(self.old, trainable_state(self.model))
        (call_args, call_kwargs), self.calls = self.calls[-1], []
        assert "labels" not in call_kwargs  # the Trainer popped them
        labels = torch.stack([TokenData()[0]["labels"]] * call_kwargs["input_ids"].shape[0])
        call_kwargs = {k: v for k, v in call_kwargs.items() if k != "num_items_in_batch"}
        r = realised_r(
            self.model, self.old, Exact(call_args, call_kwargs), applied,
            mask=_shifted_mask(labels),
        )  # fmt: skip
        self.worst = max(self.worst, r)


def test_trainer_with_label_smoothing_trains_with_the_controller(tmp_path):
    model = _gpt2()
    args = _args(tmp_path, label_smoothing_factor=0.1, learning_rate=0.5, max_steps=3)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData())
    assert trainer.label_smoother is not None  # labels popped before model(**inputs)
    callback = add_radius_control(trainer, mode="clip", target_r=1.0)
    remeasure = _Remeasure(model)
    trainer.add_callback(remeasure)
    start = trainable_state(model)
    trainer.train()
    history = list(callback.controller.history)
    print(f"Trainer label smoothing: max realised r {remeasure.worst:.6f}, "
          f"scales {[round(s.scale, 4) for s in history]}")  # fmt: skip
    assert len(history) == 3 and not any(s.skipped for s in history)
    assert any(s.scale < 1.0 for s in history)
    assert remeasure.worst <= 1.001
    # the bottleneck is a scored position (logits t predict label t + 1)
    assert all(0 <= s.bottleneck % T <= VALID - 2 for s in history)
    assert max(float((trainable_state(model)[n] - p).abs().max()) for n, p in start.items()) > 0
