"""RadiusController: keep any optimizer's update inside the softmax convergence radius.

Algorithm (one ``step``; paper Prop. 5.2 and section 5)::

    grads finite?            else skip (inner optimizer untouched)      # host sync 1
    spare <- copy(theta)                      # one extra parameter copy (kept)
    inner.step()                              # momentum, Adam, weight decay ... as usual
    theta <-> spare                           # theta = old, spare = new (bitwise)
    tau  <- ||new - old||,  v = p / tau,  p = new - old                 # host sync 2
    a    <- J_z(old; x) v                     # "jvp": one forward-mode pass, exact
         |  (z(old + h v) - z_train) / h      # "fast": one forward, against the
                                              # training forward's own logits
    rho  <- pi T / max_x (max_k a_k - min_k a_k)                        # host sync 3
    s    <- min(1, r* rho / tau)  ("clip")  |  r* rho / tau  ("set")  |  1  ("monitor")
    theta <- new (s = 1, bitwise)  |  old + s p

``step`` is that algorithm, in order: the capture and the inner step (``_propose``),
the spreads along the proposal (``_secant`` for ``"fast"``, ``_tangent`` for ``"jvp"`` /
``"fd"``: plain functions of ``ghoststep.evaluation``, ``secant_spreads`` and
``tangent_spreads``, evaluated where the controller has put the parameters), reduced to
one radius by ``ghoststep.radius``'s ``reduce_spreads`` as ``measure()`` is, and the
step rule with its margin, the application and the record (``_apply``). The parameters
move only through the :class:`Proposal` at the end of this module (the spare copy, the
swap, tau, the evaluation points ``old + f p``, ``old + s p``): nothing else writes them.

Around it: ``_capture`` (the forward hooks that remember the training batch), ``_plan``
(the sampling options and the immutable ``Plan`` of one micro-batch; the method of
``"auto"``, the precision, the margins), ``_options`` (the grouped arguments),
``_checks`` (the arguments checked and resolved at construction), ``ghoststep.radius``
(the pure step rule), ``ghoststep.evaluation._sharding`` (FSDP2 shards, rank
reductions) and ``_state`` (what ``state_dict`` holds).

Reference: P. Sao, "Ghosts of Softmax: Complex Singularities That Limit Safe Step Sizes
in Cross-Entropy", arXiv:2603.13552 (2026), section 5.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ..evaluation._directional import (
    RESOLUTION,
    Unresolved,
    away_from_one,
    baseline_gap,
    check_fast_dtype,
    fast_step,
    forward,
    full_float32,
    refined_step,
    secant_spreads,
    tangent_spreads,
)
from ..evaluation._directions import global_norm
from ..evaluation._outputs import LogitsReader
from ..evaluation._replay import (
    HALF,
    autocast_as,
    batch_rows,
    check_row_slicing,
    chunks,
    cuda_devices,
    original_forward,
    split_inputs,
)
from ..evaluation._sharding import (
    agree,
    is_sharded,
    local_shards,
    max_over_ranks,
    reshard,
    shard_group,
    sum_over_shards,
)
from ..evaluation._updates import OptimizerSnapshot
from ..monitor import Sink, StepStats
from ..radius._bounds import clip_radius, radius_from_spread, reduce_spreads, step_scale
from ._capture import Captured, ForwardCapture, Watch, changes, check_single_controller, flags_as
from ._checks import (
    check_controller_arguments,
    check_limit_by,
    check_method,
    check_options,
    check_supported,
    hooked_module,
    logits_reader_for,
    resolve_scaled_update,
    shifted_label_mask,
    slope_module,
)
from ._options import Measuring, Recording, grouped
from ._plan import (
    Plan,
    Reference,
    Sampling,
    auto_choice,
    auto_method,
    bottleneck_rows,
    check_sharding,
    half_precision,
    make_plan,
    measure_now,
    precision,
    reference_after,
)
from ._plan import margin_for as default_margin
from ._state import (
    GROUP_KEY,
    ControllerState,
    merge_inner_states,
    pack_state,
    split_controller_state,
    split_inner_state,
)

__all__ = ["RadiusController"]


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
        margin: relative margin below the measured radius in clip and set mode
            (default by method and precision, e.g. 1e-5 ``"jvp"`` in float32, 1e-2
            under bf16 autocast, 2e-2 ``"fast"``: :meth:`margin_for`).
        sampling: which training forwards, rows and positions set the radius, a
            :class:`~ghoststep.controller.Sampling` (subset, buffer_size, window,
            quantile, mask_fn, ignore_index, targets_fn, seed, micro_batches).
            Default: every position of every training forward since the last step.
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
            Or a ``ghoststep.evaluation.LogitsReader(fn, class_dim=..., activation=...)``
            that also says how the loss reads them; ``class_dim=`` and ``activation=``
            as keywords of their own read with the default detection below:
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
        measuring: how the spreads are evaluated, a
            :class:`~ghoststep.controller.Measuring` (chunk_size, slopes_kwargs,
            process_group).
        recording: what is kept and written per step, a
            :class:`~ghoststep.controller.Recording` (sinks, history_size,
            keep_samples).
        on_nonfinite: ``"skip"`` or ``"raise"``.
        extra_radii: optional hook ``extra_radii(model, inputs, update) -> {name: t}``
            for radii other than the output logits' (e.g. attention logits, ReLU kinks).
            ``update`` is the list of tentative update tensors p, aligned with the
            trainable parameters; each returned ``t`` is a radius in units of that
            update (the step theta + t p has t = 1 at the full update), computed at the
            current parameters. The controller converts them to distances along
            v = p / ||p|| and records them, with ``"out"`` (rho_a), in
            ``StepStats.radii``. Non-finite (NaN) values skip the step like a bad slope.
        limit_by: names of the radii whose minimum limits the step (default: ``"out"``
            and every name ``extra_radii`` returns), recorded as ``StepStats.radius``
            (``StepStats.rho_a`` stays the output radius). E.g. ``("out",)`` records
            the extra radii without letting them bind.
        scaled_update: how s < 1 is applied: ``"interpolate"`` (old + s p),
            ``"rerun"`` (restore the inner optimizer's state and parameters, step again
            with the learning rates times s; for optimizers keeping their own iterate)
            or ``"auto"`` (``"rerun"`` for schedule-free and Lookahead optimizers).
        **options: each grouped option also as a keyword of its own: ``subset=8`` is
            ``sampling=Sampling(subset=8)``, ``chunk_size=`` goes to ``measuring``,
            ``sinks=`` to ``recording``, ``class_dim=`` / ``activation=`` with
            ``logits_fn`` (``ghoststep.controller._options``).

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
        method: str = "auto",
        margin: float | None = None,
        sampling: Sampling | None = None,
        logits_fn: Callable[[Any], Any] | LogitsReader | None = None,
        measuring: Measuring | None = None,
        recording: Recording | None = None,
        extra_radii: Callable[[nn.Module, Any, list], Mapping[str, float]] | None = None,
        limit_by: Sequence[str] | None = None,
        on_nonfinite: str = "skip",
        scaled_update: str = "auto",
        **options: Any,
    ) -> None:
        sampling, reading, measuring, recording = grouped(
            options, sampling=sampling, measuring=measuring, recording=recording
        )
        optimizers = check_controller_arguments(optimizer, model, mode, target_r, temperature)
        check_method(method)
        check_options(on_nonfinite, margin, scaled_update)
        for inner in optimizers:
            check_supported(inner)
        scaled_update = resolve_scaled_update(scaled_update, optimizers)
        limit_by = check_limit_by(limit_by, extra_radii)
        slope_model = slope_module(model)
        if sampling.ignore_index is not None and sampling.mask_fn is None:
            # a causal LM scores logits at t against labels[t + 1]: shift the mask alike
            mask_fn = shifted_label_mask(slope_model, sampling.ignore_index, sampling.targets_fn)
            if mask_fn is not None:
                sampling = dataclasses.replace(
                    sampling, mask_fn=mask_fn, ignore_index=None, targets_fn=None
                )
        self.sampling = sampling

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
        self.limit_by = limit_by
        # what reads the extra radii inside the "jvp" pass itself (a subclass sets it;
        # the hook then runs only for the other methods)
        self._in_pass: Any = None
        # how the spreads are evaluated (``Measuring``)
        self.chunk_size = measuring.chunk_size
        self.slopes_kwargs = dict(measuring.slopes_kwargs or {})
        self.process_group = measuring.process_group
        if measuring.every > 1 and mode == "set":
            raise ValueError(
                "every > 1 (always-on) needs mode 'clip' or 'monitor': set mode sets each "
                "step's length from that step's radius"
            )
        self.every = measuring.every
        self.stale_margin = measuring.stale_margin
        self.jump = measuring.jump
        # what is kept and written (``Recording``)
        self.sinks: list[Sink] = list(recording.sinks)
        self.keep_samples = bool(recording.keep_samples)
        self.history: collections.deque[StepStats] = collections.deque(
            maxlen=recording.history_size
        )
        self.last: StepStats | None = None

        self.step_count = 0
        self.skipped_steps = 0
        self._warned = False
        self._recent_rhos: collections.deque[float] = collections.deque(maxlen=sampling.window - 1)
        self._buffer: Any = None  # inputs of the bottleneck rows, or None
        self._generator = torch.Generator()
        self._generator.manual_seed(int(sampling.seed))
        self._proposal = Proposal()
        self._reader = logits_reader_for(slope_model, logits_fn, *reading)
        self._spread_hint: float | None = None  # "fast": the last max spread per unit v
        self._reference: Reference | None = None  # always-on: the last measured step
        self._own_baseline = False  # "fast": the training logits did not match a replay
        self._watch = Watch()  # warnings about the measured function, each once
        self._devices: list[int] = []
        self._capture = ForwardCapture(
            slope_model,
            micro_batches=sampling.micro_batches,
            logits_fn=self._reader,
            keep_logits=method in ("fast", "auto"),
            rows_check=sampling.samples_rows,
            devices=[],
            hooked=hooked_module(model),
        )
        self._capable = method == "fast"  # "jvp" / "fd" are tried before the first step
        self._check_params_in_model()
        check_sharding(self.model, self._params(), method, extra_radii, self.scaled_update)
        if method == "fast":
            check_fast_dtype(self._params())
        self._set_devices()

    @property
    def method(self) -> str:
        """How the slopes are evaluated: ``"jvp"`` | ``"fd"`` | ``"fast"``, or ``"auto"``
        until the first step resolves it (then fixed for the run, and checkpointed);
        settable."""
        return self._method

    @method.setter
    def method(self, value: str) -> None:
        check_method(value)
        if value == "fast":
            check_fast_dtype(self._params())
        self._method = value
        self._capture.keep_logits = value in ("fast", "auto")

    @property
    def reader(self) -> LogitsReader:
        """How the controller reads the logits (``logits_fn``, ``class_dim`` -- resolved
        at the first step when detected --, ``activation``); ``measure(...,
        logits_fn=ctrl.reader)`` measures what the controller bounds."""
        return self._reader

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
        return default_margin(self._method, precision, self._margin)

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
        """Zero the inner optimizers' gradients; a window boundary for the captured
        forwards: those a backward already ran through, whose step never came (a
        ``GradScaler`` skip), are dropped (see ``docs/api/controller.md``)."""
        for inner in self.optimizers:
            inner.zero_grad(set_to_none=set_to_none)
        self._capture.new_window()

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """A torch optimizer state dict with the controller's state beside it:
        ``{"state", "param_groups", "ghoststep"}`` (what ``torch.distributed.checkpoint``
        and other tools that read an optimizer's state expect).

        ``"state"`` and ``"param_groups"``: the inner optimizer's own (several inner
        optimizers: merged in order, parameter ids counted on across them, as
        ``param_groups`` concatenates their groups; extra top-level keys of theirs under
        ``"inner_extras"``). ``"ghoststep"``: :class:`ControllerState` (counters, recent
        radii, bottleneck buffer, subset generator, method). The first group also
        carries it, packed (bytes, under ``"ghoststep"``): DCP's ``get_state_dict`` keeps
        only ``"state"`` and ``"param_groups"``, and it must survive a DCP checkpoint."""
        self._link_groups()
        ours = ControllerState(
            step_count=self.step_count,
            skipped_steps=self.skipped_steps,
            recent_rhos=list(self._recent_rhos),
            buffer=self._buffer,
            generator=self._generator.get_state(),
            warned=self._warned,
            spread_hint=self._spread_hint,
            method=self._method,
            reference=None if self._reference is None else dataclasses.astuple(self._reference),
        ).to_dict()
        out = merge_inner_states([o.state_dict() for o in self.optimizers])
        out["param_groups"] = [dict(g) for g in out["param_groups"]]
        if out["param_groups"]:
            out["param_groups"][0][GROUP_KEY] = pack_state(ours)
        out["ghoststep"] = ours
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Load a dict from :meth:`state_dict`, the earlier form ``{"inner": ...,
        "ghoststep": ...}``, one that went through DCP (the controller's state in the
        first group only), or a bare inner optimizer state dict (the controller's own
        state then stays as it is)."""
        if "inner" in state_dict:  # the form before the torch layout
            self._load_inner(state_dict["inner"])
            ours = state_dict.get("ghoststep", {})
        else:
            inner, ours = split_controller_state(state_dict)
            several = len(self.optimizers) != 1
            self._load_inner(split_inner_state(inner, self.optimizers) if several else inner)
            if ours is None:
                return  # a plain optimizer checkpoint
        self._load_ours(ours)

    def _load_ours(self, saved: Mapping[str, Any]) -> None:
        ours = ControllerState.from_dict(saved)
        self.step_count, self.skipped_steps = ours.step_count, ours.skipped_steps
        self._recent_rhos = collections.deque(ours.recent_rhos, maxlen=self._recent_rhos.maxlen)
        self._buffer = ours.buffer
        if ours.generator is not None:
            self._generator.set_state(ours.generator)
        self._warned = ours.warned
        self._spread_hint = ours.spread_hint
        self._reference = None if ours.reference is None else Reference(*ours.reference)
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
        state.setdefault("_in_pass", None)  # saved before the in-pass radii: the hook
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
            if inputs is None and self._initialising():
                for inner in self.optimizers:
                    inner.step()  # their own state initialisation, nothing to measure
                return loss
            # capture (the training forwards since the last step), then the inner step:
            # the parameters hold old, the proposal's spare new = old + p, tau = ||p||
            proposed = self._propose(inputs, loss)
            if proposed is None:
                return loss  # skipped, or p = 0 (recorded)
            batches, tau, snapshot, context = proposed
            try:
                if not self._due(tau):
                    # always-on, between measurements: the last radius, with room
                    self._apply(None, tau, batches, snapshot, context)
                    return loss
                # the spreads along v = p / tau, reduced to the radius
                start = time.perf_counter()
                plans = []
                for entry in batches:  # subset and bottleneck buffer applied
                    plan, self._buffer = make_plan(
                        entry, self.sampling, self._generator, self._buffer
                    )
                    plans.append(plan)
                with self._capture.measuring(), self._measuring_precision():
                    try:
                        if self._method == "fast":
                            found = self._secant(plans, tau)
                        else:
                            found = self._tangent(plans, tau)
                    except Unresolved as err:
                        found = self._tangent_instead(err, plans, tau)
                context = dataclasses.replace(context, seconds=time.perf_counter() - start)
                # the step rule, then old + s p applied and the step recorded
                self._apply(found, tau, batches, snapshot, context)
            except BaseException:
                if self._proposal.at != 1.0:
                    self._proposal.apply(0.0)  # never leave old + f p
                raise
        return loss

    def _propose(self, inputs, loss):
        """The captured batches and the inner optimizers' proposal: ``(batches, tau,
        snapshot, context)``, the parameters at old and the proposal's spare at new; or
        None when the step ends here (skipped before or after the inner step, or p = 0),
        recorded."""
        batches = self._batches(inputs)
        check_single_controller(self, self._slope_model)
        self._link_groups()  # a group added to an inner optimizer since the last step
        model_params = self._params()
        context = StepContext(_as_float(self.param_groups[0].get("lr", math.nan)), _as_float(loss))
        empty = self._degenerate(model_params, batches)
        if empty is not None:
            self.step_count += 1
            self._skip(empty, context)  # before the inner step: nothing has moved
            return None
        # FSDP2: the arithmetic runs on each rank's local shard; the few global
        # scalars are summed over the shard group (no-op for unsharded parameters)
        shards = shard_group(model_params)
        params = local_shards(model_params)
        check_dense(model_params)
        self.reader.resolve()  # the class axis, before anything moves
        self._settle_method(model_params, batches)
        self.step_count += 1  # a step that raised above was not taken
        grads = local_shards([p.grad for p in model_params if p.grad is not None])
        # host sync 1 of 3: a non-finite gradient must stop us before inner.step().
        if not agree(all_finite(grads), shards):
            self._fault("gradient", context)
            return None
        rerun = self.scaled_update == "rerun" and self.mode != "monitor"
        snapshot = OptimizerSnapshot(self.optimizer, params) if rerun else None
        # The extra parameter copy. After the swap the parameters hold the old values
        # and the proposal's spare the inner optimizer's result, bitwise (s = 1 copies
        # it back), and the update p = new - params is never stored.
        self._proposal.begin(params, shards)
        for inner in self.optimizers:
            inner.step()
        tau = self._proposal.swap()  # host sync 2 of 3
        if not math.isfinite(tau):
            self._fault("update", context)  # parameters hold the old values
            return None
        if tau == 0.0:
            self._proposal.apply(1.0)
            self._record(self._stats(0.0, math.inf, 1.0, context, spread=0.0))
            return None
        return batches, tau, snapshot, context

    def _due(self, tau: float) -> bool:
        """Whether this step is measured (:func:`measure_now`; every step unless
        always-on), decided alike on every rank."""
        if self.every == 1:
            return True
        room = self.target_r * (1.0 - self.stale_margin)
        due = measure_now(self._reference, tau, self.every, self.jump, room)
        return bool(max_over_ranks(float(due), True, self.process_group)[0])

    def _apply(self, found: Reading | None, tau: float, batches, snapshot, context) -> None:
        """The step rule on the measured radius, then ``old + s p`` and the record;
        ``found`` None: always-on between measurements, where the update fits the last
        measured radius with room (:meth:`_due`) and is applied as proposed."""
        proposal = self._proposal
        if found is None:
            reference = self._reference
            self._reference = dataclasses.replace(reference, since=reference.since + 1)
            proposal.apply(1.0)
            self._record(self._stats(tau, reference.radius, 1.0, context))
            return
        if not found.finite:
            proposal.apply(0.0)  # back to the old values
            self._fault("slope", context, tau=tau)
            return
        if not found.counted:
            self._all_masked(tau, context)
            if self.mode != "monitor":
                return
        radius = min([found.radius, *self._recent_rhos])
        if self.sampling.window > 1:
            self._recent_rhos.append(found.radius)
        if self.every > 1:
            self._reference = reference_after(self._reference, radius, tau)
        # A margin below the measured radius for the method's error in the precision it
        # ran in (clip and set). When clip binds (s < 1 is computed, not copied) float32
        # / float64 parameters also get one ulp of each parameter, eps ||old|| in length,
        # for the rounding of old + s p (16-bit parameters: in the relative margin). The
        # parameters are at old + f p now, so ||old|| <= ||params|| + f tau.
        limit = radius
        if self.mode != "monitor":
            kind = precision(self._slope_model, proposal.params, self._method, batches)
            margin = self.margin_for(kind)
            limit = clip_radius(radius, margin)
            if self.mode == "clip" and self.target_r * limit / tau < 1.0 and kind != "half":
                old_norm = proposal.norm() + proposal.at * tau
                eps = torch.finfo(proposal.params[0].dtype).eps
                limit = clip_radius(radius, margin, 2.0 * eps * old_norm)
        scale = step_scale(tau, limit, self.mode, self.target_r)
        if self.mode == "clip":  # in set mode a small scale is the learning rate's
            self._watch.scale(scale, tau / radius if radius > 0 else math.inf, radius, tau)
        if snapshot is not None and scale != 1.0:
            scale = self._rerun(proposal.params, snapshot, scale, self.target_r * limit, tau)
        else:
            proposal.apply(scale)
        self._record(self._stats(tau, radius, scale, context, measured=found))

    # ------------------------------------------------------------ the measurement

    def _measuring_precision(self):
        """``"fast"``: full float32 on CUDA for every measuring forward (a JVP has no
        cancellation: TF32 costs it 1e-3 relative, ``"fast"`` 10 %), and the model's own
        forward where Accelerate wrapped it in autocast (:func:`original_forward`)."""
        stack = contextlib.ExitStack()
        if self._method == "fast":
            if self._devices:
                stack.enter_context(full_float32())
            stack.enter_context(original_forward(self._slope_model))
        return stack

    def _conditions(self, plan: Plan):
        """The conditions a plan's forwards run under, whatever surrounds ``step()``: the
        modules' train / eval flags of the training forward (put back after), and its
        autocast for ``"jvp"`` (the tangent in the precision the model trains in: exact
        to a few 1e-3 in bfloat16), none for the differences ``"fast"`` / ``"fd"`` (in
        bfloat16 a secant at a 0.01-logit move is off by 100 % or more)."""
        stack = contextlib.ExitStack()
        stack.enter_context(flags_as(self._slope_model, plan.flags))
        stack.enter_context(autocast_as(plan.autocast if self._method == "jvp" else ()))
        return stack

    def _tangent(self, plans: list[Plan], tau: float) -> Reading:
        """``"jvp"`` / ``"fd"``: the spreads of the tangent along v = p / tau at the old
        parameters (one transient copy: p; the JVP's primal is the old values)."""
        update = self._proposal.update()
        tangents = self._aligned(self._proposal.params, update)
        in_pass = self._in_pass if self._method == "jvp" else None
        spreads, extra = [], []
        for plan in plans:
            (args, kwargs), output_fn = plan.call, self._reader.assuming(plan.masked)
            if in_pass is not None:  # the extra radii read from this very pass
                kwargs, output_fn = {**kwargs, **in_pass.kwargs}, in_pass.reading(output_fn)
            with self._conditions(plan):
                spread, gap = tangent_spreads(
                    self._slope_model, args, kwargs, tangents, method=self._method,
                    output_fn=output_fn, rng=plan.rng, chunk_size=self._chunk(plan),
                    # "fd" runs in float64, where dropout may draw other masks: "jvp" only
                    fingerprint=plan.fingerprint if self._method == "jvp" else None,
                    coarse=bool(plan.autocast), **self.slopes_kwargs,
                )  # fmt: skip
            if gap:
                self._watch.mismatch(self._method, gap)
            spreads.append(spread / tau)
            if in_pass is not None:
                extra.append(in_pass.radii())
        del tangents
        if in_pass is None:
            radii = self._extra_radii(update, tau, plans)
        else:
            radii = self._smallest_radii(extra, tau)
        del update
        return self._reduce(plans, spreads, radii)

    def _secant(self, plans: list[Plan], tau: float) -> Reading:
        """``"fast"``: the spreads of ``(z(old + f p) - z(old)) / (f tau)`` against the
        training forward's logits ``z(old)``, and near the bound (``_recheck``) of the
        mean with the one from ``old - f p``. The controller moves the parameters
        (``proposal.move_to``); they end at old +/- f p (``proposal.at``)."""
        proposal, recheck = self._proposal, self._recheck(tau)
        while True:  # twice only when the baseline is found stale
            # f = h / tau: h moves the outputs by about FAST_MOVE at the previous step's
            # spread (the first step guesses from ||old||)
            h = fast_step(proposal.norm, 1.0, proposal.params[0].dtype,
                          moved_per_step=self._spread_hint)  # fmt: skip
            fraction = away_from_one(h / tau)
            baselines = [self._baseline(plan) for plan in plans]
            radii = None
            if self.extra_radii is not None and self._in_pass is None:  # at the old values
                radii = self._extra_radii(proposal.update(), tau, plans)
            plus = None if recheck is None else [[] for _ in plans]
            proposal.move_to(fraction)
            spreads = self._shifted(plans, baselines, fraction * tau, plus, at=fraction)
            better = refined_step(fraction * tau, fraction * tau * self._spread_hint)
            if better is not None:  # the outputs moved too far or too little: redo
                fraction = away_from_one(better / tau)
                plus = None if plus is None else [[] for _ in plans]
                proposal.move_to(fraction)
                spreads = self._shifted(plans, baselines, fraction * tau, plus, at=fraction)
            self._check_resolved(baselines, fraction * tau)
            if recheck is None or self._spread_hint < recheck:
                break
            proposal.move_to(-fraction)
            minus = [[] for _ in plans]
            others = self._shifted(plans, baselines, fraction * tau, minus, False, -fraction)
            spreads = [0.5 * (a + b) for a, b in zip(spreads, others, strict=True)]
            # the same decisions on every rank: a rank measuring again alone would run
            # collectives the others do not
            gap = max_over_ranks(baseline_gap(plus, minus), True, self.process_group)[0]
            if gap <= 1.0:
                break
            self._watch.mismatch(self._method, gap)
            trained = float(any(_trained(plan) for plan in plans))
            if self._own_baseline or not max_over_ranks(trained, True, self.process_group)[0]:
                break
            # the training forward's logits are not this function's: measure again
            # against a baseline forward at the old parameters
            self._own_baseline, self._spread_hint = True, None
            proposal.move_to(0.0)
        del baselines
        if self._in_pass is not None:
            radii = self._secant_radii(plans, fraction, tau)
        return self._reduce(plans, spreads, radii)

    def _recheck(self, tau: float) -> float | None:
        """The max spread per unit v from which ``"fast"`` also takes the difference on
        the other side: half the spread at r = target in clip mode, always in set mode,
        never in monitor mode."""
        share = {"clip": 0.5, "set": 0.0}.get(self.mode)
        bound = self.target_r * math.pi * self.temperature / tau  # the spread at r = target
        return None if share is None else share * bound

    def _shifted(self, plans, baselines, step: float, sinks=None, hint=True, at=None):
        """Spreads per unit of v from forwards at the evaluation point old + step v
        (``sinks``: one list per plan collecting the logits' projections); ``hint``:
        the max spread over the ranks becomes the next step's first guess (moving the
        outputs by about FAST_MOVE) and the redo decision, one point on every rank;
        ``at``: that point's fraction f of p, where the in-pass radii keep the
        internals."""
        sinks = sinks or [None] * len(plans)
        spreads = []
        for i, (plan, baseline, sink) in enumerate(zip(plans, baselines, sinks, strict=True)):
            (args, kwargs), output_fn = plan.call, self._reader.assuming(plan.masked)
            if self._in_pass is not None and at is not None:
                kwargs = {**kwargs, **self._in_pass.kwargs}
                output_fn = self._in_pass.recording(output_fn, i, at)
            with self._conditions(plan):
                spreads.append(
                    secant_spreads(
                        self._slope_model,
                        args,
                        kwargs,
                        baseline,
                        step,
                        output_fn=output_fn,
                        rng=plan.rng,
                        devices=self._devices,
                        chunk_size=self._chunk(plan),
                        sink=sink,
                    )  # fmt: skip
                )
        if hint:
            # (a plan of 0 rows, e.g. this rank's empty share of the batch, adds nothing)
            maxima = [s.max() for s in spreads if s.numel()]
            local = float(torch.stack(maxima).max()) if maxima else 0.0
            self._spread_hint = max_over_ranks(local, True, self.process_group)[0]
        return spreads

    def _secant_radii(self, plans, fraction: float, tau: float) -> dict[str, float]:
        """``"fast"``: the in-pass radii from the internals at old +/- f p, the other
        side's forward run here unless the recheck ran it (parameters end at old - f p)."""
        in_pass = self._in_pass
        for i, plan in enumerate(plans):
            if in_pass.recorded(i):
                continue
            self._proposal.move_to(-fraction)
            read = in_pass.recording(self._reader.assuming(plan.masked), i, -fraction)
            args, kwargs = plan.call
            with self._conditions(plan):
                for _, _, a, k in chunks(args, {**kwargs, **in_pass.kwargs}, self._chunk(plan)):
                    forward(self._slope_model, a, k, output_fn=read, rng=plan.rng,
                            devices=self._devices)  # fmt: skip
        extra = [in_pass.secant_radii(i) for i in range(len(plans))]
        return self._smallest_radii(extra, tau)

    def _baseline(self, plan: Plan):
        """Logits at the old values: the training forward's when the plan has them,
        else a forward (after the training forward's ``head`` rows, if any)."""
        if plan.baseline is not None and not self._own_baseline:
            return plan.baseline
        head = None if self._own_baseline else plan.head
        args, kwargs = plan.call if head is None else split_inputs(plan.tail)
        parts = []
        with self._conditions(plan):
            for _, _, a, k in chunks(args, kwargs, self._chunk(plan)):
                parts.append(
                    forward(
                        self._slope_model,
                        a,
                        k,
                        output_fn=self._reader,
                        rng=plan.rng,
                        devices=self._devices,
                    )  # fmt: skip
                )
        if head is not None:  # the subset's rows from the training forward
            parts.insert(0, head)
        if self.chunk_size is None and len(parts) > 1:
            return parts  # head and tail, left apart (see Plan)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _check_resolved(self, baselines, step: float) -> None:
        """Raise :class:`Unresolved` (parameters back at the old values) when the
        logits' move at the evaluation point, ``step * max spread``, is not above
        ``RESOLUTION`` times their rounding unit ``eps * max |z|``: each logit of a
        forward is rounded to eps |z| / 2, so the spread of a difference is off by up
        to 2 eps max |z| / move (an offset of 1e6 on float32 logits reads a spread of
        0 at the usual 0.01 move). The same decision on every rank."""
        tensors = [t for b in baselines for t in (b if isinstance(b, list) else [b])]
        tensors = [t for t in tensors if t.numel()]
        # The rounding unit eps |z|, reduced on every rank, one without logits too (-1):
        # collectives pair by order, so no rank may leave one out, and the unit (not |z|)
        # is reduced so that a rank without logits needs no dtype to decide alike.
        eps = torch.finfo(tensors[0].dtype if tensors else self._proposal.params[0].dtype).eps
        unit = -1.0
        if tensors:
            # one pass per tensor (aminmax), no |z| temporary the size of the logits
            ends = torch.stack([torch.stack(torch.aminmax(t.detach())).float() for t in tensors])
            unit = eps * float(ends.abs().max())
        unit = max_over_ranks(unit, True, self.process_group)[0]
        if unit < 0.0:
            return  # no logits on any rank
        moved = step * self._spread_hint
        if math.isfinite(unit) and math.isfinite(moved):
            if not moved > RESOLUTION * unit:
                self._proposal.move_to(0.0)
                raise Unresolved(moved, unit / eps)

    def _tangent_instead(self, err: Unresolved, plans, tau: float) -> Reading:
        """``"fast"`` cannot resolve these logits: measure with ``"jvp"`` (``"fd"`` where
        an op has no forward-mode AD), the method from this step on."""
        self.method = "jvp"
        try:
            found = self._tangent(plans, tau)
        except NotImplementedError:
            self.method = "fd"
            found = self._tangent(plans, tau)
        warnings.warn(
            f'RadiusController(method="fast"): {err}; using method="{self.method}" from '
            "this step on",
            RuntimeWarning,
            stacklevel=6,
        )
        return found

    def _aligned(self, params, updates, frozen: bool = True) -> list[torch.Tensor | None]:
        """Updates aligned with every parameter of the model (None: not optimized), or
        with ``frozen=False`` with its trainable ones (the ``extra_radii`` hook's
        alignment). Every one: a parameter frozen with ``requires_grad_(False)`` stays
        in the optimizer's groups and can still move (momentum, weight decay), and the
        tangent must carry that move. ``params`` may be the parameters or, for FSDP2,
        their local shards (``local_shards``): a DTensor parameter's update is its
        local shard's."""
        by_id = {id(p): u for p, u in zip(params, updates, strict=True)}
        reshard(self._slope_model)  # FSDP2: the registered parameters are the sharded ones
        model_params = [q for q in self._slope_model.parameters() if frozen or q.requires_grad]
        shards = local_shards(model_params)
        return [
            by_id.get(id(q), by_id.get(id(s))) for q, s in zip(model_params, shards, strict=True)
        ]

    def _extra_radii(self, update, tau: float, plans) -> dict[str, float] | None:
        """The ``extra_radii`` hook's radii (smallest over the micro-batches) as distances
        along v = p / tau, at the old parameter values; None without the hook."""
        if self.extra_radii is None:
            return None
        direction = self._aligned(self._proposal.params, update, frozen=False)
        extra = []
        for plan in plans:
            with self._conditions(plan):
                extra.append(self.extra_radii(self._slope_model, plan.evaluated, direction))
        return self._smallest_radii(extra, tau)

    def _smallest_radii(self, extra: list[Mapping[str, float]], tau: float) -> dict[str, float]:
        """Per-micro-batch radii in units of the update p (``extra``) as distances along
        v = p / tau, each the smallest over the micro-batches."""
        radii: dict[str, float] = {}
        for found in extra:
            for key, t in dict(found).items():
                radius, before = float(t) * tau, radii.get(str(key), math.inf)
                # min() would drop a NaN; keep it so the step is treated as a fault
                radii[str(key)] = math.nan if math.isnan(radius) else min(before, radius)
        missing = [k for k in (self.limit_by or ()) if k not in radii and k != "out"]
        if missing:
            raise KeyError(f"limit_by names {missing}, but the radii are {sorted(radii)}")
        return radii

    def _reduce(self, plans: list[Plan], spreads: list[torch.Tensor], radii) -> Reading:
        """The plans' spreads to one radius (:func:`reduce_spreads`: on the device, one
        host sync, the MAX over ranks), then the radius that limits the step: the
        smallest of the ones ``limit_by`` names, the same on every rank (reduced as the
        equivalent spread pi T / rho, like the output spread)."""
        keeps = [
            self.sampling.mask(plan.evaluated, spread.numel(), spread.device)
            for plan, spread in zip(plans, spreads, strict=True)
        ]
        found = reduce_spreads(
            spreads,
            keeps,
            quantile=self.sampling.quantile,
            temperature=self.temperature,
            combine=functools.partial(max_over_ranks, group=self.process_group),
        )
        # the last plan's (inputs, spread, mask) for the buffer; never a non-finite one,
        # nor one of 0 rows (this rank's empty share)
        sized = [i for i, spread in enumerate(spreads) if spread.numel()]
        if found.finite_here and self.sampling.buffer_size > 0 and sized:
            last = sized[-1]
            rows = bottleneck_rows(plans[last].evaluated, spreads[last], keeps[last],
                                   self.sampling.buffer_size)  # fmt: skip
            self._buffer = rows if rows is not None else self._buffer
        radius, finite = found.rho_a, found.finite
        if finite and radii is not None:
            radii = dict(radii, out=found.rho_a)
            smallest = min(radii[k] for k in (self.limit_by or radii))
            finite = not any(math.isnan(v) for v in radii.values())
            spread = radius_from_spread(smallest, self.temperature) if finite else 0.0
            spread, finite = max_over_ranks(spread, finite, self.process_group)
            radius = radius_from_spread(spread, self.temperature)
        samples = None
        if finite and self.keep_samples:
            valid = [v for v in found.kept if v.numel()]
            if valid:
                samples = radius_from_spread(torch.cat(valid), self.temperature).float().cpu()
        return Reading(
            found.spread, found.rho_a, radius, found.bottleneck, finite, samples, radii,
            found.counted,
        )  # fmt: skip

    # ------------------------------------------------------------ before the inner step

    def _settle_method(self, params, batches: list[Captured]) -> None:
        """The method of this step: ``"auto"`` resolved at the first step
        (:func:`~ghoststep.controller._plan.auto_choice`, fixed for the run), and a
        ``"jvp"`` / ``"fd"`` tried once along the gradient before the first inner step
        (an error, e.g. an op without forward AD, leaves the optimizer untouched; under
        ``"auto"`` ``"jvp"`` falls back to ``"fast"`` with a warning, except with 16-bit
        parameters, where no method is both possible and accurate)."""
        auto = self._method == "auto"
        if auto:
            self.method = auto_choice(self._slope_model, params, batches, bool(self._devices))
        if self._method != "fast" and not self._capable:
            try:
                # a batch with rows (this rank's share may be empty)
                entry = next((e for e in batches if batch_rows(e.inputs)), batches[0])
                self._try_gradient(params, entry)
            except NotImplementedError as err:  # an op (or autograd.Function) without forward AD
                if not auto or half_precision(self._slope_model, params):
                    raise
                warnings.warn(
                    f'RadiusController(method="auto"): {err} -- using method="fast" for this '
                    "run (measured in float32, autocast off)",
                    RuntimeWarning,
                    stacklevel=7,
                )
                self.method = "fast"
            self._capable = True
        if self._method == "fast":
            check_fast_dtype(params)  # e.g. the model was cast to bfloat16 later

    def _try_gradient(self, params, entry: Captured) -> None:
        """The slopes along the gradient on all rows of one batch (no subset draw: the
        generator is left alone)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        tangents = self._aligned(params, grads)
        with self._capture.measuring():
            with autocast_as(entry.autocast if self._method == "jvp" else ()):
                tangent_spreads(
                    self._slope_model, *split_inputs(entry.inputs), tangents,
                    method=self._method, output_fn=self._reader, rng=entry.rng,
                    chunk_size=self.chunk_size if batch_rows(entry.inputs) else None,
                    **self.slopes_kwargs,
                )  # fmt: skip

    def _check_function(self, batches: list[Captured]) -> None:
        """Inputs or buffers the training forwards read that changed in place since
        (``_capture.changes``): warn once; "fast" then takes its own baseline forward
        instead of the stale training logits, and no fingerprint is checked."""
        for entry in batches:
            if entry.recorded is None:
                continue  # step(inputs=...)
            causes = changes(self._slope_model, entry.recorded, entry.args, entry.kwargs)
            if causes:
                entry.logits = entry.fingerprint = entry.masked = None
                self._watch.changed(causes, self._method)

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
            stacklevel=7,
        )  # fmt: skip
        if not applied:
            self._proposal.apply(0.0)
            self.skipped_steps += 1
            self._record(self._stats(tau, math.inf, 0.0, context, spread=0.0, skipped=True))

    def _initialising(self) -> bool:
        """A step that can only initialise the inner optimizers' state: no batch
        captured, every learning rate 0 and every gradient None or zero -- how
        ``torch.distributed.checkpoint.state_dict`` (``_init_optim_state``) makes a fresh
        optimizer build its state before ``get_state_dict`` / ``set_state_dict``. The
        inner optimizers step alone: no measurement (there is no batch, and nothing
        moves), no counter or history entry, and DCP puts the learning rates back after.
        Decided alike on every rank (no collective: the same on each)."""
        if self._capture.entries or any(float(g.get("lr", 0.0)) != 0.0 for g in self.param_groups):
            return False
        grads = local_shards([p.grad for p in self._params() if p.grad is not None])
        return not any(bool(g.any()) for g in grads)

    def _degenerate(self, params, batches: list[Captured]) -> str | None:
        """Why the step must be skipped (or None), decided before the inner step and
        alike on every rank with ONE collective (the MAX of the counted positions and
        of a no-gradient flag): some rank has no gradient, every batch of every rank is
        empty, or every position is masked. A rank whose own batches are empty or all
        masked goes on with the others: it measures its 0-row / all-masked batches (no
        position counted, nothing added to the max) through the same forwards and
        collectives, so every rank applies the same scale (``docs/scaling.md``)."""
        has_grad = any(p.grad is not None for p in params)
        rows = [entry for entry in batches if batch_rows(entry.inputs) != 0]
        counted = float(bool(rows))
        if rows and self.sampling.masks:
            masks = [self.sampling.position_mask(entry.inputs) for entry in rows]
            counted = float(sum(int(m.sum()) for m in masks))
        # 2 x positions + (some rows): >= 2 some position counted, 1 only masked rows
        found, every_rank_has_grad = max_over_ranks(
            2.0 * counted + float(bool(rows)), has_grad, self.process_group
        )
        if not every_rank_has_grad:  # a rank stepping alone would part the replicas
            return "no trainable parameter has a gradient" if not has_grad else (
                "another rank has no gradient (stepping here alone would part the replicas)"
            )  # fmt: skip
        if found >= 2.0 or (found >= 1.0 and self.mode == "monitor"):
            return None  # monitor mode applies an all-masked update (warned later)
        if found < 1.0 and not self.sampling.masks:
            return "the batch is empty (0 rows)"
        return "the batch is empty or every position is masked (mask_fn / ignore_index)"

    def _chunk(self, plan: Plan) -> int | None:
        """``chunk_size`` for a plan's forwards; None (one forward) for a plan of 0 rows
        (a rank's empty share is measured too, through the same collectives)."""
        return None if batch_rows(plan.evaluated) == 0 else self.chunk_size

    def _skip(self, why: str, context: StepContext) -> None:
        """Skip a step before the inner optimizer ran: parameters and its state untouched."""
        warnings.warn(
            f"RadiusController: {why} at step {self.step_count}; the step was skipped, the "
            "parameters and the optimizer state left unchanged",
            RuntimeWarning,
            stacklevel=7,
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
            if self.chunk_size is not None:
                check_row_slicing(entry.inputs, "chunk_size")
        self._check_function(batches)  # before any forward of the controller's own
        return batches

    # ------------------------------------------------------------ after the measurement

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
            warnings.warn(message + " (warning once per controller)", RuntimeWarning, stacklevel=7)
            self._warned = True
        self._record(self._stats(tau, math.nan, 0.0, context, spread=math.nan, skipped=True))

    def _stats(self, tau, radius, scale, context, *, measured=None, spread=None, skipped=False):
        r_before = tau / radius if radius > 0 else math.inf  # tau / inf = 0; nan propagates
        # always-on between measurements: no radius measured, the last one used
        stale = measured is None and spread is None and not skipped
        return StepStats(
            step=self.step_count,
            tau=tau,
            rho_a=math.nan if stale else radius if measured is None else measured.rho_a,
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
            radius=radius,
            measured=not stale,
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
        self._devices = self._capture.devices = devices

    def _check_params_in_model(self) -> None:
        known = {id(p) for p in self._slope_model.parameters()}
        for p in self._params():
            if id(p) not in known:
                raise ValueError(
                    "every parameter the optimizer updates must belong to `model`; found one "
                    f"of shape {tuple(p.shape)} that does not"
                )


# --------------------------------------------------------------------------- the reading


class Reading(NamedTuple):
    """What the measurement read in one step (``measure()`` returns a ``Measurement``).
    ``spread``: the aggregated spread per unit of v (0 when nothing was counted);
    ``rho_a``: the output logits' radius pi T / spread; ``radius``: the radius that
    limits the step, the smallest of the ``limit_by`` radii (``rho_a`` without extra
    radii); ``bottleneck``: the position index over the micro-batches in order;
    ``rho_samples``: per-position radii (CPU float32) when kept; ``radii``: the extra
    radii dict with ``"out"``, or None; ``counted``: some position was not masked."""

    spread: float
    rho_a: float
    radius: float
    bottleneck: int
    finite: bool
    rho_samples: torch.Tensor | None
    radii: dict[str, float] | None
    counted: bool


def _trained(plan: Plan) -> bool:
    """Whether the plan's baseline comes (partly) from the training forward."""
    return plan.baseline is not None or plan.head is not None


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


# ------------------------------------------------------- the proposal: the only writer


class Proposal:
    """The inner optimizer's proposed update p = new - old, for one controller: the
    parameters it moves (``params``: the old values after the swap, then old + at p), the
    spare copy that holds ``new`` after the swap, the step length ``tau`` = ||p|| and
    where the parameters are (``at``), with the arithmetic on them.

    Usage per step: :meth:`begin` (spare <- params) before the inner step, :meth:`swap`
    after it (params <- old, spare <- new; sets and returns tau), :meth:`move_to`
    evaluation points, then :meth:`apply`.
    """

    def __init__(self) -> None:
        # Kept between steps: a fresh allocation of every parameter's size each step
        # costs page faults on the CPU.
        self.spare: list[torch.Tensor] | None = None
        self.params: list[torch.Tensor] = []  # the (local shards of the) parameters
        self.shards = None  # the FSDP2 shard group (None: unsharded)
        self.at = 0.0  # where the parameters are: old + at p (after swap)
        self.tau = math.nan  # ||new - old|| (after swap)

    def begin(self, params: list[torch.Tensor], shards) -> list[torch.Tensor]:
        """Copy the parameters into the spare, before the inner step; returns the spare
        (:attr:`new` after :meth:`swap`)."""
        self.params, self.shards = params, shards
        spare = self.spare
        if spare is None or len(spare) != len(params) or any(
            s.shape != p.shape or s.dtype != p.dtype or s.device != p.device
            or s.stride() != p.stride()
            for s, p in zip(spare, params, strict=True)
        ):  # fmt: skip
            spare = [torch.empty_like(p) for p in params]
        torch._foreach_copy_(spare, params)
        self.spare = spare  # after the step it holds whatever the parameters do not
        return spare

    def update(self) -> list[torch.Tensor]:
        """p = new - params, a transient copy (at the old values: the proposed update)."""
        return torch._foreach_sub(self.spare, self.params)

    def exchange_ok(self) -> bool:
        # a shard's storage belongs to its DTensor: only plain parameters trade storage
        return self.shards is None and all(type(p.data) is torch.Tensor for p in self.params)

    def swap(self) -> float:
        """Exchange the contents (parameters <- old, spare <- new, both bitwise); set and
        return tau = ||new - old|| (summed over the shards of sharded parameters).

        Plain tensors exchange their storage (``.data``, no copy); shards and tensor
        subclasses are copied in place. The difference is taken in groups no larger
        than the largest parameter: the transient memory stays one parameter's size.
        """
        params, proposed = self.params, self.spare
        norms = []
        for group in _groups(params):
            # 16-bit parameters: the difference in float32 (in bfloat16 it rounds by 0.4 %)
            diff = torch._foreach_sub(
                [_wide(params[i]) for i in group], [_wide(proposed[i]) for i in group]
            )
            norms += torch._foreach_norm(diff)
            del diff
        if self.exchange_ok():
            _exchange(params, proposed)
        else:
            for group in _groups(params):
                ps, keep = [params[i] for i in group], [proposed[i] for i in group]
                new = [torch.empty_like(p) for p in ps]
                torch._foreach_copy_(new, ps)
                torch._foreach_copy_(ps, keep)
                torch._foreach_copy_(keep, new)
                del new
        self.at = 0.0
        device = params[0].device
        tau = math.sqrt(float(sum_over_shards(_squares(norms, device), self.shards)))
        if math.isinf(tau) and agree(all(bool(t.isfinite().all()) for t in proposed), self.shards):
            # overflow of a float32 norm, not a non-finite entry: redo in float64
            pairs = zip(params, proposed, strict=True)
            wide = torch.stack(
                [(q.double() - p.double()).pow(2).sum().to(device) for p, q in pairs]
            )
            tau = math.sqrt(float(sum_over_shards(wide.sum().reshape(1), self.shards)))
        self.tau = tau
        return tau

    def norm(self) -> float:
        """||params|| at their current point (over all shards): one pass, one host sync."""
        params = self.params
        squares = _squares(torch._foreach_norm(params), params[0].device)
        return math.sqrt(float(sum_over_shards(squares, self.shards)))

    def move_to(self, fraction: float) -> None:
        """Parameters (now at old + at p) <- old + f p (an evaluation point, f < 1)."""
        if fraction != self.at:
            # old + f p = e + (f - at) / (1 - at) (new - e), with e = old + at p
            weight = (fraction - self.at) / (1.0 - self.at)
            torch._foreach_lerp_(self.params, self.spare, weight)
            self.at = fraction

    def apply(self, scale: float) -> None:
        """Parameters (now at old + at p) <- old + s p. s = 1 copies the proposal bitwise;
        s = 0 from the old values leaves them bitwise. 16-bit parameters (measured at
        the old values) are rounded toward the old values (:func:`_round_toward_old`)."""
        params, proposed = self.params, self.spare
        if scale == 1.0:
            if self.exchange_ok():
                _exchange(params, proposed)  # the inner optimizer's tensors, bitwise
            else:
                torch._foreach_copy_(params, proposed)
            self.at = 1.0
        elif self.at == 0.0 and scale != 0.0 and any(p.dtype in HALF for p in params):
            _round_toward_old(params, proposed, scale)
            self.at = scale
        else:
            self.move_to(scale)


def rerun_scaled(snapshot: OptimizerSnapshot, optimizer, params, scale: float) -> float:
    """Restore the optimizer and the parameters from ``snapshot``, then its step again
    with every learning rate times ``scale`` (``scaled_update="rerun"``); returns the
    length of the resulting step."""
    snapshot.restore(optimizer, params)
    rates = [group.get("lr") for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, rates, strict=True):
        if lr is not None:
            group["lr"] = lr * scale
    try:
        optimizer.step()
    finally:
        for group, lr in zip(optimizer.param_groups, rates, strict=True):
            if lr is not None:
                group["lr"] = lr
    return float(global_norm(torch._foreach_sub(params, snapshot.params)))


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Every entry finite? One host sync: the 2-norms are finite unless an entry is not
    or a norm overflowed; only then are the entries checked one by one."""
    device = tensors[0].device
    norms = torch.stack([n.to(device) for n in torch._foreach_norm(tensors)])
    if bool(norms.isfinite().all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _squares(norms: Sequence[torch.Tensor], device) -> torch.Tensor:
    """Sum of squares of per-tensor norms, float64, as a 1-element tensor on ``device``."""
    if all(n.device == device and n.dtype == norms[0].dtype for n in norms):
        stacked = torch.stack(list(norms))  # one kernel, not one conversion per tensor
    else:
        stacked = torch.stack([n.to(device, torch.float64) for n in norms])
    return stacked.double().pow(2).sum().reshape(1)


def _round_toward_old(params, proposed, scale: float) -> None:
    """``params`` (the old values) <- old + s (new - old), each entry rounded toward
    old where rounding to nearest would lengthen it. In bfloat16 an entry whose step
    lies between half an ulp and one ulp rounds up to one ulp, up to twice its length:
    measured r 1.05 on a TinyLM against 0.98 intended. Rounded toward old, every entry
    moves at most s |p_i|, in p_i's direction. One parameter at a time in float32."""
    for p, q in zip(params, proposed, strict=True):
        if p.dtype not in HALF:
            p.lerp_(q, scale)
            continue
        old = p.float()
        step = (q.float() - old).mul_(scale)
        nearest = (old + step).to(p.dtype)
        longer = (nearest.float() - old).abs_() > step.abs_()
        p.copy_(torch.where(longer, torch.nextafter(nearest, p), nearest))


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in HALF else t


def _groups(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Consecutive index groups whose total size is at most the largest tensor's."""
    limit = max(t.numel() for t in tensors)
    groups: list[list[int]] = [[]]
    size = 0
    for i, t in enumerate(tensors):
        if size + t.numel() > limit and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += t.numel()
    return groups


def _exchange(params: Sequence[torch.Tensor], others: list[torch.Tensor]) -> None:
    """Swap the storage of each parameter with ``others[i]`` (no data is copied)."""
    for i, p in enumerate(params):
        mine = p.data
        p.data = others[i]
        others[i] = mine


def check_dense(params: Sequence[torch.Tensor]) -> None:
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            raise RuntimeError(
                "RadiusController does not support sparse gradients "
                "(e.g. nn.Embedding(sparse=True)); use dense gradients"
            )
