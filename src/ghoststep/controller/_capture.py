"""The controller's view of the training loop: forward hooks that remember each
training-mode forward of the model between two optimizer steps (its inputs, the RNG
state before it, and for ``method="fast"`` its logits), so that ``step()`` can measure
the radius on the batch the gradient came from without the user passing it.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..evaluation._directional import tf32_allowed
from ..evaluation._inputs import batch_coupled
from ..evaluation._isolation import AutocastState, autocast_state, capture_rng

__all__ = ["Captured", "ForwardCapture", "check_single_controller"]


class Captured:
    """One training forward: its inputs, the RNG state before it, the autocast it ran
    under (``{device_type: dtype}``, empty without autocast), whether its logits are
    coarse (autocast, TF32 on CUDA, or a compiled forward: not the eager float32
    function "fast" differences against), and (when kept) its detached logits."""

    __slots__ = (
        "args", "kwargs", "inputs", "rng", "autocast", "coarse", "logits", "rows_independent",
    )  # fmt: skip

    def __init__(self, args, kwargs, rng, coarse: bool, autocast: AutocastState = ()) -> None:
        self.args, self.kwargs, self.rng, self.coarse = args, kwargs, rng, coarse
        self.autocast = autocast
        self.inputs: Any = None
        self.logits: torch.Tensor | None = None
        self.rows_independent = False  # no RNG drawn, no batch statistics

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
        logits_fn: reads the logits from an output (``keep_logits`` only).
        keep_logits: keep each forward's logits (``method="fast"``'s baseline).
        rows_check: also record whether rows are independent (sampling re-uses rows).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        micro_batches: str,
        logits_fn: Callable[[Any], torch.Tensor],
        keep_logits: bool,
        rows_check: bool,
        devices: list[int],
        hooked: nn.Module | None = None,
    ) -> None:
        self.model = model
        hooked = model if hooked is None else hooked
        self.compiled = hooked is not model
        self.micro_batches = micro_batches
        self.logits_fn = logits_fn
        self.keep_logits = keep_logits
        self.rows_check = rows_check
        self.devices = devices  # whose RNG states are captured
        self.entries: list[Captured] = []  # training forwards since the last take()
        self._frames: list[Captured | None] = []  # forwards of the model in progress
        self._measuring = False
        self._hooks = [
            hooked.register_forward_pre_hook(_CaptureHook(self), with_kwargs=True),
            hooked.register_forward_hook(
                _CaptureHook(self, post=True), with_kwargs=True, always_call=True
            ),
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
            entry = Captured(args, kwargs, capture_rng(self.devices), coarse, autocast)
            _ledger(self.model).forwards += 1
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

    def post(self, output) -> None:
        entry = self._frames.pop() if self._frames else None
        if entry is None or not self.keep_logits or output is None:
            return
        if not any(entry is c for c in self.entries):
            return
        try:
            logits = self.logits_fn(output)
        except (TypeError, KeyError, AttributeError, IndexError):
            return  # not the logits (e.g. a loss): the measurement does its own baseline
        if isinstance(logits, torch.Tensor):
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
    """A captured forward call as ``inputs`` for the slopes (tensor, tuple or dict)."""
    args, kwargs = captured.args, captured.kwargs
    if not kwargs:
        return args[0] if len(args) == 1 else tuple(args)
    if not args:
        return dict(kwargs)
    # Mixed positional and keyword arguments: name the positional ones.
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as err:
        raise RuntimeError(
            f"cannot replay the captured forward call ({err}); pass step(inputs=...)"
        ) from err
    params = signature.parameters
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


def _rng_unchanged(rng, devices) -> bool:
    """Whether the CPU and CUDA generators are still in the captured state ``rng``."""
    if rng is None:
        return False
    cpu, cuda = rng
    if not torch.equal(torch.get_rng_state(), cpu):
        return False
    return all(torch.equal(torch.cuda.get_rng_state(d), state) for d, state in cuda.items())


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

    def __init__(self, capture: ForwardCapture | None, post: bool = False) -> None:
        self._ref = None if capture is None else weakref.ref(capture)
        self._post = post

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, *output) -> None:
        capture = None if self._ref is None else self._ref()
        if capture is None:
            return
        if self._post:
            capture.post(output[0] if output else None)
        else:
            capture.pre(module, args, kwargs)

    def __deepcopy__(self, memo) -> _CaptureHook:
        return _CaptureHook(None, self._post)

    def __reduce__(self):
        return (_CaptureHook, (None, self._post))
