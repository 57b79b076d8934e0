"""The controller's view of the training loop: forward hooks that remember each
training-mode forward of the model between two optimizer steps (its inputs, the RNG
state before it, the autocast it ran in, what else it depended on, a
fingerprint of its logits, and for ``method="fast"`` the logits), so that ``step()`` can
measure the radius on the function the gradient came from without the user passing it.

Is the function measured at ``step()`` the one that produced the gradient?

A training forward depends on more than the parameters and the torch RNG: each
submodule's train / eval flag, its input tensors and the model's buffers (all of which
the loop can change between ``backward()`` and ``step()``; a forward can change its own
buffers, e.g. a MoCo queue). :func:`record` keeps the flags and the tensors' version
counters (``t._version``, bumped by every in-place op) at the training forward;
:func:`changes` names what changed since; :func:`flags_as` runs the measurement with the
recorded flags. :class:`Watch` warns once per cause, and when the step scale stays
near 0 (a frozen run is never silent).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..evaluation._directional import tf32_allowed
from ..evaluation._outputs import LayoutError, LogitsReader, fingerprint, logits_reader
from ..evaluation._replay import (
    AutocastState,
    Call,
    autocast_state,
    batch_coupled,
    capture_rng,
    plain_value,
)

__all__ = [
    "Captured",
    "ForwardCapture",
    "Recorded",
    "Watch",
    "changes",
    "check_single_controller",
    "flags_as",
    "record",
]


class Captured:
    """One training forward: its inputs, the RNG state before it (torch's, Python's and
    NumPy's), the autocast it ran under (``((device_type, dtype), ...)``, empty without
    autocast; the one in effect inside the model's forward, e.g. Accelerate's, when it
    differs from the one around the call), whether its logits are coarse (autocast, TF32
    on CUDA, or a compiled forward: not the eager float32 function "fast" differences
    against), its flags and version counters (``recorded``), a per-position fingerprint
    of its logits ((..., 4): a few fixed classes), (when kept) its detached logits, and the
    targets its loss used without passing them to the model (``ForwardCapture.targets``;
    None: none)."""

    __slots__ = (
        "args", "kwargs", "inputs", "rng", "autocast", "coarse", "logits", "rows_independent",
        "recorded", "fingerprint", "inside", "targets", "masked", "backward", "reset_seen",
        "__weakref__",
    )  # fmt: skip

    def __init__(
        self, args, kwargs, rng, coarse: bool, autocast: AutocastState = (),
        recorded: Recorded | None = None,
    ) -> None:  # fmt: skip
        self.args, self.kwargs, self.rng, self.coarse = args, kwargs, rng, coarse
        self.autocast = autocast
        self.recorded = recorded
        self.inputs: Any = None
        self.logits: torch.Tensor | None = None
        self.fingerprint: torch.Tensor | None = None
        self.masked: bool | None = None  # some class -inf in its logits (None: unknown)
        self.rows_independent = False  # no RNG drawn, no batch statistics
        self.inside = False  # a submodule's pre-hook has read the autocast inside
        self.targets: Any = None
        self.backward = False  # a backward has run through its outputs (_Backwarded)
        self.reset_seen = False  # kept across one window boundary (new_window)

    @classmethod
    def explicit(cls, inputs) -> Captured:
        """``step(inputs=...)``: no RNG state, no logits."""
        entry = cls((), {}, None, False)
        entry.inputs = inputs
        return entry


class ForwardCapture:
    """Forward hooks on ``model`` collecting :class:`Captured` training forwards.

    Only forwards that can have produced the gradient are captured: the model in train
    mode, gradients enabled, not in inference mode. A ``torch.no_grad()`` metrics
    forward between ``backward()`` and ``step()`` therefore never replaces the batch.

    Args:
        model: the module whose forwards are evaluated (DDP and ``torch.compile``
            unwrapped); its signature replays mixed positional / keyword calls.
        hooked: the module the hooks go on (default ``model``): a compiled module's
            ``OptimizedModule``, so that the hooks run eagerly outside the compiled
            graph; its forwards are marked coarse (compiled numerics).
        micro_batches: ``"last"`` keeps the latest forward, ``"all"`` every one.
        logits_fn: the :class:`LogitsReader` of the measurement (the baseline logits
            ``keep_logits`` keeps are read alike; it watches the loss's gradient), or
            a function picking the logits (read with the class axis last).
        keep_logits: keep each forward's logits (``method="fast"``'s baseline).
        rows_check: also record whether rows are independent (sampling re-uses rows).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        micro_batches: str,
        logits_fn: LogitsReader | Callable[[Any], Any],
        keep_logits: bool,
        rows_check: bool,
        devices: list[int],
        hooked: nn.Module | None = None,
    ) -> None:
        self.model = model
        hooked = model if hooked is None else hooked
        self.compiled = hooked is not model
        self.micro_batches = micro_batches
        self.logits_fn = logits_reader(logits_fn)
        self.keep_logits = keep_logits
        self.rows_check = rows_check
        self.devices = devices  # whose RNG states are captured
        self.entries: list[Captured] = []  # training forwards since the last take()
        self._frames: list[Captured | None] = []  # forwards of the model in progress
        self._measuring = False
        self._targets: Any = None
        self._hooks = [
            hooked.register_forward_pre_hook(_CaptureHook(self), with_kwargs=True),
            hooked.register_forward_hook(
                _CaptureHook(self, post=True), with_kwargs=True, always_call=True
            ),
        ]
        if not self.compiled:
            # Hooks on the root run outside a forward that applies its own autocast
            # (Accelerate and the HF Trainer wrap ``model.forward``); the modules that
            # hold parameters or buffers run inside it and see the precision it used.
            self._hooks += [
                m.register_forward_pre_hook(_CaptureHook(self, inner=True))
                for m in model.modules()
                if m is not model and (m._parameters or m._buffers)
            ]

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __getstate__(self) -> dict[str, Any]:
        # Copied / pickled with the model it hooks (its handles refer to the model's
        # hook dicts, whose _CaptureHook entries copy as disabled hooks).
        state = self.__dict__.copy()
        state["_frames"], state["_measuring"] = [], False  # no forward is in progress
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """The copy re-arms its own hooks: the disabled copies of the original's hooks
        in the copied model's hook dicts (same ids, same order) now feed this capture,
        and the original's hooks are left alone."""
        self.__dict__.update(state)
        for handle in self._hooks:
            hooks = handle.hooks_dict_ref()
            hook = None if hooks is None else hooks.get(handle.id)
            if isinstance(hook, _CaptureHook):
                hook._ref = weakref.ref(self)

    @contextmanager
    def measuring(self):
        """Forwards inside this block are the controller's own: not captured."""
        self._measuring = True
        try:
            yield
        finally:
            self._measuring = False

    @contextmanager
    def targets(self, targets: Any):
        """Training forwards inside this block were scored against ``targets``, which the
        model does not receive (a Hugging Face Trainer pops the labels before the
        forward under label smoothing); their inputs carry them (``Call.targets``)."""
        self._targets = targets
        try:
            yield
        finally:
            self._targets = None

    def new_window(self) -> None:
        """A gradient reset (``zero_grad``): the forwards captured since the last step
        that a backward has already run through belong to a window that ended without a
        step (e.g. ``GradScaler`` skipped it on an fp16 overflow): drop them, and the
        memory they hold (inputs; logits for ``"fast"``). A forward no backward has run
        through yet is kept once: in the order forward, ``zero_grad()``, backward (PyTorch
        tutorials, Lightning's closure) it belongs to the coming step; at the next
        boundary it is dropped too. Held between steps: one window, plus the forwards of
        the coming one that ran before its ``zero_grad``."""
        kept = [entry for entry in self.entries if not (entry.backward or entry.reset_seen)]
        for entry in kept:
            entry.reset_seen = True
        self.entries = kept

    def _gradients_reset(self) -> bool:
        """At a training forward: some captured forward has had its backward, and no
        parameter of the model holds a gradient now, so the gradients were reset
        (``zero_grad(set_to_none=True)`` of the inner optimizer, or ``model.zero_grad()``
        as the Hugging Face Trainer calls it) since that backward: a new window."""
        if not any(entry.backward for entry in self.entries):
            return False  # also: several forwards before one backward stay one window
        return all(p.grad is None for p in self.model.parameters())

    def take(self) -> list[Captured]:
        """The captured forwards (their ``inputs`` set from the call), and forget them."""
        entries, self.entries = self.entries, []
        for entry in entries:
            entry.inputs = replay(self.model, entry)
        return entries

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        entry = None
        if self.model.training and not self._measuring and _builds_graph():
            # The RNG state before the forward: the measurement replays it, so it sees
            # the dropout masks the training forward drew. Logits from autocast, TF32 on
            # CUDA or a compiled graph are too coarse for "fast"'s one-sided difference.
            autocast = autocast_state()
            coarse = bool(autocast) or self.compiled or bool(self.devices and tf32_allowed())
            rng = capture_rng(self.devices, host=True)
            entry = Captured(args, kwargs, rng, coarse, autocast, record(self.model, args, kwargs))
            entry.targets = self._targets
            _ledger(self.model).forwards += 1
            if not self._frames and self._gradients_reset():
                self.new_window()
            if self._frames and self.entries:
                # A call inside a call of the same model is the one with the model's
                # inputs (e.g. Lightning under DDP routes training_step(batch, i)
                # through the module's __call__, and training_step calls self(x)).
                self.entries[-1] = entry
            else:
                if self.micro_batches == "last":
                    self.entries.clear()
                self.entries.append(entry)
        self._frames.append(entry)

    def inner(self) -> None:
        """A submodule's forward starts: the first one of a captured forward records the
        autocast inside the model's forward (the precision the forward computed in)."""
        entry = self._frames[-1] if self._frames else None
        if entry is None or entry.inside:
            return
        entry.inside = True
        autocast = autocast_state()
        if autocast and autocast != entry.autocast:
            entry.autocast, entry.coarse = autocast, True

    def post(self, output) -> None:
        entry = self._frames.pop() if self._frames else None
        if entry is None or output is None or not any(entry is c for c in self.entries):
            return
        _watch_backward(entry, output)
        self.logits_fn.watch(output)  # the loss's gradient tells a pending class axis
        found: list[bool] = []
        try:
            logits = self.logits_fn.read(output, found=found)
        except (TypeError, KeyError, AttributeError, IndexError, LayoutError):
            # not the logits (e.g. a loss), or their class axis is known only after the
            # backward: the measurement does its own baseline
            return
        entry.masked = any(found)
        if not isinstance(logits, torch.Tensor):
            return
        if not self.keep_logits:
            # what "jvp" checks its replay against; "fast" keeps the logits themselves
            entry.fingerprint = fingerprint(logits)
        else:
            entry.logits = logits.detach()
            if self.rows_check:
                # No random number drawn (no active dropout): each row's logits then
                # depend on that row alone, unless a BatchNorm couples the rows.
                entry.rows_independent = _rng_unchanged(
                    entry.rng, self.devices
                ) and not batch_coupled(self.model)


class _Ledger:
    """Per model: a count of its training forwards (monotone; every controller's hook
    adds to it, so one forward may count more than once) and the controller that
    stepped last, held weakly, with the count at that step."""

    __slots__ = ("forwards", "stepper", "at")

    def __init__(self) -> None:
        self.forwards = 0
        self.stepper: weakref.ref | None = None
        self.at = -1


# Keyed weakly by the model (the one the controllers measure): a copied or pickled
# model starts a ledger of its own, and a discarded model takes its ledger with it.
_LEDGERS: weakref.WeakKeyDictionary[nn.Module, _Ledger] = weakref.WeakKeyDictionary()


def _ledger(model: nn.Module) -> _Ledger:
    return _LEDGERS.setdefault(model, _Ledger())


def check_single_controller(controller: Any, model: nn.Module) -> None:
    """Record that ``controller`` steps on ``model``'s training forwards so far; raise if
    another live controller already stepped on them (no training forward since).

    Two controllers on one model (one per optimizer) each measure only their own
    part of the update, while the model moves by the sum of both: each part r <= 1,
    the combined update measured r 2.17, and with "fast" the second controller's
    secant sees the first one's move and scales its parameters to 0. One controller
    over all the optimizers measures the combined update. Sequential use (a new
    controller after new forwards) is fine."""
    book = _ledger(model)
    last = None if book.stepper is None else book.stepper()
    if last is not None and last is not controller and book.at == book.forwards:
        raise RuntimeError(
            "two RadiusControllers stepped on the same training forward of one model: each "
            "measures only its own optimizer's part of the update, but the model moves by "
            "their sum. Wrap all the optimizers in one controller, "
            "`RadiusController([opt_a, opt_b], model)`, which measures and scales their "
            "combined update"
        )
    book.stepper, book.at = weakref.ref(controller), book.forwards


def replay(model: nn.Module, captured: Captured) -> Any:
    """A captured forward call as ``inputs``: the tensor, the tuple of positional
    arguments or the dict of keyword arguments it was called with (mixed ones named by
    the forward's signature) when each argument is a tensor or a Python scalar / string /
    None; else -- one dict, tuple or ``PackedSequence`` argument, lists, nested
    containers, other objects, a call the signature cannot name, or targets the model
    did not receive -- a :class:`~ghoststep.evaluation._replay.Call` of exactly the
    captured arguments."""
    args, kwargs = captured.args, captured.kwargs
    exact = Call(*args, **kwargs)
    if captured.targets is not None:
        return exact.with_targets(captured.targets)
    if not all(plain_value(v) for v in (*args, *kwargs.values())):
        return exact
    if not kwargs:
        if len(args) == 1:
            return args[0] if isinstance(args[0], torch.Tensor) else exact
        return tuple(args)
    if not args:
        return dict(kwargs)
    named = _named(model, args, kwargs)
    return exact if named is None else named


def _named(model: nn.Module, args: tuple, kwargs: dict) -> dict | None:
    """Mixed positional and keyword arguments as one dict of keyword arguments, or None
    where keywords cannot replay the call (it does not bind, or a positional-only or
    ``*args`` parameter takes a positional one)."""
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    params = signature.parameters
    out = {}
    for name, value in bound.arguments.items():
        kind = params[name].kind
        if kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL):
            return None
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def _rng_unchanged(rng, devices) -> bool:
    """Whether the CPU and CUDA generators are still in the captured state ``rng``."""
    if rng is None:
        return False
    cpu, cuda = rng[0], rng[1]
    if not torch.equal(torch.get_rng_state(), cpu):
        return False
    return all(torch.equal(torch.cuda.get_rng_state(d), state) for d, state in cuda.items())


class _Backwarded:
    """A tensor hook on a captured forward's outputs: marks (weakly) that a backward
    has run through them; the gradient passes unchanged."""

    __slots__ = ("_ref",)

    def __init__(self, entry: Captured) -> None:
        self._ref = weakref.ref(entry)

    def __call__(self, grad):
        entry = self._ref()
        if entry is not None:
            entry.backward = True


def _watch_backward(entry: Captured, output: Any) -> None:
    """Hook every output tensor that requires grad (the loss may read any of them)."""
    try:
        leaves = pytree.tree_leaves(output)
    except Exception:  # an output pytree cannot flatten: no marker (kept one window)
        return
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad and leaf.grad_fn is not None:
            leaf.register_hook(_Backwarded(entry))


def _builds_graph() -> bool:
    """Whether a forward now can produce a gradient (grad mode on, not inference)."""
    return torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


class _CaptureHook:
    """Forward pre-hook (``post=False``) or forward hook marking the end of a call
    (``post=True``, for nested calls) of a :class:`ForwardCapture`.

    Holds the capture weakly (the model does not keep the controller alive). A deep copy
    or pickle of the model (EMA twins, ``torch.save(model)``) gets a disabled hook, so a
    copy's forwards never overwrite the original controller's batch.
    """

    def __init__(
        self, capture: ForwardCapture | None, post: bool = False, inner: bool = False
    ) -> None:
        self._ref = None if capture is None else weakref.ref(capture)
        self._post, self._inner = post, inner

    def __call__(self, module: nn.Module, args: tuple, *rest) -> None:
        capture = None if self._ref is None else self._ref()
        if capture is None:
            return
        if self._inner:
            capture.inner()
        elif self._post:
            capture.post(rest[1] if len(rest) > 1 else None)
        else:
            capture.pre(module, args, rest[0])

    def __deepcopy__(self, memo) -> _CaptureHook:
        return _CaptureHook(None, self._post, self._inner)

    def __reduce__(self):
        return (_CaptureHook, (None, self._post, self._inner))


# ----------------------------------------------- the function at step() and its record

_UNTRACKED = -1  # a tensor without a version counter (inference tensors)


class Recorded(NamedTuple):
    """What one training forward ran with: ``flags`` (``m.training`` of every module in
    ``model.modules()`` order), the version counter of every tensor leaf of its
    arguments (``inputs``) and of every buffer the forward can read (``buffers``;
    ``-1``: not tracked, e.g. a train-mode BatchNorm's running statistics, which its
    output does not read)."""

    flags: tuple[bool, ...]
    inputs: tuple[int, ...]
    buffers: tuple[int, ...]


def _version(t: torch.Tensor) -> int:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors have no version counter
        return _UNTRACKED


def _input_leaves(args: tuple, kwargs: dict) -> Iterator[tuple[str, torch.Tensor]]:
    for i, arg in enumerate(args):
        for leaf in pytree.tree_leaves(arg):
            if isinstance(leaf, torch.Tensor):
                yield f"args[{i}]", leaf
    for key, value in kwargs.items():
        for leaf in pytree.tree_leaves(value):
            if isinstance(leaf, torch.Tensor):
                yield repr(key), leaf


def _read_buffers(module: nn.Module) -> bool:
    """Whether the module's output reads its buffers (a train-mode BatchNorm that
    tracks running statistics normalizes with the batch's, and only writes them)."""
    return not (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.training
        and module.track_running_stats
    )


def _buffer_versions(modules: list[nn.Module]) -> tuple[int, ...]:
    return tuple(
        _version(b) if b is not None and _read_buffers(m) else _UNTRACKED
        for m in modules
        for b in m._buffers.values()
    )


def record(model: nn.Module, args: tuple, kwargs: dict) -> Recorded:
    """The flags and version counters of a forward about to run."""
    modules = list(model.modules())
    return Recorded(
        tuple(m.training for m in modules),
        tuple(_version(t) for _, t in _input_leaves(args, kwargs)),
        _buffer_versions(modules),
    )


def changes(model: nn.Module, recorded: Recorded, args: tuple, kwargs: dict) -> list[str]:
    """What changed in place since :func:`record` (inputs and buffers, by name), as
    readable phrases; ``[]``: nothing. Flags are not listed (:func:`flags_as` replays
    them)."""
    found = []
    leaves = list(_input_leaves(args, kwargs))
    if len(leaves) == len(recorded.inputs):
        for (name, t), before in zip(leaves, recorded.inputs):
            now = _version(t)
            if before != _UNTRACKED and now != before:
                found.append(f"input {name} was changed in place (version {before} -> {now})")
    modules = list(model.named_modules())
    now_versions = _buffer_versions([m for _, m in modules])
    if len(now_versions) == len(recorded.buffers) and now_versions != recorded.buffers:
        names = [f"{prefix}.{n}" if prefix else n for prefix, m in modules for n in m._buffers]
        for name, before, now in zip(names, recorded.buffers, now_versions):
            if before != _UNTRACKED and now != before:
                found.append(f"buffer {name!r} was changed in place (version {before} -> {now})")
    return found


@contextlib.contextmanager
def flags_as(model: nn.Module, flags: tuple[bool, ...] | None):
    """Run the block with every module's train / eval flag as recorded (None: as they
    are); the flags of now are put back afterwards."""
    modules = list(model.modules())
    if flags is None or len(flags) != len(modules):
        yield
        return
    now = [m.training for m in modules]
    for m, flag in zip(modules, flags):
        m.training = flag
    try:
        yield
    finally:
        for m, flag in zip(modules, now):
            m.training = flag


_LIKELY = (
    "state the forward reads changed after it ran (an input or buffer changed in place, "
    "also through .data), or the forward draws random numbers outside torch's, Python's "
    "and NumPy's global generators"
)


class Watch:
    """The controller's warnings about the measured function: each cause once, and
    the step scale staying below ``FROZEN_SCALE`` for ``FROZEN_STEPS`` steps."""

    FROZEN_SCALE = 1e-3
    FROZEN_STEPS = 5

    def __init__(self) -> None:
        self.warned: set[str] = set()
        self.small = 0  # consecutive steps with a scale below FROZEN_SCALE

    def warn(self, key: str, message: str) -> None:
        if key in self.warned:
            return
        self.warned.add(key)
        warnings.warn(f"RadiusController: {message}", RuntimeWarning, stacklevel=8)

    def changed(self, causes: list[str], method: str) -> None:
        """Inputs / buffers changed since the training forward (``changes``)."""
        then = "the radius is measured on the function as it is now"
        if method in ("fast", "auto"):
            then += (
                ' (method="fast": against a baseline forward at the old parameters, not '
                "the training forward's logits)"
            )
        self.warn(
            "changed",
            "the function at step() is not the one that produced the gradient: "
            + "; ".join(causes[:3])
            + f" between the training forward and step(); {then} (warned once)",
        )

    def mismatch(self, method: str, gap: float) -> None:
        """The replay at the old parameters does not reproduce the training logits."""
        then = (
            'method="fast" now takes a baseline forward of its own every step'
            if method == "fast"
            else "the radius is measured on the replayed function"
        )
        self.warn(
            "mismatch",
            "replaying the training forward at the old parameters does not reproduce its "
            f"logits (relative gap {gap:.3g}); likely cause: {_LIKELY}; {then} (warned once)",
        )

    def scale(self, scale: float, r_before: float, rho: float, tau: float) -> None:
        """Count steps whose scale is below ``FROZEN_SCALE``; warn at ``FROZEN_STEPS``."""
        self.small = self.small + 1 if scale < self.FROZEN_SCALE else 0
        if self.small != self.FROZEN_STEPS:
            return
        self.warn(
            "frozen",
            f"the step scale has been below {self.FROZEN_SCALE:g} for {self.FROZEN_STEPS} "
            f"steps (now {scale:.3g}: r_before {r_before:.3g}, rho_a {rho:.3g}, tau "
            f"{tau:.3g}), training is nearly frozen. Likely causes: a learning rate far "
            "above what the loss allows (lower it), or a measurement against a stale "
            f"function ({_LIKELY})",
        )
