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

Reference: P. Sao, "Ghosts of Softmax: Complex Singularities That Limit Safe Step Sizes
in Cross-Entropy", arXiv:2603.13552 (2026), section 5.
"""

from __future__ import annotations

import collections
import copy
import inspect
import math
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from .directional import (
    FAST_MOVE,
    METHODS,
    batch_coupled,
    capture_rng,
    check_chunking,
    chunks,
    cuda_devices,
    directional,
    fd_step,
    forward,
    full_float32,
    logits_reader,
    refined_step,
    split_inputs,
    tf32_allowed,
)
from .monitor import Sink, StepStats
from .radius import radius_from_spread, step_scale
from .sharding import is_sharded, local_shards, shard_group, sum_over_shards

__all__ = ["RadiusController"]

_MODES = ("clip", "set", "monitor")
# Default relative margin on the measured radius in clip / set mode, by method: the
# exact JVP only needs its float32 rounding covered; the secants ("fd" across a kink,
# "fast" with its O(h) error, measured within +0.3 % of the JVP) need more.
_MARGINS = {"jvp": 1e-5, "fd": 1e-2, "fast": 1e-2}
_STATE_VERSION = 1


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

    Memory: one extra copy of the trainable parameters, kept between steps (plain
    tensors trade storage with it, so no copy is made back and forth), plus transient
    tensors the size of the largest parameter and the activations of the measurement;
    ``method="jvp"`` also holds the tangent p (a second copy) during its pass. No
    per-parameter host sync: three per step (gradient check, ||p||, the radius), plus
    ``"fast"``'s spread that sets the next h and, when the clip binds, ||old|| for the
    rounding margin.

    Devices: parameters may live on several devices (e.g. a model split between CPU and
    GPU); every snapshot stays beside its parameter and the norms are gathered on the
    first parameter's device. Sparse gradients raise a ``RuntimeError``.

    Which samples set the radius (each option gives something up; all can be combined):

    * default: the whole batch -- the exact guarantee ``r <= target_r`` for every sample
      of the batch (every logit position for sequence models) at the old parameters.
    * ``subset=k``: k rows drawn from the batch without replacement (seeded
      ``torch.Generator``, its state is checkpointed). Gives up the guarantee for the
      rows not drawn; cost scales with k (with ``"fast"`` one forward of k rows: the
      subset's baseline is sliced from the training forward's logits when the rows are
      independent, i.e. that forward drew no random numbers and no BatchNorm used batch
      statistics). For BatchNorm in train mode the batch statistics of the subset differ
      from the training batch's.
    * ``buffer_size=m``: keep the inputs of the m rows with the largest spread seen so
      far (bottleneck samples) and evaluate them together with the current batch every
      step; the guarantee then covers batch and buffer. Gives up nothing for the batch
      in models whose rows are independent -- but with BatchNorm in train mode the
      buffer rows change the batch statistics, so the measured function is no longer
      exactly the training function of the batch. Inputs must have identical per-row
      shapes across steps (the buffer is dropped when they do not). Costs m extra rows.
    * ``window=W``: use ``min(rho now, the previous W - 1 radii)``. Only ever smaller
      than the current radius, so the batch guarantee holds; what it gives up is
      responsiveness: one bottleneck batch throttles the next W - 1 steps, and the
      older radii were measured along other directions at other parameters.
    * ``quantile=q``: use the q-quantile (upper order statistic) of the per-sample
      spread instead of the max. Gives up the guarantee for the (1 - q) share of samples
      with the largest spreads, in exchange for robustness to a few outliers. Under
      ``torch.distributed`` the max of the per-rank quantiles is used.

    Faults (``on_nonfinite``): a non-finite gradient is detected *before*
    ``inner.step()``, so parameters and the inner state are untouched. If the gradients
    are finite but the update p or the slopes are not, the parameters are restored to
    the old values (bitwise; with ``"fast"`` and non-finite slopes to rounding, since
    the old values were moved to old + h v), but the inner optimizer has already
    consumed the gradient (its moments / step count advanced; with a non-finite p they
    may now hold NaN).
    ``"skip"`` counts the step in ``skipped_steps``, records it (``StepStats.skipped``)
    and warns once; ``"raise"`` raises ``FloatingPointError`` after restoring.

    Distributed: if ``torch.distributed`` is initialized, the aggregated spread is
    all-reduced with MAX (and the fault flag with it) so every rank applies the same s;
    ``||p||`` is already global because DDP synchronizes gradients. Pass the DDP wrapper
    or its ``.module``; slopes are computed on ``.module``.

    Optimizers with an iterate of their own (schedule-free, Lookahead) get the scaled
    update by re-running their step with the learning rates times s from their saved
    state (``scaled_update``); ``train()`` / ``eval()`` are forwarded to them.

    Guarantee margin: clip mode caps at ``target_r * (rho (1 - margin) - 2 eps ||old||)``:
    the method's error and the float rounding of old + s p cannot push the realised r
    above ``target_r``. A batch with every position masked has no radius: a
    ``RuntimeWarning``, and clip / set skip the update (monitor applies it). With
    ``"jvp"`` / ``"fd"`` the first step evaluates the slopes along the gradient before
    the inner step, so a model the method cannot evaluate raises with the optimizer
    untouched.

    Not supported (``ValueError`` at construction, naming what works): LBFGS and
    two-pass optimizers whose step needs a closure (SAM: wrap its ``base_optimizer``).
    Sparse gradients raise a ``RuntimeError``. With gradient accumulation the radius is
    measured on the last micro-batch forwarded before ``step`` unless ``inputs=`` is
    given.

    Args:
        optimizer: the inner ``torch.optim.Optimizer``; every parameter it optimizes must
            belong to ``model``.
        model: the module whose logits the loss reads (or its DDP wrapper).
        mode: ``"clip"`` | ``"set"`` | ``"monitor"``.
        target_r: r*, the normalized step to cap at (clip) or set (set); > 0.
        temperature: softmax temperature T of the loss (logits / T), > 0.
        subset: evaluate k random rows of the batch instead of all of them.
        buffer_size: number of bottleneck rows kept and re-checked (0: off).
        window: running minimum of rho over the last W steps (1: off).
        quantile: use this quantile of the per-sample spread instead of the max.
        seed: seed of the subset generator.
        logits_fn: maps the model output to logits ``(..., K)`` (e.g. ``lambda o: o[1]``);
            default: a tensor, ``.logits``, ``["logits"]`` or a Hugging Face
            ``(loss, logits)`` tuple, never a guess. One logit per sample ((B,) or
            (B, 1), a binary classifier) is the two-class softmax [0, z].
        mask_fn: ``mask_fn(inputs) -> bool tensor`` of the sample shape
            ``logits.shape[:-1]`` (e.g. an attention mask); False positions (padding)
            are ignored. ``inputs`` is the evaluated batch (subset / buffer applied).
        ignore_index, targets_fn: alternatively, positions whose target equals
            ``ignore_index`` are ignored; targets are ``targets_fn(inputs)`` (default:
            ``inputs["labels"]`` for dict inputs).
        chunk_size: rows per JVP chunk (``ghoststep.slopes.per_sample_spread``; each
            chunk's tangent is reduced to its spread at once). Not with train-mode
            BatchNorm.
        method: how the slopes are evaluated (``ghoststep.directional``):
            ``"jvp"`` (exact forward-mode AD; about one training step of extra cost),
            ``"fast"`` (one extra float32 forward at old + h v, differenced against
            the logits of the training forward, replaying its RNG state so dropout
            masks match; BatchNorm buffers restored; the radius agrees with ``"jvp"``
            to well under 1 % on smooth models, see the module docs for where it is
            unsafe; float32/64 parameters only; a training forward under autocast,
            or with TF32 allowed on a CUDA model, costs a second, full-float32
            baseline forward), or ``"fd"`` (float64 central
            difference, a slow reference).
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
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        _check_positive("target_r", target_r)
        _check_positive("temperature", temperature)
        if subset is not None and not (_is_int(subset) and subset >= 1):
            raise ValueError(f"subset must be None or an int >= 1, got {subset!r}")
        if not (_is_int(buffer_size) and buffer_size >= 0):
            raise ValueError(f"buffer_size must be an int >= 0, got {buffer_size!r}")
        if not (_is_int(window) and window >= 1):
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        if quantile is not None and not (
            isinstance(quantile, (int, float)) and 0.0 < quantile <= 1.0
        ):
            raise ValueError(f"quantile must be None or a number in (0, 1], got {quantile!r}")
        if on_nonfinite not in ("skip", "raise"):
            raise ValueError(f'on_nonfinite must be "skip" or "raise", got {on_nonfinite!r}')
        if not (_is_int(history_size) and history_size >= 0):
            raise ValueError(f"history_size must be an int >= 0, got {history_size!r}")
        if ignore_index is not None and mask_fn is not None:
            raise ValueError("give either mask_fn or ignore_index, not both")
        if margin is not None and not (isinstance(margin, (int, float)) and 0.0 <= margin < 1.0):
            raise ValueError(f"margin must be None or a number in [0, 1), got {margin!r}")
        if scaled_update not in ("auto", "interpolate", "rerun"):
            raise ValueError(
                f'scaled_update must be "auto", "interpolate" or "rerun", got {scaled_update!r}'
            )
        _check_supported(optimizer)

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
        self.subset = subset
        self.buffer_size = int(buffer_size)
        self.window = int(window)
        self.quantile = None if quantile is None else float(quantile)
        self.logits_fn = logits_fn
        self._logits_fn = logits_reader(logits_fn)
        self.mask_fn = mask_fn
        self.ignore_index = ignore_index
        self.targets_fn = targets_fn
        self.chunk_size = chunk_size
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.margin = _MARGINS[method] if margin is None else float(margin)
        if scaled_update == "auto":
            scaled_update = "rerun" if holds_iterate(optimizer) else "interpolate"
        self.scaled_update = scaled_update
        self.on_nonfinite = on_nonfinite
        self.keep_samples = bool(keep_samples)
        if micro_batches not in ("last", "all"):
            raise ValueError(f'micro_batches must be "last" or "all", got {micro_batches!r}')
        self.micro_batches = micro_batches
        if extra_radii is not None and not callable(extra_radii):
            raise TypeError("extra_radii must be callable(model, inputs, update) -> dict")
        if limit_by is not None:
            limit_by = tuple(limit_by)
            if not limit_by or not all(isinstance(k, str) for k in limit_by):
                raise ValueError(
                    f"limit_by must be a non-empty sequence of names, got {limit_by!r}"
                )
            if extra_radii is None and limit_by != ("out",):
                raise ValueError(f"limit_by={limit_by!r} names radii but extra_radii is None")
        self.extra_radii = extra_radii
        self.limit_by = limit_by
        self.sinks: list[Sink] = list(sinks)
        self.process_group = process_group
        self.slopes_kwargs = dict(slopes_kwargs or {})

        self.history: collections.deque[StepStats] = collections.deque(maxlen=history_size)
        self.last: StepStats | None = None
        self.step_count = 0
        self.skipped_steps = 0
        self._warned = False
        self._recent_rhos: collections.deque[float] = collections.deque(maxlen=self.window - 1)
        self._buffer: Any = None  # inputs of the bottleneck rows, or None
        self._generator = torch.Generator()
        self._generator.manual_seed(int(seed))
        self._captured: list[_Captured] = []  # training forwards since the last step
        self._frames: list[_Captured | None] = []  # forwards of the model in progress
        self._measuring = False
        self._devices = cuda_devices(self._slope_model)  # whose RNG the hook captures
        self._pending_buffer: tuple | None = None
        self._spare: list[torch.Tensor] | None = None
        self._spread_hint: float | None = None  # last max spread per unit v ("fast")
        self._capable = method == "fast"  # "jvp" / "fd" are tried before the first step
        self._shards = None  # the shard group of FSDP2 parameters (set per step)
        self._check_params_in_model()
        self._check_sharding()
        self._hook = self._slope_model.register_forward_pre_hook(
            _CaptureHook(self), with_kwargs=True
        )
        self._done_hook = self._slope_model.register_forward_hook(
            _CaptureHook(self, post=True), with_kwargs=True, always_call=True
        )

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
        self._devices = cuda_devices(self._slope_model)
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
        """``{"inner": inner.state_dict(), "ghoststep": controller state}``.

        The controller state holds the step and skip counters, the window of recent
        radii, the bottleneck buffer's inputs and the subset generator's state.
        """
        return {
            "inner": self.optimizer.state_dict(),
            "ghoststep": {
                "version": _STATE_VERSION,
                "step_count": self.step_count,
                "skipped_steps": self.skipped_steps,
                "recent_rhos": list(self._recent_rhos),
                "buffer": _map_tensors(self._buffer, lambda t: t.detach().clone()),
                "generator": self._generator.get_state(),
                "warned": self._warned,
            },
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Load a dict from :meth:`state_dict` (or a bare inner optimizer state dict)."""
        if "inner" not in state_dict:
            self.optimizer.load_state_dict(state_dict)  # a plain optimizer checkpoint
            self.param_groups = self.optimizer.param_groups
            return
        self.optimizer.load_state_dict(state_dict["inner"])
        self.param_groups = self.optimizer.param_groups  # re-link (see PYTORCH-FACTS)
        ours = state_dict.get("ghoststep", {})
        if ours.get("version", _STATE_VERSION) != _STATE_VERSION:
            raise ValueError(f"unsupported ghoststep state version {ours.get('version')!r}")
        self.step_count = int(ours.get("step_count", 0))
        self.skipped_steps = int(ours.get("skipped_steps", 0))
        self._recent_rhos = collections.deque(
            (float(r) for r in ours.get("recent_rhos", [])), maxlen=self.window - 1
        )
        self._buffer = _map_tensors(ours.get("buffer"), lambda t: t.detach().clone())
        if "generator" in ours:
            self._generator.set_state(ours["generator"].clone())
        self._warned = bool(ours.get("warned", False))

    def __repr__(self) -> str:
        return (
            f"RadiusController(mode={self.mode!r}, target_r={self.target_r}, "
            f"optimizer={type(self.optimizer).__name__})"
        )

    # -------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Remove the forward hooks and close the sinks."""
        if self._hook is not None:
            self._hook.remove()
            self._done_hook.remove()
            self._hook = self._done_hook = None
        for sink in self.sinks:
            sink.close()

    def _capture_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        entry = None
        if module.training and not self._measuring:
            # The RNG state before the forward: the measurement replays it, so it sees
            # the dropout masks the training forward drew.
            # Logits from autocast, or from TF32 on CUDA, are too coarse for "fast"'s
            # one-sided difference: it then measures a full-float32 baseline itself.
            coarse = _autocast_enabled() or bool(self._devices and tf32_allowed())
            entry = _Captured(args, kwargs, capture_rng(self._devices), coarse)
            if self._frames and self._captured:
                # A call inside a call of the same model is the one with the model's
                # inputs (e.g. Lightning under DDP routes training_step(batch, i)
                # through the module's __call__, and training_step calls self(x)).
                self._captured[-1] = entry
            else:
                if self.micro_batches == "last":
                    self._captured.clear()
                self._captured.append(entry)
        self._frames.append(entry)

    def _forward_done(self, output) -> None:
        entry = self._frames.pop() if self._frames else None
        if (
            entry is not None
            and self.method == "fast"
            and output is not None
            and any(entry is c for c in self._captured)
        ):
            # The training forward's logits: the baseline of the one-sided difference.
            try:
                logits = self._logits_fn(output)
            except (TypeError, KeyError, AttributeError, IndexError):
                logits = None  # not the logits (e.g. a loss): measure its own baseline
            if isinstance(logits, torch.Tensor):
                entry.logits = logits.detach()
                if self.subset is not None or self.buffer_size > 0:
                    # Only sampling reuses rows of these logits. No random number drawn
                    # (no active dropout): each row's logits then depend on that row
                    # alone, unless a BatchNorm couples the rows.
                    entry.rows_independent = _rng_unchanged(
                        entry.rng, self._devices
                    ) and not batch_coupled(self._slope_model)

    @contextmanager
    def _measuring_forward(self):
        self._measuring = True
        try:
            # (a JVP has no cancellation: TF32 costs it 1e-3 relative, "fast" 10 %)
            with full_float32() if self._devices and self.method == "fast" else nullcontext():
                yield
        finally:
            self._measuring = False

    # ------------------------------------------------------------------------ step

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
        if inputs is not None:
            batches = [_Captured.explicit(inputs)]
        else:
            batches = self._captured
            for entry in batches:
                entry.inputs = self._replay(entry)
        self._captured = []
        if not batches:
            raise RuntimeError(
                "RadiusController.step() has no batch to measure the radius on: run a "
                "training-mode forward of the model before step(), or pass step(inputs=batch)"
            )
        model_params = self._params()
        # FSDP2: the arithmetic runs on each rank's local shard; the few global
        # scalars are summed over the shard group (no-op for unsharded parameters)
        self._shards = shard_group(model_params)
        params = local_shards(model_params)
        loss_value = _as_float(loss)
        lr = _as_float(self.param_groups[0].get("lr", math.nan))

        for p in model_params:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(
                    "RadiusController does not support sparse gradients "
                    "(e.g. nn.Embedding(sparse=True)); use dense gradients"
                )
        if not self._capable:
            # Before the inner optimizer consumes the gradient: an error here (e.g. an
            # op without forward AD) leaves the optimizer and the parameters as they were.
            self._try_measurement(model_params, batches)
        self.step_count += 1
        grads = local_shards([p.grad for p in model_params if p.grad is not None])
        # host sync 1 of 3: a non-finite gradient must stop us before inner.step().
        if grads and not self._agree(_all_finite(grads)):
            self._fault("gradient", lr, loss_value)
            return loss

        rerun = self.scaled_update == "rerun" and self.mode != "monitor"
        snapshot = _OptimizerSnapshot(self.optimizer, params) if rerun else None

        # The one extra parameter copy. After the swap the parameters hold the old
        # values and `proposed` the inner optimizer's result, bitwise (s = 1 copies it
        # back), and the update p = proposed - params is never stored.
        proposed = self._spare_for(params)
        torch._foreach_copy_(proposed, params)
        self._spare = proposed  # after the step it holds whatever the parameters do not
        self.optimizer.step()
        tau = self._swap(params, proposed)  # host sync 2 of 3
        if not math.isfinite(tau):
            self._fault("update", lr, loss_value)  # parameters hold the old values
            return loss
        if tau == 0.0:
            self._apply(params, proposed, 1.0, 0.0)
            self._record(
                self._stats(tau=0.0, rho=math.inf, scale=1.0, lr=lr, loss=loss_value, spread=0.0)
            )
            return loss

        start = time.perf_counter()
        # "fast" measures at old + f p (f = h / tau); "jvp" / "fd" at the old values.
        fraction = self._fd_fraction(tau, params) if self.method == "fast" else 0.0
        spread, rho_now, bottleneck, finite, rho_samples, radii, counted, fraction = self._measure(
            params, proposed, tau, fraction, batches
        )
        if not finite:
            self._apply(params, proposed, 0.0, fraction)  # back to the old values
            self._fault("slope", lr, loss_value, tau=tau, seconds=time.perf_counter() - start)
            return loss
        if not counted:
            # Every position masked: no radius bounds this update. Policy: clip / set
            # skip it (the parameters keep their values), monitor applies it.
            warnings.warn(
                "RadiusController: every position of the batch is masked (mask_fn / "
                "ignore_index), so no radius bounds this update; "
                + (
                    "it was applied (monitor mode)"
                    if self.mode == "monitor"
                    else "it was skipped and the parameters left unchanged"
                ),
                RuntimeWarning,
                stacklevel=2,
            )
            if self.mode != "monitor":
                self._apply(params, proposed, 0.0, fraction)
                self.skipped_steps += 1
                self._record(
                    self._stats(
                        tau=tau, rho=math.inf, scale=0.0, lr=lr, loss=loss_value,
                        spread=0.0, skipped=True,
                    )
                )  # fmt: skip
                return loss
        rho = min([rho_now, *self._recent_rhos])
        if self.window > 1:
            self._recent_rhos.append(rho_now)
        seconds = time.perf_counter() - start
        # Clip keeps a margin below the radius for the method's error and, when it
        # binds (s < 1 is computed, not copied), for the float rounding of old + s p:
        # about one ulp of each parameter, eps ||old|| in length. The parameters are at
        # old + f p now, so ||old|| <= ||params|| + f tau.
        limit_rho = rho
        if self.mode == "clip":
            limit_rho = rho * (1.0 - self.margin)
            if step_scale(tau, limit_rho, self.mode, self.target_r) < 1.0:
                old_norm = self._norm(params) + fraction * tau
                rounding = 2.0 * torch.finfo(params[0].dtype).eps * old_norm
                limit_rho = max(limit_rho - rounding, 0.0)
        scale = step_scale(tau, limit_rho, self.mode, self.target_r)
        if snapshot is not None and scale != 1.0:
            scale = self._rerun(params, snapshot, scale, self.target_r * limit_rho, tau)
        else:
            self._apply(params, proposed, scale, fraction)
        self._record(
            self._stats(
                tau=tau,
                rho=rho,
                scale=scale,
                lr=lr,
                loss=loss_value,
                spread=spread,
                bottleneck=bottleneck,
                seconds=seconds,
                rho_samples=rho_samples,
                radii=radii,
            )
        )
        return loss

    def _try_measurement(self, params, batches) -> None:
        """Run the slopes once along the gradient on the first batch (first step only)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        tangents = self._direction(params, grads)
        entry = batches[0]  # all rows, no subset draw: the generator is left alone
        plan = _Plan(entry.inputs, split_inputs(entry.inputs), entry.rng, None)
        with self._measuring_forward():
            self._spread_of(
                plan,
                lambda args, kwargs, rows, plan: self._tangent_spread(args, kwargs, plan, tangents),
            )
        self._capable = True

    def _rerun(self, params, snapshot: _OptimizerSnapshot, scale, limit, tau) -> float:
        """Scaled update for optimizers with an iterate of their own (``"rerun"``): the
        inner step again, from the restored state, with every learning rate times s.
        In clip mode the result is pulled back to length ``limit`` if it overshoots
        (its direction is not exactly p). Returns the realised s' = ||step|| / tau."""
        snapshot.restore(self.optimizer, params)
        self.param_groups = self.optimizer.param_groups
        rates = [group.get("lr") for group in self.param_groups]
        for group, lr in zip(self.param_groups, rates, strict=True):
            if lr is not None:
                group["lr"] = lr * scale
        try:
            self.optimizer.step()
        finally:
            for group, lr in zip(self.param_groups, rates, strict=True):
                if lr is not None:
                    group["lr"] = lr
        step = torch._foreach_sub(params, snapshot.params)
        length = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(step)).double()))
        if self.mode == "clip" and length > limit:
            torch._foreach_lerp_(params, snapshot.params, 1.0 - limit / length)
            length = limit
        return length / tau

    def _swap(self, params: list[torch.Tensor], proposed: list[torch.Tensor]) -> float:
        """Exchange the contents (parameters <- old, ``proposed`` <- new, both bitwise);
        return ||new - old|| (summed over the shards of sharded parameters).

        Plain tensors exchange their storage (``.data``, no copy); shards and tensor
        subclasses are copied in place. The difference is taken in groups no larger
        than the largest parameter: the transient memory stays one parameter's size.
        """
        norms = []
        for group in _groups(params):
            diff = torch._foreach_sub([params[i] for i in group], [proposed[i] for i in group])
            norms += torch._foreach_norm(diff)
            del diff
        if self._exchange_ok(params):
            _exchange(params, proposed)
        else:
            for group in _groups(params):
                ps, keep = [params[i] for i in group], [proposed[i] for i in group]
                new = [torch.empty_like(p) for p in ps]
                torch._foreach_copy_(new, ps)
                torch._foreach_copy_(ps, keep)
                torch._foreach_copy_(keep, new)
                del new
        device = params[0].device

        tau = math.sqrt(float(sum_over_shards(_squares(norms, device), self._shards)))
        if math.isinf(tau) and self._agree(all(bool(torch.isfinite(t).all()) for t in proposed)):
            # overflow of a float32 norm, not a non-finite entry: redo in float64
            pairs = zip(params, proposed, strict=True)
            wide = torch.stack(
                [(q.double() - p.double()).pow(2).sum().to(device) for p, q in pairs]
            )
            wide = wide.sum()
            tau = math.sqrt(float(sum_over_shards(wide.reshape(1), self._shards)))
        return tau

    def _norm(self, params: list[torch.Tensor]) -> float:
        """||params|| (over all shards): one pass, one host sync."""
        squares = _squares(torch._foreach_norm(params), params[0].device)
        return math.sqrt(float(sum_over_shards(squares, self._shards)))

    def _spare_for(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The persistent extra copy (kept between steps: a fresh allocation of every
        parameter's size each step costs page faults on the CPU)."""
        spare = self._spare
        if (
            spare is None
            or len(spare) != len(params)
            or any(
                s.shape != p.shape
                or s.dtype != p.dtype
                or s.device != p.device
                or s.stride() != p.stride()
                for s, p in zip(spare, params, strict=True)
            )
        ):
            spare = [torch.empty_like(p) for p in params]
        return spare

    def _fd_fraction(self, tau: float, params: list[torch.Tensor]) -> float:
        """f = h / tau for the one-sided difference at old + f p (``method="fast"``): h
        moves the outputs by about ``FAST_MOVE`` at the previous step's spread (the
        first step guesses from ||old||; the parameters hold the old values here)."""
        hint = self._spread_hint
        if hint is not None and math.isfinite(hint) and hint > 0:
            return self._away_from_one(FAST_MOVE / hint / tau)
        return self._away_from_one(fd_step(self._norm(params), 1.0, params[0].dtype) / tau)

    @staticmethod
    def _away_from_one(fraction: float) -> float:
        # The final step is recovered from the evaluation point and the proposal as a
        # lerp with weight (s - f) / (1 - f): keep f away from 1.
        return 0.5 if abs(1.0 - fraction) < 0.5 else fraction

    def _apply(self, params, proposed, scale: float, fraction: float) -> None:
        """Parameters (now at old + f p) <- old + s p. s = 1 copies the proposal bitwise."""
        if scale == 1.0:
            if self._exchange_ok(params):
                _exchange(params, proposed)  # the inner optimizer's tensors, bitwise
            else:
                torch._foreach_copy_(params, proposed)
        elif scale != fraction:
            # old + s p = e + (s - f) / (1 - f) (new - e), with e = old + f p
            torch._foreach_lerp_(params, proposed, (scale - fraction) / (1.0 - fraction))

    def _exchange_ok(self, params) -> bool:
        # a shard's storage belongs to its DTensor: only plain parameters trade storage
        return self._shards is None and _exchangeable(params)

    def _agree(self, flag: bool) -> bool:
        """``flag`` on every rank of the shard group (the AND), so all ranks decide alike."""
        if self._shards is None:
            return flag
        value = torch.tensor([0.0 if flag else 1.0], dtype=torch.float64)
        dist = torch.distributed
        if dist.get_backend(self._shards) == "nccl":
            value = value.cuda()
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self._shards)
        return float(value) == 0.0

    def _global_max(self, value: float) -> float:
        """The max over ranks (``torch.distributed``), so every rank picks the same
        evaluation point; ``value`` itself without it."""
        return self._all_reduce(value, True)[0]

    # ------------------------------------------------------------------ internals

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _check_sharding(self) -> None:
        """FSDP2 (DTensor) parameters: only the ordinary forward can evaluate them.
        FSDP1's flat parameters look like plain tensors but are shards: refused."""
        if any(type(m).__name__ == "FullyShardedDataParallel" for m in self.model.modules()):
            raise ValueError(
                "RadiusController does not support FSDP1 (FullyShardedDataParallel): its "
                "flat parameters are shards that look like whole tensors. Shard with FSDP2 "
                "(torch.distributed.fsdp.fully_shard; Lightning ModelParallelStrategy) and "
                'method="fast"'
            )
        if not is_sharded(self._params()):
            return
        if self.method != "fast":
            raise ValueError(
                f'method="{self.method}" cannot evaluate sharded (FSDP2 / DTensor) '
                "parameters (functional_call and forward AD do not support them); use "
                'method="fast", which goes through the model\'s own FSDP forward'
            )
        for name, bad in (
            ("extra_radii", self.extra_radii is not None),
            ('scaled_update="rerun"', self.scaled_update == "rerun"),
        ):
            if bad:
                raise ValueError(f"{name} is not supported with sharded (FSDP2) parameters")

    def _check_params_in_model(self) -> None:
        known = {id(p) for p in self._slope_model.parameters()}
        for p in self._params():
            if id(p) not in known:
                raise ValueError(
                    "every parameter the optimizer updates must belong to `model`; found one "
                    f"of shape {tuple(p.shape)} that does not"
                )

    def _replay(self, captured: _Captured) -> Any:
        """A captured forward call as ``inputs`` for the slopes (tensor, tuple or dict)."""
        args, kwargs = captured.args, captured.kwargs
        if not kwargs:
            return args[0] if len(args) == 1 else tuple(args)
        if not args:
            return dict(kwargs)
        # Mixed positional and keyword arguments: name the positional ones.
        try:
            bound = inspect.signature(self._slope_model.forward).bind(*args, **kwargs)
        except TypeError as err:
            raise RuntimeError(
                f"cannot replay the captured forward call ({err}); pass step(inputs=...)"
            ) from err
        params = inspect.signature(self._slope_model.forward).parameters
        if any(params[n].kind is inspect.Parameter.VAR_POSITIONAL for n in bound.arguments):
            raise RuntimeError(
                "the model's forward takes *args together with keyword arguments; the "
                "captured call cannot be replayed as one dict, pass step(inputs=...)"
            )
        out = {}
        for name, value in bound.arguments.items():
            if params[name].kind is inspect.Parameter.VAR_KEYWORD:
                out.update(value)
            else:
                out[name] = value
        return out

    def _direction(self, params, updates) -> list[torch.Tensor | None]:
        """Updates aligned with the model's trainable parameters (None: not optimized)."""
        by_id = {id(p): u for p, u in zip(params, updates, strict=True)}
        return [by_id.get(id(q)) for q in self._slope_model.parameters() if q.requires_grad]

    def _measure(self, params, proposed, tau: float, fraction: float, batches: list):
        """Measure along v = p / tau over the micro-batches.

        On entry the parameters hold the old values; with ``"fast"`` they are moved to
        old + f p here. Returns the aggregated spread, the radius (the minimum with
        the extra radii, reduced over ranks), the bottleneck (a position in the
        micro-batches taken in order), the all-finite flag, the per-sample radii (CPU
        float32, ``keep_samples``) and the radii dict (``extra_radii``, else None).
        """
        plans = [self._plan(entry) for entry in batches]
        radii = None
        with self._measuring_forward():
            if self.method == "fast":
                self._fill_baselines(plans)
                if self.extra_radii is not None:  # at the old values, before the shift
                    radii = self._radii(params, torch._foreach_sub(proposed, params), tau, plans)
                torch._foreach_lerp_(params, proposed, fraction)
                self._shifted_spreads(plans, fraction * tau)
                moved = fraction * tau * self._spread_hint
                better = refined_step(fraction * tau, moved)
                if better is not None:  # the outputs moved too far or too little: redo
                    target = self._away_from_one(better / tau)
                    torch._foreach_lerp_(params, proposed, (target - fraction) / (1.0 - fraction))
                    fraction = target
                    self._shifted_spreads(plans, fraction * tau)
                for plan in plans:
                    plan.baseline = None
            else:
                # One transient copy: the tangent p (the JVP's primal is the old values).
                update = torch._foreach_sub(proposed, params)
                tangents = self._direction(params, update)
                for plan in plans:
                    plan.spread = (
                        self._spread_of(
                            plan,
                            lambda args, kwargs, rows, plan: self._tangent_spread(
                                args, kwargs, plan, tangents
                            ),
                        )
                        / tau
                    )
                del tangents
                radii = self._radii(params, update, tau, plans)
                del update
        return (*self._reduce(plans, radii), fraction)

    def _shifted_spreads(self, plans: list[_Plan], step: float) -> None:
        """Spreads per unit of v from forwards at the evaluation point old + step v."""
        for plan in plans:
            plan.spread = self._spread_of(plan, self._shifted_spread) / step
        # The next step's first guess (move the outputs by about FAST_MOVE), and the
        # redo decision: the max over ranks, so that every rank evaluates at one point.
        local = float(torch.stack([p.spread.max() for p in plans]).max()) if plans else 0.0
        self._spread_hint = self._global_max(local)

    def _spread_of(self, plan: _Plan, spread_fn) -> torch.Tensor:
        """Flat float64 per-position spread of one plan, in ``chunk_size`` row chunks."""
        args, kwargs = plan.call
        if self.chunk_size is None:
            return spread_fn(args, kwargs, slice(None), plan).reshape(-1).double()
        check_chunking(self._slope_model, args, kwargs, self.chunk_size)
        parts = [
            spread_fn(a, k, slice(start, stop), plan).reshape(-1)
            for start, stop, a, k in chunks(args, kwargs, self.chunk_size)
        ]
        return torch.cat(parts).double()

    def _shifted_spread(self, args, kwargs, rows: slice, plan: _Plan) -> torch.Tensor:
        shifted = forward(
            self._slope_model,
            args,
            kwargs,
            output_fn=self._logits_fn,
            rng=plan.rng,
            devices=self._devices,
        )
        return _spread(shifted.sub_(plan.baseline[rows]))

    def _tangent_spread(self, args, kwargs, plan: _Plan, tangents) -> torch.Tensor:
        _, slopes = directional(
            self._slope_model,
            args,
            kwargs,
            tangents,
            method=self.method,
            output_fn=self._logits_fn,
            rng=plan.rng,
            **self.slopes_kwargs,
        )
        return _spread(slopes)

    def _plan(self, entry: _Captured) -> _Plan:
        """The rows to evaluate for one micro-batch (subset and buffer applied)."""
        current = entry.inputs
        rows = _batch_rows(current)
        # The training forward's logits serve as the baseline for exactly its rows, in
        # its precision and RNG state (dropout masks are drawn per row); for a subset of
        # its rows only if each row's logits depend on that row alone.
        logits = entry.logits
        if (
            entry.coarse
            or logits is None
            or logits.dtype not in (torch.float32, torch.float64)
            or logits.ndim < 2
            or logits.shape[0] != rows
        ):
            logits = None
        known = logits
        if self.subset is not None and rows is not None and self.subset < rows:
            idx = torch.randperm(rows, generator=self._generator)[: self.subset]
            current = _select_rows(current, idx, rows)
            known = logits[idx.to(logits.device)] if logits is not None else None
        if known is not None and current is not entry.inputs and not entry.rows_independent:
            known = None
        evaluated, tail = current, None
        if self._buffer is not None:
            joined = _cat_rows(
                current, self._buffer, _batch_rows(current), _batch_rows(self._buffer)
            )
            if joined is None:
                self._buffer = None  # shapes changed: drop the stale buffer
            else:
                evaluated = joined
                if known is not None and not entry.rows_independent:
                    known = None
                tail = self._buffer  # its rows need a baseline forward of their own
        plan = _Plan(
            evaluated, split_inputs(evaluated), entry.rng, None if tail is not None else known
        )
        if tail is not None and known is not None:
            plan.head, plan.tail = known, tail
        return plan

    def _fill_baselines(self, plans: list[_Plan]) -> None:
        """Logits at the old values for the plans the training forward cannot serve."""
        for plan in plans:
            if plan.baseline is None:
                args, kwargs = plan.call if plan.head is None else split_inputs(plan.tail)
                parts = [
                    forward(
                        self._slope_model,
                        a,
                        k,
                        output_fn=self._logits_fn,
                        rng=plan.rng,
                        devices=self._devices,
                    )
                    for _, _, a, k in chunks(args, kwargs, self.chunk_size)
                ]
                if plan.head is not None:  # the subset's rows from the training forward
                    parts.insert(0, plan.head)
                plan.baseline = parts[0] if len(parts) == 1 else torch.cat(parts)
                plan.head = plan.tail = None

    def _reduce(self, plans: list[_Plan], radii):
        """Aggregate the plans' spreads on the device, then one host sync (3 of 3)."""
        flags, spreads, valid_spreads = [], [], []
        offset = 0
        for plan in plans:
            spread = plan.spread
            keep = self._mask(plan.evaluated, spread.numel(), spread.device)
            valid = spread if keep is None else spread[keep]
            masked = spread if keep is None else spread.masked_fill(~keep, -math.inf)
            finite = torch.isfinite(valid).all()
            if self.quantile is None:
                agg = valid.max() if valid.numel() else spread.new_zeros(())
            else:
                agg = _upper_quantile(valid, self.quantile)
            flags.append(
                torch.stack(
                    [
                        agg,
                        finite.double(),
                        masked.argmax().double() + offset,
                        spread.new_full((), float(valid.numel())),  # no host copy
                    ]
                )
            )
            spreads.append(spread)
            valid_spreads.append(valid)
            if self.buffer_size > 0:
                self._pending_buffer = (plan.evaluated, spread, keep)
            offset += spread.numel()
        summary = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
        finite = all(row[1] == 1.0 for row in summary)
        # -1: no position to measure here (every one masked); a MAX over ranks keeps
        # every rank's decision the same
        agg_spread, bottleneck = -1.0, -1
        for agg, _, index, count in summary:
            if count and (bottleneck < 0 or agg > agg_spread):
                agg_spread, bottleneck = agg, int(index)
        if finite and self.buffer_size > 0:
            self._update_buffer(*self._pending_buffer)
        self._pending_buffer = None
        agg_spread, finite = self._all_reduce(agg_spread, finite)
        counted = agg_spread >= 0.0
        agg_spread = max(agg_spread, 0.0)
        rho = radius_from_spread(agg_spread, self.temperature)
        if finite and radii is not None:
            radii = dict(radii, out=rho)
            rho = min(radii[k] for k in (self.limit_by or radii))
            finite = not any(math.isnan(v) for v in radii.values())
            # The same limiting radius on every rank (a no-op without torch.distributed):
            # reduced as the equivalent spread pi T / rho, like the output spread.
            limit, finite = self._all_reduce(
                radius_from_spread(rho, self.temperature) if finite else 0.0, finite
            )
            rho = radius_from_spread(limit, self.temperature)
        samples = None
        if finite and self.keep_samples:
            kept = torch.cat([v for v in valid_spreads if v.numel()]) if valid_spreads else None
            if kept is not None and kept.numel():
                samples = radius_from_spread(kept, self.temperature).float().cpu()
        return agg_spread, rho, bottleneck, finite, samples, radii, counted

    def _radii(self, params, update, tau: float, plans) -> dict[str, float] | None:
        """The ``extra_radii`` hook's radii (smallest over the micro-batches) as distances
        along v = p / tau, at the old parameter values; None without the hook."""
        if self.extra_radii is None:
            return None
        radii: dict[str, float] = {}
        direction = self._direction(params, update)
        for plan in plans:
            extra = self.extra_radii(self._slope_model, plan.evaluated, direction)
            for key, t in dict(extra).items():
                radius, before = float(t) * tau, radii.get(str(key), math.inf)
                # min() would drop a NaN; keep it so the step is treated as a fault
                radii[str(key)] = math.nan if math.isnan(radius) else min(before, radius)
        missing = [k for k in (self.limit_by or ()) if k not in radii and k != "out"]
        if missing:
            raise KeyError(f"limit_by names {missing}, but the radii are {sorted(radii)}")
        return radii

    def _mask(self, inputs, n_samples: int, device: torch.device) -> torch.Tensor | None:
        """Flat bool mask over the logit positions, or None (keep all)."""
        if self.mask_fn is not None:
            mask = self.mask_fn(inputs)
        elif self.ignore_index is not None:
            if self.targets_fn is not None:
                targets = self.targets_fn(inputs)
            elif isinstance(inputs, Mapping) and "labels" in inputs:
                targets = inputs["labels"]
            else:
                raise ValueError("ignore_index needs targets_fn (or dict inputs with 'labels')")
            mask = torch.as_tensor(targets) != self.ignore_index
        else:
            return None
        mask = torch.as_tensor(mask, dtype=torch.bool).reshape(-1)
        if mask.numel() != n_samples:
            raise ValueError(
                f"the mask has {mask.numel()} entries but the logits have {n_samples} "
                "sample positions (logits.shape[:-1])"
            )
        return mask.to(device)

    def _all_reduce(self, agg_spread: float, finite: bool) -> tuple[float, bool]:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return agg_spread, finite
        dist = torch.distributed
        backend = dist.get_backend(self.process_group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
        packed = torch.tensor(
            [agg_spread if finite else 0.0, 0.0 if finite else 1.0],
            dtype=torch.float64,
            device=device,
        )
        dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=self.process_group)
        return float(packed[0]), bool(packed[1] == 0)

    def _update_buffer(self, evaluated, spread: torch.Tensor, keep) -> None:
        rows = _batch_rows(evaluated)
        if rows is None or spread.numel() % rows:
            return
        scores = spread if keep is None else spread.masked_fill(~keep, -math.inf)
        per_row = scores.reshape(rows, -1).amax(1)
        top = per_row.topk(min(self.buffer_size, rows)).indices.sort().values
        self._buffer = _map_tensors(
            _select_rows(evaluated, top, rows), lambda t: t.detach().clone()
        )

    def _fault(self, what: str, lr: float, loss, *, tau: float = math.nan, seconds=0.0) -> None:
        """Skip (parameters already equal the snapshot / untouched) or raise."""
        message = (
            f"RadiusController: non-finite {what} at step {self.step_count}; the step was "
            "skipped and the parameters left unchanged"
        )
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message.replace("the step was skipped and ", ""))
        self.skipped_steps += 1
        if not self._warned:
            warnings.warn(message + " (warning once per controller)", RuntimeWarning, stacklevel=3)
            self._warned = True
        self._record(
            self._stats(
                tau=tau,
                rho=math.nan,
                scale=0.0,
                lr=lr,
                loss=loss,
                spread=math.nan,
                seconds=seconds,
                skipped=True,
            )
        )

    def _stats(
        self,
        *,
        tau,
        rho,
        scale,
        lr,
        loss,
        spread,
        bottleneck=-1,
        seconds=0.0,
        skipped=False,
        rho_samples=None,
        radii=None,
    ) -> StepStats:
        r_before = tau / rho if rho > 0 else math.inf  # tau / inf = 0; nan propagates
        return StepStats(
            step=self.step_count,
            tau=tau,
            rho_a=rho,
            r_before=r_before,
            r_after=0.0 if skipped else scale * r_before,
            scale=scale,
            bottleneck=bottleneck,
            radius_seconds=seconds,
            skipped=skipped,
            lr=lr,
            loss=loss,
            spread=spread,
            rho_samples=rho_samples,
            radii=radii,
        )

    def _record(self, stats: StepStats) -> None:
        self.last = stats
        self.history.append(stats)
        for sink in self.sinks:
            sink.write(stats)


# --------------------------------------------------------------------------- helpers


class _Captured:
    """One training forward: its inputs, the RNG state before it, whether its logits
    are coarse (autocast, or TF32 on CUDA), and (``method="fast"``) its detached logits."""

    __slots__ = ("args", "kwargs", "inputs", "rng", "coarse", "logits", "rows_independent")

    def __init__(self, args, kwargs, rng, coarse: bool) -> None:
        self.args, self.kwargs, self.rng, self.coarse = args, kwargs, rng, coarse
        self.inputs: Any = None
        self.logits: torch.Tensor | None = None
        self.rows_independent = False  # no RNG drawn, no batch statistics

    @classmethod
    def explicit(cls, inputs) -> _Captured:
        """``step(inputs=...)``: no RNG state, no logits."""
        entry = cls((), {}, None, False)
        entry.inputs = inputs
        return entry


class _OptimizerSnapshot:
    """The inner optimizer's state (a deep copy of its ``state_dict``) and the
    parameters, before its step (``scaled_update="rerun"``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
        self.state = copy.deepcopy(optimizer.state_dict())
        self.params = [p.detach().clone() for p in params]

    def restore(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
        optimizer.load_state_dict(self.state)
        torch._foreach_copy_(params, self.params)


class _Plan:
    """What one micro-batch's measurement evaluates."""

    __slots__ = ("evaluated", "call", "rng", "baseline", "spread", "head", "tail")

    def __init__(self, evaluated, call: tuple[tuple, dict], rng, baseline) -> None:
        self.evaluated, self.call, self.rng, self.baseline = evaluated, call, rng, baseline
        self.spread: torch.Tensor | None = None
        # a baseline known for the first rows (``head``) and the inputs of the rest
        self.head: torch.Tensor | None = None
        self.tail: Any = None


def _rng_unchanged(rng, devices) -> bool:
    """Whether the CPU and CUDA generators are still in the captured state ``rng``."""
    if rng is None:
        return False
    cpu, cuda = rng
    if not torch.equal(torch.get_rng_state(), cpu):
        return False
    return all(torch.equal(torch.cuda.get_rng_state(d), state) for d, state in cuda.items())


def holds_iterate(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer keeps an iterate of its own besides the parameters
    (schedule-free: z; Lookahead: the slow weights), so that rescaling the parameters
    alone would leave the two apart. Known families, by class name."""
    names = {cls.__name__.lower() for cls in type(optimizer).__mro__}
    return any("schedulefree" in n or "lookahead" in n for n in names)


def _check_supported(optimizer: torch.optim.Optimizer) -> None:
    """Refuse, at construction, optimizers whose ``step`` needs a closure."""
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError(
            "RadiusController cannot wrap LBFGS: its step re-evaluates the loss through "
            "a closure along a line search, so there is no single proposed update to "
            "measure. Use a first-order optimizer, or measure LBFGS steps with "
            "ghoststep.measure(model, inputs, update, step_norm=1.0)"
        )
    if all(hasattr(optimizer, a) for a in ("first_step", "second_step", "base_optimizer")):
        name = type(optimizer).__name__
        raise ValueError(
            f"RadiusController cannot wrap {name}: its step needs a closure (two forward "
            "passes). Wrap its base optimizer instead, which makes the update: "
            f"`sam = {name}(...); sam.base_optimizer = RadiusController("
            "sam.base_optimizer, model)`, then train with sam as usual "
            "(first_step / second_step or step(closure))"
        )


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
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


def _spread(slopes: torch.Tensor) -> torch.Tensor:
    """max_k - min_k (``radius.logit_spread`` without its row check: a NaN or infinite
    slope still gives a non-finite spread, which faults the step). ``amax`` and
    ``amin`` are two vectorized passes; the fused ``torch.aminmax`` over the last dim
    is 5x slower on the CPU (2048 x 8192 logits: 24 ms vs 4.8 ms, 2 threads)."""
    return slopes.amax(-1) - slopes.amin(-1)


def _exchangeable(params: Sequence[torch.Tensor]) -> bool:
    """Plain dense tensors can trade storage; subclasses (DTensor, FSDP) are copied."""
    return all(type(p.data) is torch.Tensor for p in params)


def _exchange(params: Sequence[torch.Tensor], others: list[torch.Tensor]) -> None:
    """Swap the storage of each parameter with ``others[i]`` (no data is copied)."""
    for i, p in enumerate(params):
        mine = p.data
        p.data = others[i]
        others[i] = mine


def _autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def _upper_quantile(spread: torch.Tensor, quantile: float) -> torch.Tensor:
    """The spread whose radius is the lower (1 - q) order statistic of the radii
    (``ghoststep.radius.aggregate(rho, ("quantile", 1 - q))``), without a host sync."""
    if spread.numel() == 0:
        return spread.new_zeros(())
    ordered = spread.sort(descending=True).values
    return ordered[math.floor((1.0 - quantile) * (spread.numel() - 1))]


class _CaptureHook:
    """Forward pre-hook feeding the controller the training batches (``post=False``),
    or forward hook marking the end of a call (``post=True``, for nested calls).

    Holds the controller weakly (the model does not keep it alive). A deep copy or
    pickle of the model (EMA twins, ``torch.save(model)``) gets a disabled hook, so a
    copy's forwards never overwrite the original controller's batch.
    """

    def __init__(self, controller: RadiusController | None, post: bool = False) -> None:
        self._ref = None if controller is None else weakref.ref(controller)
        self._post = post

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, *output) -> None:
        controller = None if self._ref is None else self._ref()
        if controller is None:
            return
        if self._post:
            controller._forward_done(output[0] if output else None)
        else:
            controller._capture_inputs(module, args, kwargs)

    def __deepcopy__(self, memo) -> _CaptureHook:
        return _CaptureHook(None, self._post)

    def __reduce__(self):
        return (_CaptureHook, (None, self._post))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_positive(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


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


def _map_tensors(obj, fn):
    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _leaves(obj) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    _map_tensors(obj, lambda t: out.append(t) or t)
    return out


def _batch_rows(obj) -> int | None:
    """Batch size: the leading size of the first tensor with at least one dimension."""
    if obj is None:
        return None
    for t in _leaves(obj):
        if t.dim() >= 1:
            return int(t.shape[0])
    return None


def _select_rows(obj, idx: torch.Tensor, rows: int):
    def pick(t: torch.Tensor) -> torch.Tensor:
        if t.dim() >= 1 and t.shape[0] == rows:
            return t.index_select(0, idx.to(t.device))
        return t

    return _map_tensors(obj, pick)


def _cat_rows(a, b, rows_a: int, rows_b: int | None):
    """Concatenate two input structures along rows; None if they do not match."""
    if rows_b is None:
        return None
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dim() >= 1 and b.dim() >= 1 and a.shape[0] == rows_a and b.shape[0] == rows_b:
            if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
                return None
            return torch.cat([a, b.to(a.device)], 0)
        return a
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            return None
        out = {}
        for k in a:
            v = _cat_rows(a[k], b[k], rows_a, rows_b)
            if v is None and a[k] is not None:
                return None
            out[k] = v
        return out
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        if len(a) != len(b):
            return None
        parts = []
        for u, w in zip(a, b, strict=True):
            v = _cat_rows(u, w, rows_a, rows_b)
            if v is None and u is not None:
                return None
            parts.append(v)
        return type(a)(parts)
    if type(a) is not type(b):
        return None
    return a
