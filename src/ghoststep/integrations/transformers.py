"""Hugging Face ``transformers.Trainer``: radius control with one line after building it.

Example::

    from transformers import Trainer
    from ghoststep.integrations.transformers import add_radius_control

    trainer = Trainer(model=model, args=args, train_dataset=ds)
    add_radius_control(trainer, mode="clip", target_r=1.0)   # the one line
    trainer.train()
    trainer.state.log_history[-2]   # {..., "ghoststep/tau": ..., "ghoststep/r_after": ...}

What :func:`add_radius_control` does:

* builds the optimizer exactly as the Trainer would (``trainer.create_optimizer()``:
  ``args.optim``, weight-decay groups, ``optimizer_cls_and_kwargs``) -- or takes the one
  passed via ``optimizers=`` -- and replaces it by a :class:`~ghoststep.RadiusController`
  around it. The Trainer then builds its LR scheduler on the wrapper (which shares the
  inner ``param_groups``) and Accelerate wraps it like any optimizer.
* keeps Trainer checkpoints loadable without ghoststep: ``optimizer.pt`` holds the inner
  optimizer's plain state dict, the controller's state (counters, radius window, buffer,
  subset RNG) is in ``ghoststep_state.pt`` beside it. Resuming with
  ``add_radius_control`` restores both; a plain Trainer resumes the optimizer alone.
* measures the radius on the batch the model's forward just saw (the Trainer calls
  ``model(**inputs)``; a forward pre-hook keeps the keyword arguments, ``labels``
  included). Positions whose label is -100 are ignored; for causal language models the
  logits at position t are scored against label t + 1 (the model shifts internally), so
  the mask is shifted the same way, and the last position is never used. With
  ``label_smoothing_factor`` (or a ``compute_loss_func``) the Trainer pops the labels
  from the inputs before the forward; ``trainer.compute_loss`` is wrapped so that the
  captured forward carries them as its targets (``ghoststep.Call.targets``), and the
  mask is the same.
* inserts a :class:`TrainerRadiusCallback` *first* in the Trainer's callback list, so the
  statistics it adds to the training logs reach ``state.log_history`` and every
  reporting callback (TensorBoard, wandb, ...) that runs after it.

The model is not changed: with the default ``attn_implementation="sdpa"`` training keeps
its fused attention kernel, and only the radius JVP runs attention with PyTorch's math
kernel (the fused kernels have no forward-mode AD).

Not supported: DeepSpeed, FSDP and SageMaker model parallelism (they create or shard the
optimizer themselves), and ``model_init`` (hyper-parameter search re-creates the
optimizer). With gradient accumulation the update is the accumulated one, and the radius
is measured on every micro-batch that built it (``micro_batches="all"``, the default
here).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ghoststep.controller import RadiusController
from ghoststep.evaluation._masks import is_causal_lm, label_mask_fn
from ghoststep.integrations import repoint_scheduler, require
from ghoststep.monitor import DEFAULT_KEYS

_tf = require("transformers", "transformers", feature="ghoststep.integrations.transformers")
TrainerCallback = _tf.TrainerCallback

__all__ = [
    "TrainerRadiusCallback",
    "add_radius_control",
    "label_mask_fn",
    "is_causal_lm",
    "STATE_NAME",
]

#: file of a Trainer checkpoint folder holding the controller's own state (beside the
#: plain optimizer state in ``optimizer.pt``)
STATE_NAME = "ghoststep_state.pt"


class TrainerRadiusCallback(TrainerCallback):
    """Report a :class:`~ghoststep.RadiusController`'s statistics in the Trainer's logs.

    On every training log (the ones with ``"loss"``) it adds ``ghoststep/<key>`` for the
    last optimizer step and, over the steps since the previous log, ``ghoststep/r_before_max``,
    ``ghoststep/r_after_max``, ``ghoststep/rho_a_min`` and ``ghoststep/skipped`` (count).
    The values are added to the ``logs`` dict the reporting callbacks receive and to the
    entry just appended to ``state.log_history``; to reach TensorBoard / wandb the callback
    must come before them in ``trainer.callback_handler.callbacks`` (``add_radius_control``
    inserts it first).

    Args:
        controller: the controller to report; None: found in ``on_train_begin`` by
            unwrapping the Trainer's optimizer (``AcceleratedOptimizer.optimizer``).
        keys: ``StepStats`` fields reported for the last step.
        prefix: prefix of the reported names.
    """

    def __init__(
        self,
        controller: RadiusController | None = None,
        *,
        keys: Sequence[str] = DEFAULT_KEYS,
        prefix: str = "ghoststep/",
    ) -> None:
        self.controller = controller
        self.keys = tuple(keys)
        self.prefix = prefix
        self._reported = 0 if controller is None else controller.step_count

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.controller is None:
            self.controller = _find_controller(optimizer)
            if self.controller is None:
                warnings.warn(
                    "ghoststep TrainerRadiusCallback: the Trainer's optimizer is not a "
                    "RadiusController; nothing will be reported (use add_radius_control)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return
        self._reported = self.controller.step_count

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.controller is None or logs is None or "loss" not in logs:
            return
        values = self.values()
        if not values:
            return
        logs.update(values)
        if state.log_history:
            last = state.log_history[-1]
            if last.get("step") == state.global_step and "loss" in last:
                last.update(values)

    def values(self) -> dict[str, float]:
        """The statistics since the previous call (empty if no step was taken)."""
        controller = self.controller
        if controller is None or controller.last is None:
            return {}
        last = controller.last
        if last.step <= self._reported:
            return {}
        window = [s for s in controller.history if s.step > self._reported]
        self._reported = last.step
        scalars = last.scalars()
        out = {f"{self.prefix}{k}": scalars[k] for k in self.keys if k in scalars}
        measured = [s for s in window if not s.skipped]
        if measured:
            out[f"{self.prefix}r_before_max"] = max(s.r_before for s in measured)
            out[f"{self.prefix}r_after_max"] = max(s.r_after for s in measured)
            out[f"{self.prefix}rho_a_min"] = min(s.rho_a for s in measured)
        out[f"{self.prefix}skipped"] = float(sum(s.skipped for s in window))
        return {k: float(v) for k, v in out.items()}


def add_radius_control(
    trainer: Any,
    mode: str = "clip",
    target_r: float = 1.0,
    *,
    keys: Sequence[str] = DEFAULT_KEYS,
    prefix: str = "ghoststep/",
    **controller_kwargs: Any,
) -> TrainerRadiusCallback:
    """Make ``trainer`` train with a radius-controlled optimizer and report its statistics.

    Call after constructing the Trainer and before ``trainer.train()``.

    Args:
        trainer: a ``transformers.Trainer`` (or subclass).
        mode: ``"clip"`` | ``"set"`` | ``"monitor"`` (see ``RadiusController``).
        target_r: r*, the normalized step to cap at (clip) or set (set).
        keys, prefix: what :class:`TrainerRadiusCallback` reports and under which prefix.
        **controller_kwargs: passed to ``RadiusController`` (``subset``, ``window``,
            ``quantile``, ``chunk_size``, ``sinks``, ``mask_fn``, ...). Default mask:
            :func:`label_mask_fn` with ``shift=is_causal_lm(model)``.
    Returns:
        The inserted :class:`TrainerRadiusCallback`; ``callback.controller`` is the controller.
    Raises:
        ValueError: DeepSpeed / FSDP / model_init, or ``optimizer``/``model`` in the kwargs.
    """
    for bad in ("optimizer", "model"):
        if bad in controller_kwargs:
            raise ValueError(f"{bad}= is taken from the trainer")
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(
        trainer, "is_fsdp_enabled", False
    ):
        raise ValueError(
            "add_radius_control does not support DeepSpeed or FSDP trainers (they create or "
            "shard the optimizer themselves); for FSDP2 shard the model with fully_shard and "
            "use RadiusController(optimizer, model, method='fast') in your loop "
            "(docs/scaling.md)"
        )
    if getattr(trainer, "model_init", None) is not None:
        raise ValueError(
            "add_radius_control does not support model_init (the Trainer re-creates the "
            "optimizer); build the model first and pass model="
        )
    model = trainer.model

    if trainer.optimizer is None:
        trainer.create_optimizer()
    inner = trainer.optimizer
    if isinstance(inner, RadiusController):
        controller = inner
    else:
        sampling = controller_kwargs.get("sampling")
        named = any(k in controller_kwargs for k in ("mask_fn", "ignore_index", "targets_fn"))
        if sampling is not None:
            named = named or sampling.masks or sampling.targets_fn is not None
        if not named:
            mask_fn = label_mask_fn(shift=is_causal_lm(model))
            if sampling is None:
                controller_kwargs["mask_fn"] = mask_fn
            else:
                controller_kwargs["sampling"] = dataclasses.replace(sampling, mask_fn=mask_fn)
        controller = RadiusController(
            inner, model, mode=mode, target_r=target_r, **controller_kwargs
        )
        trainer.optimizer = controller
        scheduler = getattr(trainer, "lr_scheduler", None)
        if scheduler is not None and getattr(scheduler, "optimizer", None) is inner:
            repoint_scheduler(scheduler, controller)
    _keep_popped_labels(trainer, controller)
    _plain_optimizer_checkpoints(trainer, controller)

    callback = TrainerRadiusCallback(controller, keys=keys, prefix=prefix)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


def _keep_popped_labels(trainer: Any, controller: RadiusController) -> None:
    """Wrap ``trainer.compute_loss``: where the Trainer pops ``labels`` from the inputs
    before ``model(**inputs)`` (a label smoother or a ``compute_loss_func``; transformers
    5.x ``Trainer.compute_loss``), the forward it runs carries them as targets."""
    compute_loss = trainer.compute_loss

    @functools.wraps(compute_loss)
    def with_targets(model, inputs, *args, **kwargs):
        pops = (
            getattr(trainer, "label_smoother", None) is not None
            or getattr(trainer, "compute_loss_func", None) is not None
        )
        labels = inputs.get("labels") if pops and isinstance(inputs, Mapping) else None
        with controller._capture.targets(labels):
            return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = with_targets


def _plain_optimizer_checkpoints(trainer: Any, controller: RadiusController) -> None:
    """Checkpoints that resume with or without ghoststep: ``optimizer.pt`` the inner
    optimizer's plain state dict, the controller's state in :data:`STATE_NAME` beside it.

    A plain Trainer resuming a checkpoint gives ``optimizer.pt`` to a plain optimizer
    (``torch.load(weights_only=True)``, then ``Optimizer.load_state_dict``): no ghoststep
    code runs there, so a controller state dict (``{"inner", "ghoststep"}``) in that file
    could only fail as ``KeyError: 'param_groups'``. The Trainer's save and load of the
    optimizer are wrapped instead (private methods of ``transformers.Trainer``; where they
    are missing, or with several inner optimizers, the controller's state dict is saved
    as the optimizer state, as before). A checkpoint without :data:`STATE_NAME` (an
    earlier one) loads as it was saved.
    """
    save = getattr(trainer, "_save_optimizer_and_scheduler", None)
    load = getattr(trainer, "_load_optimizer_and_scheduler", None)
    if save is None or load is None or len(controller.optimizers) != 1:
        return
    inner = controller.optimizers[0]

    @functools.wraps(save)
    def save_plain(output_dir, *args, **kwargs):
        ours = controller.state_dict()["ghoststep"]
        controller.state_dict = inner.state_dict  # what the Trainer's save reads, only here
        try:
            save(output_dir, *args, **kwargs)
        finally:
            del controller.state_dict
        if trainer.args.should_save:
            torch.save(ours, os.path.join(output_dir, STATE_NAME))

    @functools.wraps(load)
    def load_with_state(checkpoint, *args, **kwargs):
        load(checkpoint, *args, **kwargs)
        path = os.path.join(checkpoint, STATE_NAME) if checkpoint else None
        if path is not None and os.path.isfile(path):
            ours = torch.load(path, map_location="cpu", weights_only=True)
            controller.load_state_dict({"inner": inner.state_dict(), "ghoststep": ours})

    trainer._save_optimizer_and_scheduler = save_plain
    trainer._load_optimizer_and_scheduler = load_with_state


def _find_controller(optimizer: Any) -> RadiusController | None:
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, RadiusController):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None
