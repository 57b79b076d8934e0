"""Lightning: radius control with one callback, no change to the LightningModule.

``LightningRadiusCallback`` wraps the optimizer that ``configure_optimizers`` returned in a
:class:`~ghoststep.RadiusController` when fitting starts, re-points the LR schedulers at
the wrapper, logs the per-step statistics through ``pl_module.log`` (so every attached
logger receives them) and keeps the controller's state in Lightning checkpoints.

Example::

    import lightning as L
    from ghoststep.integrations.lightning import LightningRadiusCallback

    radius = LightningRadiusCallback(mode="clip", target_r=1.0)
    trainer = L.Trainer(max_epochs=3, callbacks=[radius])
    trainer.fit(module)  # logs ghoststep/tau, ghoststep/rho_a, ghoststep/r_before, ...

How it fits Lightning's step (2.x, automatic optimization): Lightning calls
``optimizer.step(closure)``; the controller runs the closure (forward, backward, gradient
clipping), lets the inner optimizer propose p, measures the radius on the batch the
module's forward just saw (a forward pre-hook) and rescales p. With
``accumulate_grad_batches=k`` the step happens once per k batches, so p is the
accumulated update, and the radius is measured on every micro-batch that built it
(``micro_batches="all"``, the callback's default; pass ``micro_batches="last"`` to
measure only the last one).

Requirements: ``training_step`` must call the module's ``forward`` (``self(x)``) with the
model inputs, and ``forward`` must return the logits (or something ``logits_fn`` maps to
them). If ``training_step`` calls a submodule instead (``self.net(x)``), pass
``module="net"`` so the hook sits on that submodule (every optimized parameter must then
belong to it); a step whose measured forward never ran stops with an error naming the
``module=`` to pass.

Manual optimization: the callback wraps the single optimizer returned by
``configure_optimizers`` as well (``self.optimizers()`` then returns the wrapper). With
several optimizers (GANs, ...) wrap each one yourself in ``configure_optimizers`` with the
submodule it optimizes -- ``RadiusController(torch.optim.Adam(self.gen.parameters()),
self.gen)`` --, build the schedulers on the wrappers and leave the callback out (the
wrappers' state dicts carry their state through Lightning checkpoints). A callback given
a single already-wrapped optimizer only logs and checkpoints it.

Checkpoints: the optimizer entry stays the *inner* optimizer's plain state dict, and the
controller state (step and skip counters, radius window, bottleneck buffer, subset RNG)
is stored in the callback's entry. A checkpoint therefore resumes with or without
ghoststep, and a run resumed with the callback continues the controller where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from ghoststep.controller import RadiusController
from ghoststep.controller._state import split_controller_state
from ghoststep.integrations import repoint_scheduler, require
from ghoststep.monitor import DEFAULT_KEYS

_pl = require("lightning.pytorch", "lightning", feature="ghoststep.integrations.lightning")
Callback = _pl.Callback
from lightning.pytorch.core.optimizer import _MockOptimizer  # noqa: E402

__all__ = ["LightningRadiusCallback", "DEFAULT_KEYS"]


class LightningRadiusCallback(Callback):
    """Wrap the LightningModule's optimizer in a :class:`~ghoststep.RadiusController`.

    Args:
        mode: ``"clip"`` | ``"set"`` | ``"monitor"`` (see ``RadiusController``).
        target_r: r*, the normalized step to cap at (clip) or set (set).
        module: the module whose forward the radius is measured on: ``None`` (the
            LightningModule), the name of a submodule attribute (``"net"``), or a function
            ``pl_module -> nn.Module``.
        log_every: send the statistics to the loggers every N optimizer steps (1: every
            step), each with that step's own values; a logger still writes only at
            ``Trainer(log_every_n_steps=...)`` steps. ``trainer.callback_metrics`` (and the
            progress bar) hold the last step's values.
        keys: ``StepStats`` fields to log.
        prefix: prefix of the logged names.
        prog_bar: also show the logged values in the progress bar.
        **controller_kwargs: passed to ``RadiusController`` (``temperature``, ``subset``,
            ``buffer_size``, ``window``, ``quantile``, ``seed``, ``logits_fn``,
            ``mask_fn``, ``ignore_index``, ``chunk_size``, ``sinks``, ...).

    Attributes:
        controller: the ``RadiusController`` in use during fitting (None before).
    """

    def __init__(
        self,
        mode: str = "clip",
        target_r: float = 1.0,
        *,
        module: str | Callable[[Any], nn.Module] | None = None,
        log_every: int = 1,
        keys: Sequence[str] = DEFAULT_KEYS,
        prefix: str = "ghoststep/",
        prog_bar: bool = False,
        **controller_kwargs: Any,
    ) -> None:
        super().__init__()
        if not (isinstance(log_every, int) and log_every >= 1):
            raise ValueError(f"log_every must be an int >= 1, got {log_every!r}")
        for bad in ("optimizer", "model"):
            if bad in controller_kwargs:
                raise TypeError(f"{bad}= is set by the callback; use module= to pick the model")
        self.mode = mode
        self.target_r = target_r
        self.module = module
        self.log_every = log_every
        self.keys = tuple(keys)
        self.prefix = prefix
        self.prog_bar = prog_bar
        self.controller_kwargs = controller_kwargs
        self.controller: RadiusController | None = None
        self._owned = False  # the callback created the controller (and closes it)
        self._pending_state: Mapping[str, Any] | None = None
        self._last_logged = 0
        self._forwards = 0  # calls of the measured module's forward since the last step
        self._forward_hook: Any = None

    # ------------------------------------------------------------------ wrapping

    def _measured_module(self, pl_module) -> nn.Module:
        if self.module is None:
            return pl_module
        if isinstance(self.module, str):
            found = pl_module
            for part in self.module.split("."):
                found = getattr(found, part)
            return found
        return self.module(pl_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        """Wrap the configured optimizer (after Lightning built it, before it restores state)."""
        strategy = trainer.strategy
        if "deepspeed" in type(strategy).__name__.lower():
            raise ValueError(
                "LightningRadiusCallback does not support DeepSpeed (it owns the optimizer "
                "step); use DDP, or FSDP2 through ModelParallelStrategy with method='fast' "
                "(docs/scaling.md)"
            )
        optimizers = list(strategy.optimizers)
        real = [o for o in optimizers if not isinstance(o, _MockOptimizer)]
        if not real:
            raise ValueError(
                "LightningRadiusCallback: configure_optimizers returned no optimizer; there "
                "is nothing to control"
            )
        if len(optimizers) > 1:
            raise ValueError(
                "LightningRadiusCallback controls a single optimizer, configure_optimizers "
                f"returned {len(optimizers)}; wrap each one in configure_optimizers yourself "
                "(RadiusController(optimizer, the_submodule_it_trains, ...)) and leave the "
                "callback out"
            )
        inner = optimizers[0]
        if isinstance(inner, RadiusController):
            self.controller, self._owned = inner, False
        else:
            measured = self._measured_module(pl_module)
            if self._forward_hook is not None:  # a fit that ended without teardown
                self._forward_hook.remove()
            self._forwards = 0
            self._forward_hook = measured.register_forward_pre_hook(self._count_forward)
            self.controller = RadiusController(
                inner,
                measured,
                mode=self.mode,
                target_r=self.target_r,
                **{"micro_batches": "all", **self.controller_kwargs},
            )
            self._owned = True
            strategy.optimizers = [self.controller]
            for config in strategy.lr_scheduler_configs:
                if getattr(config.scheduler, "optimizer", None) is inner:
                    repoint_scheduler(config.scheduler, self.controller)
        if self._pending_state is not None:
            # Lightning restores the (inner) optimizer state right after on_fit_start.
            self.controller.load_state_dict(
                {"inner": self.controller.optimizer.state_dict(), "ghoststep": self._pending_state}
            )
            self._pending_state = None
        self._last_logged = self.controller.step_count

    def teardown(self, trainer, pl_module, stage: str) -> None:
        """Remove the forward hook of a controller this callback created (history stays)."""
        if self._owned and self.controller is not None and stage == "fit":
            self.controller.close()
        if self._forward_hook is not None:
            self._forward_hook.remove()
            self._forward_hook = None

    # ------------------------------------------------------------------ the measured forward

    def _count_forward(self, module, args) -> None:
        self._forwards += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        """Refuse a step whose measured forward never ran, naming ``module=``.

        Lightning calls this inside the closure the controller runs first in ``step``
        (after forward and backward, before the radius): the controller would stop with
        "no batch to measure", which does not say that ``training_step`` called a
        submodule. Only a step with no call of the forward at all is refused here; an
        eval-mode or no-grad call is left to the controller's own message.
        """
        if self._forward_hook is None:
            return
        if self._forwards == 0:
            raise RuntimeError(_no_forward_message(pl_module, self.controller))
        self._forwards = 0

    # ------------------------------------------------------------------ logging

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        controller = self.controller
        stats = None if controller is None else controller.last
        if stats is None or stats.step <= self._last_logged:
            return  # no optimizer step since the last call (gradient accumulation)
        self._last_logged = stats.step
        values = stats.scalars()
        metrics = {f"{self.prefix}{k}": values[k] for k in self.keys if k in values}
        if not metrics:
            return
        # callback_metrics and the progress bar: this step's values, every step
        pl_module.log_dict(
            metrics, on_step=True, on_epoch=False, prog_bar=self.prog_bar, logger=False,
            batch_size=1,
        )  # fmt: skip
        # The loggers get them through Lightning's own writer, only at this step: values
        # given to self.log stay in Lightning's result collection until the epoch ends
        # and are written again at every later logging step, so a step skipped by
        # log_every would repeat the last logged step's values.
        connector = trainer._logger_connector
        if stats.step % self.log_every == 0 and connector.should_update_logs:
            connector.log_metrics(metrics)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        if self.controller is None:
            return {} if self._pending_state is None else {"controller": self._pending_state}
        return {"controller": self.controller.state_dict()["ghoststep"]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        ours = state_dict.get("controller")
        if ours is None:
            return
        if self.controller is not None:
            inner = self.controller.optimizer.state_dict()
            self.controller.load_state_dict({"inner": inner, "ghoststep": ours})
        else:
            self._pending_state = ours  # applied in on_fit_start

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        """Store the inner optimizer's plain state dict as Lightning's optimizer entry."""
        states = checkpoint.get("optimizer_states")
        if self.controller is None or not states or len(states) != 1:
            return
        state = states[0]
        if isinstance(state, Mapping) and "inner" in state and "ghoststep" in state:
            checkpoint["optimizer_states"] = [state["inner"]]
        elif isinstance(state, Mapping) and "ghoststep" in state:
            # the controller's torch-layout state dict: the inner optimizer's is what
            # remains without the controller's entries (its own is in the callback's)
            checkpoint["optimizer_states"] = [split_controller_state(state)[0]]


def _no_forward_message(pl_module: nn.Module, controller: RadiusController) -> str:
    """The error for a step without a forward of the measured module, with the
    ``module=`` that would measure the submodule holding every optimized parameter."""
    measured = controller.model
    optimized = {id(p) for group in controller.param_groups for p in group["params"]}
    holders = [
        name
        for name, sub in pl_module.named_modules()
        if sub is not measured and name and optimized <= {id(p) for p in sub.parameters()}
    ]
    if holders:
        fix = f'pass LightningRadiusCallback(module="{min(holders, key=len)}", ...)'
    else:
        children = ", ".join(name for name, _ in pl_module.named_children()) or "none"
        fix = (
            'pass LightningRadiusCallback(module="<the submodule training_step calls>", ...) '
            f"(submodules: {children}; it must hold every optimized parameter)"
        )
    return (
        "LightningRadiusCallback: RadiusController.step() has no batch to measure the radius "
        f"on: the forward of {type(measured).__name__} did not run in this training step. "
        "The radius is measured on that forward's inputs, so training_step must call it "
        f"(self(x)); if it calls a submodule instead (self.net(x)), {fix}"
    )
