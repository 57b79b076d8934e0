"""RadiusController: keep any optimizer's update inside the softmax convergence radius.

Algorithm (one ``step``; paper Prop. 5.2 and section 5)::

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

The pieces live in their own modules: ``_capture`` (the forward hooks that remember
the training batch), ``_sampling`` (subset, buffer, window, quantile, masks; the
immutable ``Plan`` of one micro-batch), ``_proposal`` (``Proposal``: the spare copy,
the swap, tau, ``old + s p``), ``_meter`` (``TangentMeter`` for ``"jvp"`` / ``"fd"``,
``SecantMeter`` for ``"fast"``, reduced to one radius by
``ghoststep.measurement._reduce.reduce_spreads``, as ``measure()`` is),
``ghoststep.radius`` (the pure step rule), ``ghoststep.evaluation._sharding`` (FSDP2
shards, rank reductions) and ``_state`` (what ``state_dict`` holds). This module is the
``torch.optim.Optimizer`` shell that sequences them.

Reference: P. Sao, "Ghosts of Softmax: Complex Singularities That Limit Safe Step Sizes
in Cross-Entropy", arXiv:2603.13552 (2026), section 5.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..evaluation._directional import SLOPE_METHODS, check_fast_dtype, tf32_allowed
from ..evaluation._inputs import check_row_slicing, split_inputs
from ..evaluation._isolation import autocast_as, cuda_devices
from ..evaluation._outputs import LogitsReader, detect_layout
from ..evaluation._sharding import (
    agree,
    auto_method,
    check_sharding,
    half_compute,
    is_sharded,
    local_shards,
    max_over_ranks,
    shard_group,
)
from ..evaluation._updates import OptimizerSnapshot
from ..monitor import Sink, StepStats
from ..radius._bounds import clip_radius, step_scale
from ._capture import Captured, ForwardCapture, check_single_controller
from ._checks import check_controller_arguments, check_counts, check_limit_by, check_options
from ._function import changes
from ._meter import MeterReading, Unresolved, make_meter
from ._proposal import (
    Proposal,
    all_finite,
    check_dense,
    check_supported,
    holds_iterate,
    rerun_scaled,
)
from ._sampling import Plan, Sampling, batch_rows, bottleneck_rows, make_plan
from ._state import ControllerState

__all__ = ["RadiusController"]

# Default relative margin below the measured radius (clip and set mode), by method and
# by the precision the measurement ran in (``_precision``): "full" float32 / float64;
# "autocast" (the JVP under the training forward's bfloat16 / float16 autocast);
# "half" (bfloat16 / float16 parameters: the JVP in 16 bits, and the rounding of
# old + s p into them). The exact JVP in float32 only needs its rounding covered; the
# secants ("fd" across a kink, "fast" with its O(h) error) need more. Measured errors:
# benchmarks/bench_precision.py, table in docs/benchmarks.md.
_MARGINS = {
    ("jvp", "full"): 1e-5,
    ("jvp", "autocast"): 1e-2,
    ("jvp", "half"): 3e-2,
    ("fast", "full"): 2e-2,
    ("fd", "full"): 1e-2,
    ("fd", "half"): 3e-2,
}
_HALF = (torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What one step records besides the measurement: the first group's learning rate,
    the closure's loss (None without one) and the seconds the radius took."""

    lr: float | None
    loss: float | None
    seconds: float = 0.0


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

    What is measured and scaled is the applied update, over every parameter in the inner
    optimizers' groups (one frozen with ``requires_grad_(False)`` that momentum or weight
    decay still move included). Several optimizers over one model, e.g.
    ``RadiusController([muon, adamw], model)``, are stepped in order and their combined
    update measured and scaled: ``param_groups`` concatenates their group dicts,
    ``state_dict()["inner"]`` lists their states; two controllers on one model raise at
    the second one's step. Under ``torch.compile`` (``opt.step =
    torch.compile(opt.step)``, or a compiled function calling it) ``step`` runs eagerly,
    bitwise as uncompiled.

    Memory (one extra parameter copy), host syncs, devices, faults (``on_nonfinite``),
    distributed reduction, optimizers with their own iterate, the guarantee margin,
    copies (``copy.deepcopy`` / ``torch.save`` of model and controller together give a
    controller wired to the copied model) and what is not supported: see the behaviour
    section of the API page
    (``docs/api/controller.md``). Which samples set the radius: the whole batch by
    default; ``subset``, ``buffer_size``, ``window`` and ``quantile`` trade some of the
    guarantee for cost or robustness, as :class:`ghoststep.controller.Sampling` states.

    Args:
        optimizer: the inner ``torch.optim.Optimizer``, or a list of them sharing no
            parameter (stepped in order; ``.optimizers`` lists them, ``.optimizer`` is
            the one of a single); every parameter they optimize must belong to
            ``model``.
        model: the module whose logits the loss reads (or its DDP wrapper).
        mode: ``"clip"`` | ``"set"`` | ``"monitor"``.
        target_r: r*, the normalized step to cap at (clip) or set (set); > 0.
        temperature: softmax temperature T of the loss (logits / T), > 0.
        subset, buffer_size, window, quantile, mask_fn, ignore_index, targets_fn: the
            sampling options, see :class:`~ghoststep.controller.Sampling`.
        seed: seed of the subset generator.
        logits_fn: maps the model output to the logits (e.g. ``lambda o: o[1]``), or to
            several softmax heads (a tuple / list / dict of tensors, each (B, ...)):
            the radius is then the smallest over the heads. Default: a tensor,
            ``.logits``, a dict whose only non-scalar tensor is ``"logits"`` or a
            Hugging Face ``(loss, logits)`` tuple, never a guess (a dict or tuple with
            several candidate tensors is a ``TypeError`` naming ``logits_fn``). A
            model whose output is not logits (e.g. an embedding for a contrastive
            loss) needs a ``logits_fn`` that returns the logits the loss reads. One
            logit per sample ((B,) or (B, 1), a binary classifier) is the two-class
            softmax [0, z]. Masked classes (``-inf`` logits) drop out of the spread.
        class_dim: the class axis of logits with 3 or more dims, as the loss reads
            them: 1 for ``F.cross_entropy``'s (B, C, d1, ...) (segmentation), -1 for
            (B, T, V) (language models). Default None: a Hugging Face model's from
            its class (``*ForSemanticSegmentation``: 1, else -1); otherwise from the
            first step's gradient of the loss on the logits (a softmax over dim d
            makes it sum to 0 along d; dim 1 and the last are the candidates), and a
            ``ValueError`` naming ``class_dim`` when it does not tell. Logits of 1 or
            2 dims: the last.
        activation: ``"softmax"`` (default) or ``"sigmoid"``: every logit its own
            binary classifier (multi-label ``BCEWithLogitsLoss``), read as the
            two-class softmax [0, z] per element (spread |a|). Default None: softmax,
            or sigmoid for a Hugging Face model with ``config.problem_type ==
            "multi_label_classification"``.
        chunk_size: rows per JVP chunk (``ghoststep.measurement.per_sample_spread``; each
            chunk's tangent is reduced to its spread at once). Not with train-mode
            BatchNorm.
        method: ``"auto"`` (default: the first step picks ``"fast"`` for float32 /
            float64 training without autocast, ``"jvp"`` under autocast, with 16-bit
            parameters or TF32, and falls back to ``"fast"`` with a warning where an op
            has no forward AD; fixed for the run and checkpointed; table in
            ``docs/api/controller.md``), ``"jvp"`` (exact forward-mode AD, under the
            training forward's autocast; about one training step of extra cost),
            ``"fast"`` (one extra float32 forward at old + h v against the training
            forward's logits, same dropout masks, and one more at old - h v near the
            bound; float32 / float64 parameters only: ``ghoststep.evaluation``) or
            ``"fd"`` (float64, a slow reference).
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
        micro_batches: ``"all"`` (default) measures the radius on every training
            forward since the previous step (gradient accumulation: the update is built
            from all micro-batches, so all of them bound it; their inputs, and for
            ``"fast"`` their logits, are held until ``step()``); ``"last"`` on the most
            recent one. A training forward is one in train mode with gradients enabled
            (``no_grad`` / ``inference_mode`` side forwards are ignored). Each
            micro-batch is evaluated on its own (BatchNorm sees the statistics it trained
            with) and the smallest radius is used. ``inputs=`` passed to ``step``
            overrides both.
        keep_samples: also keep each step's per-sample rho_a (``StepStats.rho_samples``,
            a CPU tensor; e.g. for the TensorBoard histogram). Off by default: for
            language models it is one number per token per step of history.
        sinks: objects with ``write(stats)`` / ``close()`` (see ``ghoststep.monitor``).
        process_group: group for the distributed reduction (default: the world).
        slopes_kwargs: extra keyword arguments for ``ghoststep.evaluation.directional``
            (``"jvp"`` / ``"fd"``; e.g. ``step=`` for ``"fd"``).
        margin: relative margin below the measured radius in clip and set mode
            (default by method and precision, e.g. 1e-5 ``"jvp"`` in float32, 1e-2
            under bf16 autocast, 2e-2 ``"fast"``: :meth:`margin_for`).
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
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
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
        logits_fn: Callable[[Any], Any] | None = None,
        class_dim: int | None = None,
        activation: str | None = None,
        mask_fn: Callable[[Any], torch.Tensor] | None = None,
        ignore_index: int | None = None,
        targets_fn: Callable[[Any], torch.Tensor] | None = None,
        chunk_size: int | None = None,
        method: str = "auto",
        on_nonfinite: str = "skip",
        history_size: int = 1000,
        keep_samples: bool = False,
        micro_batches: str = "all",
        extra_radii: Callable[[nn.Module, Any, list], Mapping[str, float]] | None = None,
        limit_by: Sequence[str] | None = None,
        sinks: Iterable[Sink] = (),
        process_group: Any = None,
        slopes_kwargs: Mapping[str, Any] | None = None,
        margin: float | None = None,
        scaled_update: str = "auto",
    ) -> None:
        optimizers = check_controller_arguments(optimizer, model, mode, target_r, temperature)
        _check_method(method)
        check_options(on_nonfinite, history_size, margin, scaled_update, micro_batches)
        check_counts(seed, chunk_size)
        for inner in optimizers:
            check_supported(inner)
        scaled_update = _scaled_update(scaled_update, optimizers)
        limit_by = check_limit_by(limit_by, extra_radii)
        slope_model = _unwrap(model)
        if ignore_index is not None and mask_fn is None:
            # a causal LM scores logits at t against labels[t + 1]: shift the mask alike
            mask_fn = _shifted_label_mask(slope_model, ignore_index, targets_fn)
            if mask_fn is not None:
                ignore_index = targets_fn = None
        self.sampling = Sampling(
            subset, buffer_size, window, quantile, mask_fn, ignore_index, targets_fn
        )

        # Optimizer.__init__ assigns self.state and calls add_param_group; both are
        # routed to the base class until self.optimizers exists (see the overrides).
        groups = [dict(g) for inner in optimizers for g in inner.param_groups]
        super().__init__(groups, optimizers[0].defaults)
        self.optimizers: list[torch.optim.Optimizer] = optimizers
        self._link_groups()  # share the very same dicts
        self.defaults = optimizers[0].defaults

        self.model = model
        self._slope_model = slope_model
        self.mode = mode
        self.target_r = float(target_r)
        self.temperature = float(temperature)
        if method == "auto" and is_sharded(self._params()):
            method = auto_method(slope_model, self._params())  # FSDP2: fixed here
        self._method = method
        self._margin = None if margin is None else float(margin)
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
        self._proposal = Proposal()
        reader = _reader(slope_model, logits_fn, class_dim, activation)
        self._build_parts(reader, chunk_size, slopes_kwargs, limit_by, keep_samples,
                          process_group, micro_batches)  # fmt: skip
        self._watch = self._meter.watch  # shared: the meter warns through it too
        self._capable = method == "fast"  # "jvp" / "fd" are tried before the first step
        self._check_params_in_model()
        check_sharding(self.model, self._params(), method, extra_radii, self.scaled_update)
        if method == "fast":
            check_fast_dtype(self._params())
        self._set_devices()

    def _build_parts(
        self, logits, chunk_size, slopes_kwargs, limit_by, keep_samples, process_group,
        micro_batches,
    ) -> None:  # fmt: skip
        """The measurement (``meter``) and the forward hooks (``capture``), reading the
        logits with the one reader ``logits``."""
        self._meter = make_meter(
            self._method,
            self._slope_model,
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
            keep_logits=self._method in ("fast", "auto"),
            rows_check=self.sampling.samples_rows,
            devices=[],
            hooked=_hooked(self.model),
        )

    @property
    def method(self) -> str:
        """How the slopes are evaluated: ``"jvp"`` | ``"fd"`` | ``"fast"``, or ``"auto"``
        until the first step resolves it (then fixed for the run, and checkpointed);
        settable."""
        return self._method

    @method.setter
    def method(self, value: str) -> None:
        _check_method(value)
        if value == "fast":
            check_fast_dtype(self._params())
        self._method = value
        self._meter = self._meter.with_method(value)
        self._capture.keep_logits = value in ("fast", "auto")

    @property
    def reader(self) -> LogitsReader:
        """How the controller reads the logits (``logits_fn``, ``class_dim`` -- resolved
        at the first step when detected --, ``activation``); ``measure(...,
        logits_fn=ctrl.reader)`` measures what the controller bounds."""
        return self._meter.logits_fn

    @property
    def margin(self) -> float | None:
        """The relative margin below the measured radius in float32 / float64 (the
        ``margin`` argument, or the method's default; None while ``"auto"`` is
        unresolved). Other precisions: :meth:`margin_for`."""
        if self._margin is None and self._method == "auto":
            return None
        return self.margin_for("full")

    def margin_for(self, precision: str) -> float:
        """The margin for a measurement in ``precision`` (``"full"``, ``"autocast"``:
        the JVP under bfloat16 / float16 autocast, ``"half"``: 16-bit parameters)."""
        if self._margin is not None:
            return self._margin
        return _MARGINS.get((self._method, precision), _MARGINS[(self._method, "full")])

    # ------------------------------------------------------------------ Optimizer API

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The inner optimizer (a controller of several: :attr:`optimizers`)."""
        if len(self.optimizers) != 1:
            raise AttributeError(
                f"this RadiusController wraps {len(self.optimizers)} optimizers: use "
                "`.optimizers` (a list)"
            )
        return self.optimizers[0]

    @property
    def state(self):  # type: ignore[override]
        """The inner optimizer's per-parameter state (the wrapper keeps none of its own);
        with several inner optimizers a dict over all of their parameters whose values
        are their per-parameter state dicts."""
        if len(self.optimizers) == 1:
            return self.optimizers[0].state
        return {p: s for inner in self.optimizers for p, s in inner.state.items()}

    @state.setter
    def state(self, value) -> None:
        if "optimizers" not in self.__dict__:
            return  # torch.optim.Optimizer.__init__ assigning its empty default
        if len(self.optimizers) != 1:
            raise AttributeError("set the state of each of `.optimizers` instead")
        self.optimizers[0].state = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer (visible here: the groups are shared).
        With several inner optimizers add it to one of them (``ctrl.optimizers[i]``):
        the controller's groups follow at its next step."""
        if "optimizers" not in self.__dict__:
            super().add_param_group(param_group)
            return
        if len(self.optimizers) != 1:
            raise ValueError(
                "this RadiusController wraps several optimizers: add the group to the one "
                "that should move it, `ctrl.optimizers[i].add_param_group(group)`"
            )
        self.optimizers[0].add_param_group(param_group)
        self._link_groups()
        self._set_devices()
        self._check_params_in_model()

    def train(self) -> None:
        """Forward ``train()`` to the inner optimizers that have one (schedule-free)."""
        for inner in self.optimizers:
            if callable(getattr(inner, "train", None)):
                inner.train()

    def eval(self) -> None:
        """Forward ``eval()`` to the inner optimizers that have one (schedule-free)."""
        for inner in self.optimizers:
            if callable(getattr(inner, "eval", None)):
                inner.eval()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for inner in self.optimizers:
            inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{"inner": inner.state_dict(), "ghoststep": ControllerState.to_dict()}``
        (counters, recent radii, bottleneck buffer, subset generator); with several
        inner optimizers ``"inner"`` is the list of their state dicts, in order."""
        ours = ControllerState(
            step_count=self.step_count,
            skipped_steps=self.skipped_steps,
            recent_rhos=list(self._recent_rhos),
            buffer=self._buffer,
            generator=self._generator.get_state(),
            warned=self._warned,
            spread_hint=self._meter.spread_hint,
            method=self._method,
        )
        inner = [o.state_dict() for o in self.optimizers]
        return {"inner": inner[0] if len(inner) == 1 else inner, "ghoststep": ours.to_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Load a dict from :meth:`state_dict` (or a bare inner optimizer state dict)."""
        if "inner" not in state_dict:
            self._load_inner(state_dict)  # a plain optimizer checkpoint
            return
        self._load_inner(state_dict["inner"])
        ours = ControllerState.from_dict(state_dict.get("ghoststep", {}))
        self.step_count, self.skipped_steps = ours.step_count, ours.skipped_steps
        self._recent_rhos = collections.deque(ours.recent_rhos, maxlen=self._recent_rhos.maxlen)
        self._buffer = ours.buffer
        if ours.generator is not None:
            self._generator.set_state(ours.generator)
        self._warned = ours.warned
        self._meter.spread_hint = ours.spread_hint
        if self._method == "auto" and ours.method not in (None, "auto"):
            self.method = ours.method  # the run's resolved choice, as before the save

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy`` and whole-object pickles (``torch.save(ctrl)``): the whole
        controller (``torch.optim.Optimizer`` would keep only ``defaults``, ``state`` and
        ``param_groups``), its model, inner optimizer and forward capture included,
        except what belongs to the original: the sinks (open files, writers), a step
        wrapper an LR scheduler put on the instance, the optimizer hooks (dropped as
        ``torch.optim`` drops them) and the spare parameter copy (scratch)."""
        state = self.__dict__.copy()
        state.pop("step", None)
        for key in [k for k in state if k.startswith("_optimizer_") and k.endswith("_hooks")]:
            del state[key]
        state["sinks"] = []
        proposal = state["_proposal"] = copy.copy(self._proposal)
        proposal.spare, proposal.params = None, []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "optimizers" not in state:  # saved before controllers took several
            state["optimizers"] = [state.pop("optimizer")]
        super().__setstate__(state)  # restores the dict and fresh optimizer hook dicts

    def _load_inner(self, inner: Any) -> None:
        """Load the inner optimizers' state dicts (one dict, or a list of one per
        optimizer) and re-link the groups: each load replaced its group dicts, and
        schedulers edit the controller's."""
        several = len(self.optimizers) != 1
        saved = list(inner) if several and isinstance(inner, (list, tuple)) else [inner]
        if len(saved) != len(self.optimizers):
            raise ValueError(
                f"the state dict holds the state of {len(saved)} inner optimizer(s) (a list "
                f"of them for several), this RadiusController wraps {len(self.optimizers)}"
            )
        for optimizer, state in zip(self.optimizers, saved, strict=True):
            optimizer.load_state_dict(state)
        self._link_groups()

    def __repr__(self) -> str:
        names = [type(inner).__name__ for inner in self.optimizers]
        inner = f"optimizer={names[0]}" if len(names) == 1 else f"optimizers=[{', '.join(names)}]"
        return f"RadiusController(mode={self.mode!r}, target_r={self.target_r}, {inner})"

    def close(self) -> None:
        """Remove the forward hooks and close the sinks."""
        self._capture.remove()
        for sink in self.sinks:
            sink.close()

    # Eager under torch.compile (``opt.step = torch.compile(opt.step)``, or a compiled
    # function calling it): the step swaps storage (``.data``), writes attributes and
    # reads host values, which a traced region replays wrongly (measured: the update
    # applied one step late, never measured). Dynamo breaks the graph here instead; an
    # inner optimizer's own compiled step still runs compiled.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, inputs: Any = None):
        """One controlled step. Returns what ``closure`` returned (or None).

        What surrounds the call does not change it: inside ``torch.autocast``,
        ``no_grad`` or ``inference_mode`` it measures and steps exactly as outside,
        and under ``torch.compile`` (of ``step`` itself or of a function calling it)
        it runs eagerly, with the same result bitwise.

        Args:
            closure: called first under ``torch.enable_grad()`` (Lightning runs forward and
                backward inside it); afterwards the gradients must be final.
            inputs: the batch to measure the radius on, as passed to the model: a tensor
                or ``PackedSequence`` (``model(x)``), a tuple of positional tensors
                (``model(*inputs)``), a dict of keyword tensors (``model(**inputs)``), or
                any call exactly as ``ghoststep.Call(*args, **kwargs)`` (one dict or tuple
                argument, lists of lengths, nested containers). Default: the inputs of the
                training forwards since the last step.
        Raises:
            RuntimeError: no batch (neither a training forward nor ``inputs=``), or a
                sparse gradient.
            FloatingPointError: something non-finite with ``on_nonfinite="raise"``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.inference_mode(False), torch.no_grad(), autocast_as(()):
            self._step(inputs, loss)
        return loss

    def _step(self, inputs, loss) -> None:
        batches = self._batches(inputs)
        check_single_controller(self, self._slope_model)
        self._link_groups()  # a group added to an inner optimizer since the last step
        model_params = self._params()
        context = StepContext(_as_float(self.param_groups[0].get("lr", math.nan)), _as_float(loss))
        batches, empty = self._degenerate(model_params, batches)
        if empty is not None:
            self.step_count += 1
            self._skip(empty, context)  # before the inner step: nothing has moved
            return
        # FSDP2: the arithmetic runs on each rank's local shard; the few global
        # scalars are summed over the shard group (no-op for unsharded parameters)
        shards = shard_group(model_params)
        params = local_shards(model_params)
        check_dense(model_params)
        self.reader.resolve()  # the class axis, before anything moves
        if self._method == "auto":
            self._resolve_method(model_params, batches)
        elif not self._capable:
            self._try_measurement(model_params, batches)
        if self._method == "fast":
            check_fast_dtype(model_params)  # e.g. the model was cast to bfloat16 later
        self.step_count += 1  # a step that raised above was not taken
        grads = local_shards([p.grad for p in model_params if p.grad is not None])
        # host sync 1 of 3: a non-finite gradient must stop us before inner.step().
        if not agree(all_finite(grads), shards):
            self._fault("gradient", context)
            return
        rerun = self.scaled_update == "rerun" and self.mode != "monitor"
        snapshot = OptimizerSnapshot(self.optimizer, params) if rerun else None
        # The one extra parameter copy. After the swap the parameters hold the old
        # values and the proposal's spare the inner optimizer's result, bitwise (s = 1
        # copies it back), and the update p = new - params is never stored.
        self._proposal.begin(params, shards)
        for inner in self.optimizers:
            inner.step()
        tau = self._proposal.swap()  # host sync 2 of 3
        if not math.isfinite(tau):
            self._fault("update", context)  # parameters hold the old values
            return
        if tau == 0.0:
            self._proposal.apply(1.0)
            self._record(self._stats(0.0, math.inf, 1.0, context, spread=0.0))
            return
        try:
            self._controlled(tau, batches, snapshot, context)
        except BaseException:
            if self._proposal.at != 1.0:
                self._proposal.apply(0.0)  # never leave old + f p
            raise

    def _controlled(self, tau, batches, snapshot, context) -> None:
        """Measure the radius along the proposal and apply old + s p."""
        params = self._proposal.params
        start = time.perf_counter()
        found = self._measure(tau, batches)
        context = dataclasses.replace(context, seconds=time.perf_counter() - start)
        if not found.finite:
            self._proposal.apply(0.0)  # back to the old values
            self._fault("slope", context, tau=tau)
            return
        if not found.counted:
            self._all_masked(tau, context)
            if self.mode != "monitor":
                return
        rho = min([found.rho_a, *self._recent_rhos])
        if self.sampling.window > 1:
            self._recent_rhos.append(found.rho_a)
        context = dataclasses.replace(context, seconds=time.perf_counter() - start)
        limit = self._radius_with_margin(rho, tau, params, batches)
        scale = step_scale(tau, limit, self.mode, self.target_r)
        if self.mode == "clip":  # in set mode a small scale is the learning rate's
            self._watch.scale(scale, tau / rho if rho > 0 else math.inf, rho, tau)
        if snapshot is not None and scale != 1.0:
            scale = self._rerun(params, snapshot, scale, self.target_r * limit, tau)
        else:
            self._proposal.apply(scale)
        self._record(self._stats(tau, rho, scale, context, measured=found))

    def _measure(self, tau: float, batches: list[Captured]) -> MeterReading:
        """The measurement over the micro-batches (see ``_meter``); updates the
        bottleneck buffer. "fast" leaves the parameters at old + f p (``proposal.at``)."""
        plans = [self._plan(entry) for entry in batches]
        # "fast" near the bound (r = tau spread / pi T >= half the target; set mode:
        # always) also takes the difference on the other side (SpreadMeter._other_side)
        share = {"clip": 0.5, "set": 0.0}.get(self.mode)
        bound = self.target_r * math.pi * self.temperature / tau  # the spread at r = target
        recheck = None if share is None else share * bound
        with self._capture.measuring(), self._meter.precision():
            try:
                found = self._meter.measure(plans, self._proposal, recheck)
            except Unresolved as err:
                found = self._measure_exactly(err, plans, recheck)
        if found.pending is not None and self.sampling.buffer_size > 0:
            rows = bottleneck_rows(*found.pending, self.sampling.buffer_size)
            self._buffer = rows if rows is not None else self._buffer
        return found

    def _check_function(self, batches: list[Captured]) -> None:
        """Inputs or buffers the training forwards read that changed in place since
        (``_function.changes``): warn once; "fast" then takes its own baseline forward
        instead of the stale training logits, and no fingerprint is checked."""
        for entry in batches:
            if entry.recorded is None:
                continue  # step(inputs=...)
            causes = changes(self._slope_model, entry.recorded, entry.args, entry.kwargs)
            if causes:
                entry.logits = entry.fingerprint = None
                self._watch.changed(causes, self._method)

    def _half(self, params) -> bool:
        """Whether the forward computes with 16-bit tensors: the trainable parameters,
        any other parameter or floating buffer of the model (a frozen bfloat16 base
        under float32 adapters), or FSDP2's ``param_dtype``."""
        tensors = (*params, *self._slope_model.parameters(), *self._slope_model.buffers())
        return any(t.dtype in _HALF for t in tensors) or half_compute(self._slope_model)

    def _measure_exactly(self, err: Unresolved, plans, recheck) -> MeterReading:
        """``"fast"`` cannot resolve these logits: measure with ``"jvp"`` (``"fd"`` where
        an op has no forward-mode AD), the method from this step on."""
        self.method = "jvp"
        try:
            found = self._meter.measure(plans, self._proposal, recheck)
        except NotImplementedError:
            self.method = "fd"
            found = self._meter.measure(plans, self._proposal, recheck)
        warnings.warn(
            f'RadiusController(method="fast"): {err}; using method="{self.method}" from '
            "this step on",
            RuntimeWarning,
            stacklevel=6,
        )
        return found

    def _precision(self, params, batches) -> str:
        """The precision the measurement ran in, for the margin: ``"half"`` (16-bit
        tensors in the forward, :meth:`_half`), ``"autocast"`` (the JVP under the
        training forward's autocast, also one applied inside the model's forward) or
        ``"full"``."""
        if self._half(params):
            return "half"
        if self._method == "jvp" and any(entry.autocast for entry in batches):
            return "autocast"
        return "full"

    def _radius_with_margin(self, rho: float, tau: float, params, batches) -> float:
        """The radius the step rule uses: a margin below the measured radius for the
        method's error in the precision it ran in (clip and set). When clip binds (s < 1
        is computed, not copied) float32 / float64 parameters also get one ulp of each
        parameter, eps ||old|| in length, for the rounding of old + s p (16-bit
        parameters: in the relative margin). The parameters are at old + f p now, so
        ||old|| <= ||params|| + f tau."""
        if self.mode == "monitor":
            return rho
        precision = self._precision(params, batches)
        margin = self.margin_for(precision)
        limit = clip_radius(rho, margin)
        binds = step_scale(tau, limit, self.mode, self.target_r) < 1.0
        if self.mode == "clip" and binds and precision != "half":
            old_norm = self._proposal.norm() + self._proposal.at * tau
            limit = clip_radius(rho, margin, 2.0 * torch.finfo(params[0].dtype).eps * old_norm)
        return limit

    def _all_masked(self, tau, context) -> None:
        """Every position masked: no radius bounds this update. Policy: clip / set skip
        it (the parameters keep their values), monitor applies it. (An all-masked batch
        is skipped before the inner step; this covers what only the measurement sees.)"""
        applied = self.mode == "monitor"
        warnings.warn(
            "RadiusController: every position of the batch is masked (mask_fn / "
            "ignore_index), so no radius bounds this update; "
            + ("it was applied (monitor mode)" if applied
               else "it was skipped and the parameters left unchanged"),
            RuntimeWarning,
            stacklevel=5,
        )  # fmt: skip
        if not applied:
            self._proposal.apply(0.0)
            self.skipped_steps += 1
            self._record(self._stats(tau, math.inf, 0.0, context, spread=0.0, skipped=True))

    def _degenerate(self, params, batches: list[Captured]):
        """``(batches with rows, why the step must be skipped or None)``, decided before
        the inner step (and alike on every rank): no parameter has a gradient, every
        batch is empty, or every position is masked."""
        if not any(p.grad is not None for p in params):
            return batches, "no trainable parameter has a gradient"
        batches = [entry for entry in batches if batch_rows(entry.inputs) != 0]
        counted = float(bool(batches))
        if batches and self.sampling.masks:
            masks = [self.sampling.position_mask(entry.inputs) for entry in batches]
            counted = float(sum(int(m.sum()) for m in masks))
        counted, _ = max_over_ranks(counted, True, self._meter.process_group)
        if counted > 0 or (batches and self.mode == "monitor"):
            return batches, None  # monitor mode applies an all-masked update (warned later)
        if not batches and not self.sampling.masks:
            return batches, "the batch is empty (0 rows)"
        return batches, "the batch is empty or every position is masked (mask_fn / ignore_index)"

    def _skip(self, why: str, context: StepContext) -> None:
        """Skip a step before the inner optimizer ran: parameters and its state untouched."""
        warnings.warn(
            f"RadiusController: {why} at step {self.step_count}; the step was skipped, the "
            "parameters and the optimizer state left unchanged",
            RuntimeWarning,
            stacklevel=4,
        )
        self.skipped_steps += 1
        self._record(self._stats(math.nan, math.nan, 0.0, context, spread=math.nan, skipped=True))

    def _batches(self, inputs) -> list[Captured]:
        """The micro-batches to measure, their rows checked for the row operations
        (before the inner step: a refusal leaves the optimizer untouched)."""
        if inputs is not None:
            split_inputs(inputs)  # inputs it cannot call with raise before the inner step
            self._capture.entries = []  # the explicit batch replaces the captured ones
            batches = [Captured.explicit(inputs)]
        else:
            batches = self._capture.take()
        if not batches:
            raise RuntimeError(
                "RadiusController.step() has no batch to measure the radius on: run a "
                "training-mode forward of the model (with gradients enabled) before "
                "step(), or pass step(inputs=batch)"
            )
        for entry in batches:
            self.sampling.check_rows(entry.inputs)
            if self._meter.chunk_size is not None:
                check_row_slicing(entry.inputs, "chunk_size")
        self._check_function(batches)  # before any forward of the controller's own
        return batches

    def _plan(self, entry: Captured) -> Plan:
        plan, self._buffer = make_plan(entry, self.sampling, self._generator, self._buffer)
        return plan

    def _try_measurement(self, params, batches) -> None:
        """Run the slopes once along the gradient on the first batch (first step only)."""
        entry = batches[0]  # all rows, no subset draw: the generator is left alone
        plan = Plan(entry.inputs, split_inputs(entry.inputs), entry.rng, None, entry.autocast)
        with self._capture.measuring(), self._meter.precision():
            self._meter.try_gradient(params, plan)
        self._capable = True

    def _resolve_method(self, params, batches) -> None:
        """``method="auto"``, at the first step: the cheapest method that is exact enough
        here (see the table in ``docs/api/controller.md``), fixed for the run.

        * "jvp" for bfloat16 / float16 parameters or buffers (trainable or not), a
          training forward under autocast (around the call or inside the model's
          forward: Accelerate, the HF Trainer) or TF32 on CUDA: there a secant is off
          by 10 % or more and a JVP by < 1 %;
        * "fast" otherwise (float32 / float64, one extra forward);
        * "fast" with a warning when "jvp" meets an op without forward-mode AD (16-bit
          parameters: the error is raised, no method is both possible and accurate).
        """
        half = self._half(params)
        coarse = any(entry.autocast for entry in batches) or (
            bool(self._capture.devices) and tf32_allowed()
        )
        if not (half or coarse):
            self.method = "fast"
            return
        self.method = "jvp"
        try:
            self._try_measurement(params, batches)
        except NotImplementedError as err:  # an op (or autograd.Function) without forward AD
            if half:
                raise
            warnings.warn(
                f'RadiusController(method="auto"): {err} -- using method="fast" for this '
                "run (measured in float32, autocast off)",
                RuntimeWarning,
                stacklevel=5,
            )
            self.method = "fast"

    def _rerun(self, params, snapshot: OptimizerSnapshot, scale, limit, tau) -> float:
        """Scaled update for optimizers with an iterate of their own (``"rerun"``): the
        inner step again, from the restored state, with every learning rate times s.
        In clip mode the result is pulled back to length ``limit`` if it overshoots
        (its direction is not exactly p). Returns the realised s' = ||step|| / tau."""
        length = rerun_scaled(snapshot, self.optimizer, params, scale)
        self._proposal.at = 1.0  # the parameters hold the rerun's result: settled
        self._link_groups()
        if self.mode == "clip" and length > limit:
            torch._foreach_lerp_(params, snapshot.params, 1.0 - limit / length)
            length = limit
        return length / tau

    def _fault(self, what: str, context: StepContext, *, tau: float = math.nan) -> None:
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
        self._record(self._stats(tau, math.nan, 0.0, context, spread=math.nan, skipped=True))

    def _stats(self, tau, rho, scale, context, *, measured=None, spread=None, skipped=False):
        r_before = tau / rho if rho > 0 else math.inf  # tau / inf = 0; nan propagates
        return StepStats(
            step=self.step_count,
            tau=tau,
            rho_a=rho,
            r_before=r_before,
            r_after=0.0 if skipped else scale * r_before,
            scale=scale,
            bottleneck=-1 if measured is None else measured.bottleneck,
            radius_seconds=context.seconds,
            skipped=skipped,
            lr=context.lr,
            loss=context.loss,
            spread=measured.spread if measured is not None else spread,
            rho_samples=None if measured is None else measured.rho_samples,
            radii=None if measured is None else measured.radii,
        )

    def _record(self, stats: StepStats) -> None:
        self.last = stats
        self.history.append(stats)
        for sink in self.sinks:
            sink.write(stats)

    # ------------------------------------------------------------------ internals

    def _params(self) -> list[torch.Tensor]:
        """Every parameter the inner optimizers can move, ``requires_grad`` or not (a
        parameter frozen with ``requires_grad_(False)`` keeps its place in their groups,
        and momentum or weight decay keep moving it): all of them are measured and
        scaled."""
        return [p for inner in self.optimizers for g in inner.param_groups for p in g["params"]]

    def _link_groups(self) -> None:
        """``param_groups``: the inner optimizers' group dicts themselves, in order (one
        optimizer: its very list), so that a scheduler on the controller or on an inner
        optimizer edits the same ``lr``."""
        if len(self.optimizers) == 1:
            self.param_groups = self.optimizers[0].param_groups
        else:
            self.param_groups = [g for inner in self.optimizers for g in inner.param_groups]

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


_PARALLEL = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def _compiled(model: nn.Module) -> bool:
    """A ``torch.compile`` module (``OptimizedModule``; its ``_orig_mod`` is the model)."""
    return type(model).__name__ == "OptimizedModule" and isinstance(
        getattr(model, "_orig_mod", None), nn.Module
    )


def _unwrap(model: nn.Module) -> nn.Module:
    """The module the measurement evaluates: DDP / DataParallel and ``torch.compile``
    wrappers removed (a compiled module shares its parameters with ``_orig_mod``;
    forward-mode AD does not run through the compiled graph)."""
    while isinstance(model, _PARALLEL) or _compiled(model):
        model = model.module if isinstance(model, _PARALLEL) else model._orig_mod
    return model


def _hooked(model: nn.Module) -> nn.Module:
    """The module whose forward hooks see the training calls: the DDP-unwrapped model,
    a compiled one included (its hooks run eagerly, outside the compiled graph)."""
    return model.module if isinstance(model, _PARALLEL) else model


def _reader(model: nn.Module, logits_fn, class_dim, activation) -> LogitsReader:
    """How the loss reads the outputs: the arguments, else what a Hugging Face model's
    config says (:func:`~ghoststep.evaluation._outputs.detect_layout`), else softmax
    with the class axis of 3+-dim outputs read from the first step's gradient."""
    if isinstance(logits_fn, LogitsReader):
        return logits_fn
    detected_dim, detected_activation = detect_layout(model)
    if class_dim is None and activation is None:
        class_dim, activation = detected_dim, detected_activation
    return LogitsReader(logits_fn, class_dim=class_dim, activation=activation or "softmax")


def _scaled_update(scaled_update: str, optimizers) -> str:
    """``scaled_update`` resolved (``"auto"``: ``"rerun"`` for optimizers with an iterate
    of their own); ``"rerun"`` restores and re-steps one optimizer, so it takes one."""
    if scaled_update == "auto":
        own = any(holds_iterate(inner) for inner in optimizers)
        scaled_update = "rerun" if own else "interpolate"
    if scaled_update == "rerun" and len(optimizers) != 1:
        raise ValueError(
            'scaled_update="rerun" (needed by schedule-free and Lookahead optimizers) '
            "re-steps one inner optimizer with scaled learning rates; it is not supported "
            "with several (RadiusController([opt_a, opt_b], model)): wrap such an optimizer "
            "alone"
        )
    return scaled_update


def _check_method(method) -> None:
    if method != "auto" and method not in SLOPE_METHODS:
        raise ValueError(f"method must be 'auto' or one of {SLOPE_METHODS}, got {method!r}")


def _shifted_label_mask(model: nn.Module, ignore_index: int, targets_fn):
    """The ``mask_fn`` of a Hugging Face causal LM's loss (its logits at t are scored
    against ``labels[t + 1]``, the labels from ``targets_fn`` when given), or None for
    other models (``targets_fn``'s targets then align with the logits)."""
    if "transformers" not in sys.modules:
        return None  # no Hugging Face model can exist
    from ..integrations.transformers import is_causal_lm, label_mask_fn

    if not is_causal_lm(model):
        return None
    return label_mask_fn(shift=True, ignore_index=ignore_index, targets_fn=targets_fn)
