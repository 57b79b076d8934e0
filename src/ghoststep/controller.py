"""RadiusController: keep any optimizer's update inside the softmax convergence radius.

Algorithm (one ``step``; paper Prop. 5.2 and SPEC section 3)::

    grads finite?            else skip (inner optimizer untouched)      # host sync 1
    spare <- copy(theta)                      # the one extra parameter copy (kept)
    inner.step()                              # momentum, Adam, weight decay ... as usual
    theta <-> spare                           # theta = old, spare = new (bitwise)
    tau  <- ||new - old||,  v = p / tau,  p = new - old                 # host sync 2
    a    <- J_z(old; x) v                     # "jvp": one forward-mode pass, exact
         |  (z(old + h v) - z_train) / h      # "fast": one forward, against the
                                              # training forward's own logits
    rho  <- pi T / max_x (max_k a_k - min_k a_k)                        # host sync 3
    s    <- min(1, r* rho / tau)  ("clip")  |  r* rho / tau  ("set")  |  1  ("monitor")
    theta <- new (s = 1, bitwise)  |  old + s p

The pieces live in their own modules: ``capture`` (the forward hooks that remember the
training batch), ``sampling`` (subset, buffer, window, quantile, masks), ``proposal``
(the spare copy, the swap, ``old + s p``), ``meter`` (the spread by method, reduced to
one radius), ``radius`` (the pure step rule), ``sharding`` (FSDP2 shards, rank
reductions) and ``controller_state`` (what ``state_dict`` holds). This module is the
``torch.optim.Optimizer`` shell that sequences them.

Reference: P. Sao, "Ghosts of Softmax: Complex Singularities That Limit Safe Step Sizes
in Cross-Entropy", arXiv:2603.13552 (2026), section 5.
"""

from __future__ import annotations

import collections
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._checks import check_controller_arguments, check_limit_by, check_options
from .capture import Captured, ForwardCapture
from .controller_state import ControllerState
from .directional import METHODS, cuda_devices, logits_reader, split_inputs
from .meter import Measured, SpreadMeter
from .monitor import Sink, StepStats
from .proposal import (
    OptimizerSnapshot,
    ProposedUpdate,
    all_finite,
    check_dense,
    check_supported,
    holds_iterate,
)
from .radius import clip_radius, step_scale
from .sampling import Plan, Sampling, bottleneck_rows, make_plan
from .sharding import agree, check_sharding, local_shards, shard_group

__all__ = ["RadiusController"]

# Default relative margin on the measured radius in clip / set mode, by method: the
# exact JVP only needs its float32 rounding covered; the secants ("fd" across a kink,
# "fast" with its O(h) error, measured within +0.3 % of the JVP) need more.
_MARGINS = {"jvp": 1e-5, "fd": 1e-2, "fast": 1e-2}


class RadiusController(torch.optim.Optimizer):
    r"""Wrap an optimizer so each update p moves at most ``target_r`` radii (``mode="clip"``).

    A drop-in ``torch.optim.Optimizer``: it shares the inner optimizer's ``param_groups``
    dicts (so LR schedulers, ``GradScaler``, Lightning and Accelerate drive it unchanged),
    ``state`` is the inner optimizer's state, ``zero_grad`` / ``add_param_group`` delegate.
    The training loop stays ``loss.backward(); opt.step()``: a forward pre-hook on
    ``model`` remembers the inputs of the most recent training-mode forward, and the
    radius is measured on that batch. ``step(inputs=batch)`` passes it explicitly.

    Per step the inner optimizer proposes p (its own update: momentum, preconditioning,
    decoupled weight decay included); the controller measures the logit slopes
    a = J_z v along v = p / ||p|| at the *old* parameters with one Jacobian-vector
    product, the radius bound ``rho_a = pi T / max_x Delta a(x)`` and applies
    ``theta = old + s p`` with

    * ``mode="clip"``: ``s = min(1, target_r * rho_a / ||p||)`` (r after <= target_r);
    * ``mode="set"``: ``s = target_r * rho_a / ||p||`` (r after == target_r; the base
      learning rate only sets the direction). If ``rho_a`` is infinite (no logit moves
      along p) ``s = 1``;
    * ``mode="monitor"``: ``s = 1``, statistics only.

    The inner optimizer's state (moments, step counts) advances exactly as without the
    wrapper; the controller never writes into ``inner.state``. With ``s = 1`` (monitor
    mode, or a clip that does not bind) the parameters are bitwise those the inner
    optimizer produced (the controller keeps that result and only rewrites the
    parameters when s < 1).

    Memory (one extra parameter copy), host syncs, devices, faults (``on_nonfinite``),
    distributed reduction, optimizers with their own iterate, the guarantee margin and
    what is not supported: see the behaviour section of the API page
    (``docs/api/controller.md``). Which samples set the radius: the whole batch by
    default; ``subset``, ``buffer_size``, ``window`` and ``quantile`` trade some of the
    guarantee for cost or robustness, as :class:`ghoststep.sampling.Sampling` states.

    Args:
        optimizer: the inner ``torch.optim.Optimizer``; every parameter it optimizes must
            belong to ``model``.
        model: the module whose logits the loss reads (or its DDP wrapper).
        mode: ``"clip"`` | ``"set"`` | ``"monitor"``.
        target_r: r*, the normalized step to cap at (clip) or set (set); > 0.
        temperature: softmax temperature T of the loss (logits / T), > 0.
        subset, buffer_size, window, quantile, mask_fn, ignore_index, targets_fn: the
            sampling options, see :class:`~ghoststep.sampling.Sampling`.
        seed: seed of the subset generator.
        logits_fn: maps the model output to logits ``(..., K)`` (e.g. ``lambda o: o[1]``);
            default: a tensor, ``.logits``, ``["logits"]`` or a Hugging Face
            ``(loss, logits)`` tuple, never a guess. One logit per sample ((B,) or
            (B, 1), a binary classifier) is the two-class softmax [0, z].
        chunk_size: rows per JVP chunk (``ghoststep.slopes.per_sample_spread``; each
            chunk's tangent is reduced to its spread at once). Not with train-mode
            BatchNorm.
        method: ``"jvp"`` (exact forward-mode AD; about one training step of extra
            cost), ``"fast"`` (one extra float32 forward at old + h v against the
            training forward's logits, same dropout masks; within 1 % of ``"jvp"`` on
            smooth models; where it is unsafe, and the second forward autocast or TF32
            cost: ``ghoststep.directional``) or ``"fd"`` (float64, a slow reference).
        on_nonfinite: ``"skip"`` or ``"raise"``.
        history_size: length of the ``history`` deque of :class:`StepStats`.
        extra_radii: optional hook ``extra_radii(model, inputs, update) -> {name: t}``
            for radii other than the output logits' (e.g. attention logits, ReLU kinks).
            ``update`` is the list of tentative update tensors p, aligned with the
            trainable parameters; each returned ``t`` is a radius in units of that
            update (the step theta + t p has t = 1 at the full update), computed at the
            current parameters. The controller converts them to distances along
            v = p / ||p|| and records them, with ``"out"`` (rho_a), in
            ``StepStats.radii``. Non-finite (NaN) values skip the step like a bad slope.
        limit_by: names of the radii whose minimum limits the step (default: ``"out"``
            and every name ``extra_radii`` returns). E.g. ``("out",)`` records the
            extra radii without letting them bind.
        micro_batches: ``"last"`` measures the radius on the most recent training-mode
            forward before ``step()``; ``"all"`` on every training-mode forward since
            the previous step (gradient accumulation: the update is built from all
            micro-batches, so all of them should bound it). Each micro-batch is
            evaluated on its own (BatchNorm sees the statistics it trained with) and
            the smallest radius is used. ``inputs=`` passed to ``step`` overrides both.
        keep_samples: also keep each step's per-sample rho_a (``StepStats.rho_samples``,
            a CPU tensor; e.g. for the TensorBoard histogram). Off by default: for
            language models it is one number per token per step of history.
        sinks: objects with ``write(stats)`` / ``close()`` (see ``ghoststep.monitor``).
        process_group: group for the distributed reduction (default: the world).
        slopes_kwargs: extra keyword arguments for ``ghoststep.directional.directional``
            (``"jvp"`` / ``"fd"``; e.g. ``step=`` for ``"fd"``).
        margin: relative margin below the measured radius in clip mode (default by
            method: 1e-5 ``"jvp"``, 1e-2 ``"fd"`` / ``"fast"``).
        scaled_update: how s < 1 is applied: ``"interpolate"`` (old + s p),
            ``"rerun"`` (restore the inner optimizer's state and parameters, step again
            with the learning rates times s; for optimizers keeping their own iterate)
            or ``"auto"`` (``"rerun"`` for schedule-free and Lookahead optimizers).

    Example:
        >>> import torch, ghoststep
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
        ...                             torch.nn.Linear(8, 3))
        >>> opt = ghoststep.RadiusController(torch.optim.Adam(model.parameters(), lr=10.0),
        ...                                  model, mode="clip", target_r=1.0)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> torch.nn.functional.cross_entropy(model(x), y).backward()
        >>> opt.step()
        >>> opt.last.r_after <= 1.0 + 1e-6
        True
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        mode: str = "clip",
        target_r: float = 1.0,
        temperature: float = 1.0,
        subset: int | None = None,
        buffer_size: int = 0,
        window: int = 1,
        quantile: float | None = None,
        seed: int = 0,
        logits_fn: Callable[[Any], torch.Tensor] | None = None,
        mask_fn: Callable[[Any], torch.Tensor] | None = None,
        ignore_index: int | None = None,
        targets_fn: Callable[[Any], torch.Tensor] | None = None,
        chunk_size: int | None = None,
        method: str = "jvp",
        on_nonfinite: str = "skip",
        history_size: int = 1000,
        keep_samples: bool = False,
        micro_batches: str = "last",
        extra_radii: Callable[[nn.Module, Any, list], Mapping[str, float]] | None = None,
        limit_by: Sequence[str] | None = None,
        sinks: Iterable[Sink] = (),
        process_group: Any = None,
        slopes_kwargs: Mapping[str, Any] | None = None,
        margin: float | None = None,
        scaled_update: str = "auto",
    ) -> None:
        check_controller_arguments(optimizer, model, mode, target_r, temperature)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        check_options(on_nonfinite, history_size, margin, scaled_update, micro_batches)
        check_supported(optimizer)
        limit_by = check_limit_by(limit_by, extra_radii)
        self.sampling = Sampling(
            subset, buffer_size, window, quantile, mask_fn, ignore_index, targets_fn
        )

        # Optimizer.__init__ assigns self.state and calls add_param_group; both are
        # routed to the base class until self.optimizer exists (see the overrides).
        super().__init__([dict(g) for g in optimizer.param_groups], optimizer.defaults)
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups  # share the very same dicts
        self.defaults = optimizer.defaults

        self.model = model
        self._slope_model = _unwrap(model)
        self.mode = mode
        self.target_r = float(target_r)
        self.temperature = float(temperature)
        self._method = method
        self.margin = _MARGINS[method] if margin is None else float(margin)
        if scaled_update == "auto":
            scaled_update = "rerun" if holds_iterate(optimizer) else "interpolate"
        self.scaled_update = scaled_update
        self.on_nonfinite = on_nonfinite
        self.extra_radii = extra_radii
        self.sinks: list[Sink] = list(sinks)

        self.history: collections.deque[StepStats] = collections.deque(maxlen=history_size)
        self.last: StepStats | None = None
        self.step_count = 0
        self.skipped_steps = 0
        self._warned = False
        window = self.sampling.window
        self._recent_rhos: collections.deque[float] = collections.deque(maxlen=window - 1)
        self._buffer: Any = None  # inputs of the bottleneck rows, or None
        self._generator = torch.Generator()
        self._generator.manual_seed(int(seed))
        self._proposal = ProposedUpdate()
        self._build_parts(logits_fn, chunk_size, slopes_kwargs, limit_by, keep_samples,
                          process_group, micro_batches)  # fmt: skip
        self._capable = method == "fast"  # "jvp" / "fd" are tried before the first step
        self._check_params_in_model()
        check_sharding(self.model, self._params(), method, extra_radii, self.scaled_update)
        self._set_devices()

    def _build_parts(
        self, logits_fn, chunk_size, slopes_kwargs, limit_by, keep_samples, process_group,
        micro_batches,
    ) -> None:  # fmt: skip
        """The measurement (``meter``) and the forward hooks (``capture``)."""
        logits = logits_reader(logits_fn)
        self._meter = SpreadMeter(
            self._slope_model,
            method=self._method,
            logits_fn=logits,
            temperature=self.temperature,
            sampling=self.sampling,
            chunk_size=chunk_size,
            slopes_kwargs=slopes_kwargs or {},
            extra_radii=self.extra_radii,
            limit_by=limit_by,
            keep_samples=bool(keep_samples),
            process_group=process_group,
        )
        self._capture = ForwardCapture(
            self._slope_model,
            micro_batches=micro_batches,
            logits_fn=logits,
            keep_logits=self._method == "fast",
            rows_check=self.sampling.samples_rows,
            devices=[],
        )

    @property
    def method(self) -> str:
        """How the slopes are evaluated (``"jvp"`` | ``"fd"`` | ``"fast"``); settable."""
        return self._method

    @method.setter
    def method(self, value: str) -> None:
        if value not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {value!r}")
        self._method = self._meter.method = value
        self._capture.keep_logits = value == "fast"

    # ------------------------------------------------------------------ Optimizer API

    @property
    def state(self):  # type: ignore[override]
        """The inner optimizer's per-parameter state (the wrapper keeps none of its own)."""
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        if "optimizer" in self.__dict__:
            self.optimizer.state = value
        # else: torch.optim.Optimizer.__init__ assigning its empty default; ignored.

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer (visible here: the groups are shared)."""
        if "optimizer" not in self.__dict__:
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)
        self.param_groups = self.optimizer.param_groups
        self._set_devices()
        self._check_params_in_model()

    def train(self) -> None:
        """Forward ``train()`` to the inner optimizer if it has one (schedule-free)."""
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()

    def eval(self) -> None:
        """Forward ``eval()`` to the inner optimizer if it has one (schedule-free)."""
        if callable(getattr(self.optimizer, "eval", None)):
            self.optimizer.eval()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{"inner": inner.state_dict(), "ghoststep": ControllerState.to_dict()}``
        (counters, recent radii, bottleneck buffer, subset generator)."""
        ours = ControllerState(
            step_count=self.step_count,
            skipped_steps=self.skipped_steps,
            recent_rhos=list(self._recent_rhos),
            buffer=self._buffer,
            generator=self._generator.get_state(),
            warned=self._warned,
        )
        return {"inner": self.optimizer.state_dict(), "ghoststep": ours.to_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Load a dict from :meth:`state_dict` (or a bare inner optimizer state dict)."""
        if "inner" not in state_dict:
            self.optimizer.load_state_dict(state_dict)  # a plain optimizer checkpoint
            self.param_groups = self.optimizer.param_groups
            return
        self.optimizer.load_state_dict(state_dict["inner"])
        self.param_groups = self.optimizer.param_groups  # re-link (see PYTORCH-FACTS)
        ours = ControllerState.from_dict(state_dict.get("ghoststep", {}))
        self.step_count, self.skipped_steps = ours.step_count, ours.skipped_steps
        self._recent_rhos = collections.deque(ours.recent_rhos, maxlen=self._recent_rhos.maxlen)
        self._buffer = ours.buffer
        if ours.generator is not None:
            self._generator.set_state(ours.generator)
        self._warned = ours.warned

    def __repr__(self) -> str:
        return (
            f"RadiusController(mode={self.mode!r}, target_r={self.target_r}, "
            f"optimizer={type(self.optimizer).__name__})"
        )

    def close(self) -> None:
        """Remove the forward hooks and close the sinks."""
        self._capture.remove()
        for sink in self.sinks:
            sink.close()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, inputs: Any = None):
        """One controlled step. Returns what ``closure`` returned (or None).

        Args:
            closure: called first under ``torch.enable_grad()`` (Lightning runs forward and
                backward inside it); afterwards the gradients must be final.
            inputs: the batch to measure the radius on, as passed to the model (a tensor,
                a tuple of positional arguments, or a dict of keyword arguments). Default:
                the inputs of the most recent training-mode forward since the last step.
        Raises:
            RuntimeError: no batch (neither a training forward nor ``inputs=``), or a
                sparse gradient.
            FloatingPointError: something non-finite with ``on_nonfinite="raise"``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batches = self._batches(inputs)
        model_params = self._params()
        # FSDP2: the arithmetic runs on each rank's local shard; the few global
        # scalars are summed over the shard group (no-op for unsharded parameters)
        shards = shard_group(model_params)
        params = local_shards(model_params)
        info = {"lr": _as_float(self.param_groups[0].get("lr", math.nan)), "loss": _as_float(loss)}
        check_dense(model_params)
        if not self._capable:
            self._try_measurement(model_params, batches)
        self.step_count += 1
        grads = local_shards([p.grad for p in model_params if p.grad is not None])
        # host sync 1 of 3: a non-finite gradient must stop us before inner.step().
        if grads and not agree(all_finite(grads), shards):
            self._fault("gradient", info)
            return loss
        rerun = self.scaled_update == "rerun" and self.mode != "monitor"
        snapshot = OptimizerSnapshot(self.optimizer, params) if rerun else None
        # The one extra parameter copy. After the swap the parameters hold the old
        # values and `proposed` the inner optimizer's result, bitwise (s = 1 copies it
        # back), and the update p = proposed - params is never stored.
        proposed = self._proposal.begin(params, shards)
        self.optimizer.step()
        tau = self._proposal.swap(params, proposed)  # host sync 2 of 3
        if not math.isfinite(tau):
            self._fault("update", info)  # parameters hold the old values
            return loss
        if tau == 0.0:
            self._proposal.apply(params, proposed, 1.0, 0.0)
            self._record(self._stats(0.0, math.inf, 1.0, info, spread=0.0))
            return loss
        self._controlled(params, proposed, tau, batches, snapshot, info)
        return loss

    def _controlled(self, params, proposed, tau, batches, snapshot, info) -> None:
        """Measure the radius along the proposal and apply old + s p."""
        start = time.perf_counter()
        found = self._measure(params, proposed, tau, batches)
        fraction = found.fraction
        info["seconds"] = time.perf_counter() - start
        if not found.finite:
            self._proposal.apply(params, proposed, 0.0, fraction)  # back to the old values
            self._fault("slope", info, tau=tau)
            return
        if not found.counted:
            self._all_masked(params, proposed, tau, fraction, info)
            if self.mode != "monitor":
                return
        rho = min([found.rho, *self._recent_rhos])
        if self.sampling.window > 1:
            self._recent_rhos.append(found.rho)
        info["seconds"] = time.perf_counter() - start
        limit = self._limit(rho, tau, params, fraction)
        scale = step_scale(tau, limit, self.mode, self.target_r)
        if snapshot is not None and scale != 1.0:
            scale = self._rerun(params, snapshot, scale, self.target_r * limit, tau)
        else:
            self._proposal.apply(params, proposed, scale, fraction)
        self._record(self._stats(tau, rho, scale, info, measured=found))

    def _measure(self, params, proposed, tau: float, batches: list[Captured]) -> Measured:
        """The measurement over the micro-batches (see ``ghoststep.meter``); updates the
        bottleneck buffer."""
        # "fast" measures at old + f p (f = h / tau); "jvp" / "fd" at the old values.
        meter = self._meter
        fraction = meter.fd_fraction(tau, params, self._proposal) if self.method == "fast" else 0.0
        plans = [self._plan(entry) for entry in batches]
        with self._capture.measuring(), meter.precision():
            found = meter.measure(params, proposed, tau, plans, fraction)
        if found.pending is not None and self.sampling.buffer_size > 0:
            rows = bottleneck_rows(*found.pending, self.sampling.buffer_size)
            self._buffer = rows if rows is not None else self._buffer
        return found

    def _limit(self, rho: float, tau: float, params, fraction: float) -> float:
        """The radius the step rule uses. Clip keeps a margin below the radius for the
        method's error and, when it binds (s < 1 is computed, not copied), for the float
        rounding of old + s p: about one ulp of each parameter, eps ||old|| in length.
        The parameters are at old + f p now, so ||old|| <= ||params|| + f tau."""
        if self.mode != "clip":
            return rho
        limit = clip_radius(rho, self.margin)
        if step_scale(tau, limit, self.mode, self.target_r) < 1.0:
            old_norm = self._proposal.norm(params) + fraction * tau
            limit = clip_radius(rho, self.margin, 2.0 * torch.finfo(params[0].dtype).eps * old_norm)
        return limit

    def _all_masked(self, params, proposed, tau, fraction, info) -> None:
        """Every position masked: no radius bounds this update. Policy: clip / set skip
        it (the parameters keep their values), monitor applies it."""
        applied = self.mode == "monitor"
        warnings.warn(
            "RadiusController: every position of the batch is masked (mask_fn / "
            "ignore_index), so no radius bounds this update; "
            + ("it was applied (monitor mode)" if applied
               else "it was skipped and the parameters left unchanged"),
            RuntimeWarning,
            stacklevel=4,
        )  # fmt: skip
        if not applied:
            self._proposal.apply(params, proposed, 0.0, fraction)
            self.skipped_steps += 1
            self._record(self._stats(tau, math.inf, 0.0, info, spread=0.0, skipped=True))

    def _batches(self, inputs) -> list[Captured]:
        if inputs is not None:
            self._capture.entries = []  # the explicit batch replaces the captured ones
            return [Captured.explicit(inputs)]
        batches = self._capture.take()
        if not batches:
            raise RuntimeError(
                "RadiusController.step() has no batch to measure the radius on: run a "
                "training-mode forward of the model before step(), or pass step(inputs=batch)"
            )
        return batches

    def _plan(self, entry: Captured) -> Plan:
        plan, self._buffer = make_plan(entry, self.sampling, self._generator, self._buffer)
        return plan

    def _try_measurement(self, params, batches) -> None:
        """Run the slopes once along the gradient on the first batch (first step only)."""
        entry = batches[0]  # all rows, no subset draw: the generator is left alone
        plan = Plan(entry.inputs, split_inputs(entry.inputs), entry.rng, None)
        with self._capture.measuring(), self._meter.precision():
            self._meter.try_gradient(params, plan)
        self._capable = True

    def _rerun(self, params, snapshot: OptimizerSnapshot, scale, limit, tau) -> float:
        """Scaled update for optimizers with an iterate of their own (``"rerun"``): the
        inner step again, from the restored state, with every learning rate times s.
        In clip mode the result is pulled back to length ``limit`` if it overshoots
        (its direction is not exactly p). Returns the realised s' = ||step|| / tau."""
        length = snapshot.rerun(self.optimizer, params, scale)
        self.param_groups = self.optimizer.param_groups
        if self.mode == "clip" and length > limit:
            torch._foreach_lerp_(params, snapshot.params, 1.0 - limit / length)
            length = limit
        return length / tau

    def _fault(self, what: str, info: dict, *, tau: float = math.nan) -> None:
        """Skip (parameters already equal the snapshot / untouched) or raise."""
        message = (
            f"RadiusController: non-finite {what} at step {self.step_count}; the step was "
            "skipped and the parameters left unchanged"
        )
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message.replace("the step was skipped and ", ""))
        self.skipped_steps += 1
        if not self._warned:
            warnings.warn(message + " (warning once per controller)", RuntimeWarning, stacklevel=4)
            self._warned = True
        self._record(self._stats(tau, math.nan, 0.0, info, spread=math.nan, skipped=True))

    def _stats(self, tau, rho, scale, info, *, measured=None, spread=None, skipped=False):
        r_before = tau / rho if rho > 0 else math.inf  # tau / inf = 0; nan propagates
        return StepStats(
            step=self.step_count,
            tau=tau,
            rho_a=rho,
            r_before=r_before,
            r_after=0.0 if skipped else scale * r_before,
            scale=scale,
            bottleneck=-1 if measured is None else measured.bottleneck,
            radius_seconds=info.get("seconds", 0.0),
            skipped=skipped,
            lr=info["lr"],
            loss=info["loss"],
            spread=measured.spread if measured is not None else spread,
            rho_samples=None if measured is None else measured.samples,
            radii=None if measured is None else measured.radii,
        )

    def _record(self, stats: StepStats) -> None:
        self.last = stats
        self.history.append(stats)
        for sink in self.sinks:
            sink.write(stats)

    # ------------------------------------------------------------------ internals

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _set_devices(self) -> None:
        """The CUDA devices whose RNG the capture saves and the measurement replays."""
        devices = cuda_devices(self._slope_model)
        self._meter.devices = self._capture.devices = devices

    def _check_params_in_model(self) -> None:
        known = {id(p) for p in self._slope_model.parameters()}
        for p in self._params():
            if id(p) not in known:
                raise ValueError(
                    "every parameter the optimizer updates must belong to `model`; found one "
                    f"of shape {tuple(p.shape)} that does not"
                )


# --------------------------------------------------------------------------- helpers


def _as_float(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach()) if value.numel() == 1 else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _unwrap(model: nn.Module) -> nn.Module:
    parallel = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, parallel) else model
