"""The one training loop of the experiments, and the summaries of their runs.

:func:`loop` is the one training loop of the experiments, with hooks (before and
after the backward, around the optimizer step); :func:`train` runs it over shuffled
minibatches of a data set, and the ResNet-18 and language-model experiments run it
over their own batches. :func:`controlled_run` is the digits run of the spike,
archgrid and transformer experiments: the optimizer is always wrapped in
a :class:`~ghoststep.RadiusController`, so every run -- plain ones included --
records one :class:`~ghoststep.monitor.StepStats` per step (through a
:class:`~ghoststep.monitor.CallbackSink`), and every per-step column of a
:class:`RunRecord` is derived from those records. What differs between methods is
only the wrapper's mode:

=============  ===================================================================
``plain``      ``mode="monitor"``: the parameters are bitwise those of the bare
               optimizer (the controller's identity guarantee); r is recorded.
``clip_grad``  monitor, plus ``torch.nn.utils.clip_grad_norm_(max_norm=1)`` before
               the optimizer step (the paper's gradient-clipping baseline).
``controller`` ``mode="clip"``, ``target_r=1``: ``s = min(1, rho_a / ||p||)``
               (paper Prop. 5.2).
=============  ===================================================================

A learning-rate spike is the ``lr_schedule`` multiplier of ``train``:
``factor if spike_at <= step < spike_at + spike_steps else 1`` (steps count from 0, so
``spike_at=50`` gives 50 steps at ``eta0`` and then ``factor * eta0``). ``spike_steps``
None holds the spike to the end of the run (the paper's Fig. 6 protocol); ``1`` is the
one-step spike of the paper's published code for Fig. 10 / Table 1.

Beyond the paper's three methods, :func:`controlled_run` takes any base optimizer
(``"adam"``, ``"sgd"``, ``"sgdm"``, ``"lion"`` or a factory), a ``grad_transform``
applied to the gradients before each step (adaptive clipping baselines), and
``wrap=False`` to train the bare optimizer (no radius measured; for wall-clock costs).

Reference: P. Sao, "Ghosts of Softmax", arXiv:2603.13552 (2026), Sections 5-6.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ghoststep.controller import RadiusController
from ghoststep.monitor import CallbackSink, StepStats
from ghoststep_lab.common.data import digits
from ghoststep_lab.common.models import build_model
from ghoststep_lab.common.runner import progress_bar

__all__ = [
    "METHODS",
    "StepInfo",
    "Evaluation",
    "RunRecord",
    "set_seed",
    "loop",
    "train",
    "predict",
    "evaluate",
    "spike_schedule",
    "make_optimizer",
    "controlled_run",
    "spike_run",
    "sig",
    "median_iqr",
    "finite_median",
    "post_spike_r",
    "summarize_finals",
    "recovery_steps",
    "token_cross_entropy",
]

METHODS = ("plain", "clip_grad", "controller")


# ----------------------------------------------------------------------------- the plain loop


def set_seed(seed: int) -> torch.Generator:
    """Seed torch's global RNG (model init, dropout) and return a fresh seeded generator
    for data order. ``torch.set_num_threads`` is left alone."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass
class StepInfo:
    """What :func:`loop` passes to its hooks.

    ``loss_tensor`` is the reported minibatch loss of the step, detached (0-d, on the
    model's device; reading ``loss`` syncs it to a float); ``objective`` the detached
    objective that was backpropagated (the same tensor unless ``forward`` returns a
    pair); ``lr`` the first param group's learning rate used for this step;
    ``seconds`` the wall clock from the batch in hand to after the optimizer step
    (set before ``on_step``).
    """

    step: int
    loss_tensor: torch.Tensor
    lr: float
    inputs: torch.Tensor
    targets: torch.Tensor
    model: torch.nn.Module
    optimizer: Any
    objective: torch.Tensor | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return float(self.loss_tensor)


class Evaluation(NamedTuple):
    loss: float  # mean cross-entropy, nats
    accuracy: float  # fraction in [0, 1]


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position: logits ``(..., V)``, targets ``(...)``
    (a language model's ``(B, T, V)`` and ``(B, T)``; equals ``F.cross_entropy`` on 2-D)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _xy(data) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(data, "X_train"):
        return data.X_train, data.y_train
    return data[0], data[1]


def _batches_forever(X, y, batch_size, generator):
    n = X.shape[0]
    if batch_size >= n:
        while True:
            yield X, y
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield X[idx], y[idx]


def _set_lr(optimizer, base_lrs: Sequence[float], factor: float) -> None:
    for group, lr0 in zip(optimizer.param_groups, base_lrs):
        group["lr"] = lr0 * factor


Hook = Callable[[StepInfo], Any]


def _lr_hooks(optimizer, lr_schedule):
    """(multiplier, scheduler) of ``lr_schedule`` and the base learning rates."""
    scheduler = lr_schedule if hasattr(lr_schedule, "step") else None
    multiplier = lr_schedule if scheduler is None else None
    return multiplier, scheduler, [g["lr"] for g in optimizer.param_groups]


def _objective(model, xb, yb, forward, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    if forward is None:
        loss = loss_fn(model(xb), yb)
        return loss, loss
    out = forward(xb, yb)
    return out if isinstance(out, tuple) else (out, out)


def loop(
    model: torch.nn.Module,
    optimizer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    *,
    lr_schedule: Callable[[int], float] | Any | None = None,
    forward: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    after_loss: Hook | None = None,
    before_step: Hook | None = None,
    optimizer_step: Hook | None = None,
    on_step: Hook | None = None,
    start_step: int = 0,
    progress: bool = False,
    desc: str | None = None,
) -> None:
    """The one training loop of the experiments (digits runs, ResNet-18, the LMs).

    Each step, in this order: set the learning rates from ``lr_schedule``, draw
    ``(inputs, targets) = next(batches)``, ``zero_grad``, forward (``loss_fn(model(x),
    y)``, or ``forward(x, y)`` returning the objective or ``(objective, reported
    loss)``), ``after_loss(info)``, backward, ``before_step(info)``, the optimizer
    step (``optimizer_step(info)``, default ``optimizer.step()``), the scheduler's
    step, ``on_step(info)``. ``after_loss`` or ``on_step`` returning ``"stop"`` ends
    training (``after_loss``: before that step's backward). The model is put in train
    mode once, at the start.

    Args:
        model: the trained module (its forward gives logits unless ``forward`` is given).
        optimizer: a ``torch.optim.Optimizer`` or wrapper (e.g. ``RadiusController``).
        batches: an iterator of ``(inputs, targets)``; one item per step, drawn lazily
            (an RNG it shares with the hooks is used in step order).
        steps: number of steps.
        lr_schedule: a callable ``step -> multiplier`` of every param group's
            learning rate as it was when the loop started (e.g. a spike ``lambda s:
            1000.0 if s >= 50 else 1.0``), or an object with ``.step()`` (a torch LR
            scheduler) stepped after every optimizer step.
        forward: ``(inputs, targets) -> objective | (objective, reported)``.
        loss_fn: ``(logits, targets) -> scalar loss`` when ``forward`` is None.
        after_loss: called after the forward, before backward.
        before_step: called after backward, before the optimizer step (gradients are
            final; snapshot parameters or clip gradients here).
        optimizer_step: replaces ``optimizer.step()`` (e.g. measure only some steps).
        on_step: called after the optimizer step.
        start_step: index of the first step (for continuing a run).
        progress: show a progress bar (:func:`~ghoststep_lab.common.runner.progress_bar`).
        desc: the progress bar's label.
    """
    multiplier, scheduler, base_lrs = _lr_hooks(optimizer, lr_schedule)
    model.train()
    for step in progress_bar(range(start_step, start_step + steps), desc=desc, enabled=progress):
        if multiplier is not None:
            _set_lr(optimizer, base_lrs, float(multiplier(step)))
        xb, yb = next(batches)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        objective, reported = _objective(model, xb, yb, forward, loss_fn)
        lr = optimizer.param_groups[0]["lr"]
        info = StepInfo(step, reported.detach(), lr, xb, yb, model, optimizer, objective.detach())
        if after_loss is not None and after_loss(info) == "stop":
            break
        objective.backward()
        if before_step is not None:
            before_step(info)
        if optimizer_step is None:
            optimizer.step()
        else:
            optimizer_step(info)
        if scheduler is not None:
            scheduler.step()
        info.seconds = time.perf_counter() - t0
        if on_step is not None and on_step(info) == "stop":
            break


def train(
    model: torch.nn.Module,
    data,
    optimizer,
    steps: int,
    batch_size: int,
    lr_schedule: Callable[[int], float] | Any | None = None,
    on_step: Hook | None = None,
    generator: torch.Generator | None = None,
    *,
    before_step: Hook | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    start_step: int = 0,
    progress: bool = False,
    desc: str | None = None,
) -> list[float]:
    """:func:`loop` over shuffled minibatches of a data set (the digits experiments).

    Minibatches are shuffled epochs from ``generator`` (default
    ``torch.Generator().manual_seed(0)``), the full batch when ``batch_size >= N``,
    the last partial batch dropped. ``data``: a ``Split``, an ``(X_train, y_train,
    ...)`` tuple or anything with ``X_train`` and ``y_train``. The other arguments
    are :func:`loop`'s; ``on_step`` returning ``"stop"`` ends training early.

    Returns:
        The per-step minibatch losses (floats; NaN/inf kept as they are).
    """
    X, y = _xy(data)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    losses: list[float] = []

    def record(info: StepInfo) -> Any:
        losses.append(info.loss)
        return None if on_step is None else on_step(info)

    loop(
        model,
        optimizer,
        _batches_forever(X, y, batch_size, generator),
        steps,
        lr_schedule=lr_schedule,
        loss_fn=loss_fn,
        before_step=before_step,
        on_step=record,
        start_step=start_step,
        progress=progress,
        desc=desc,
    )
    return losses


@torch.no_grad()
def predict(model: torch.nn.Module, X: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits ``(N, classes)`` of ``model`` on ``X`` in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        outs = [model(X[i : i + batch_size]) for i in range(0, X.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs)


def evaluate(
    model: torch.nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    batch_size: int = 1024,
) -> Evaluation:
    """Mean loss and accuracy (fraction in [0, 1]) of ``model`` on ``(X, y)`` in eval mode."""
    logits = predict(model, X, batch_size)
    loss = float(loss_fn(logits, y))
    acc = float((logits.argmax(dim=-1) == y).float().mean())
    return Evaluation(loss, acc)


# ----------------------------------------------------------------------------- controlled runs


@dataclass
class RunRecord:
    """Everything one digits training run produced.

    ``stats`` holds the controller's :class:`~ghoststep.monitor.StepStats` of every
    optimizer step (index = step, from 0); the per-step columns ``tau`` (proposed
    update length), ``rho_a``, ``r_before`` (proposed r), ``r_after`` (applied r),
    ``scale`` and ``lr_applied`` (group lr times scale) are read from them (empty for
    a bare, unwrapped run). Evaluations are taken before training (``eval_steps[0] =
    0``) and after every ``eval_every`` steps; ``eval_steps`` counts optimizer steps
    done. ``seconds`` is the whole run's wall clock, ``train_seconds`` the part spent
    outside the evaluations (the optimizer steps, forward and backward included).
    """

    arch: str
    method: str
    seed: int
    base_lr: float
    factor: float
    steps: int
    spike_at: int | None
    spike_steps: int | None = None  # None: the spike is held to the end
    train_loss: list[float] = field(default_factory=list)
    stats: list[StepStats] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    train_eval_loss: list[float] = field(default_factory=list)
    final_pred_classes: int = 0  # distinct predicted classes on the test set at the end
    skipped: int = 0
    seconds: float = 0.0
    train_seconds: float = 0.0

    def column(self, name: str) -> list[float]:
        """One :class:`~ghoststep.monitor.StepStats` field over the steps."""
        return [getattr(s, name) for s in self.stats]

    tau = property(lambda self: self.column("tau"))
    rho_a = property(lambda self: self.column("rho_a"))
    r_before = property(lambda self: self.column("r_before"))
    r_after = property(lambda self: self.column("r_after"))
    scale = property(lambda self: self.column("scale"))

    @property
    def lr_applied(self) -> list[float]:
        """The effective learning rate of each step: group-0 lr times the scale s."""
        return [s.lr * s.scale for s in self.stats]

    @property
    def radii(self) -> dict[str, list[float]]:
        """Every radius of the ``extra_radii`` hook by name, over the steps that had them."""
        with_radii = [s.radii for s in self.stats if s.radii]
        return {k: [r[k] for r in with_radii] for k in (with_radii[0] if with_radii else ())}

    @property
    def binding(self) -> list[str]:
        """The smallest radius's name at each step that had radii."""
        return [s.binding for s in self.stats if s.radii]

    @property
    def final_acc(self) -> float:
        return self.test_acc[-1]

    @property
    def final_loss(self) -> float:
        return self.test_loss[-1]


def spike_schedule(
    factor: float, spike_at: int | None, spike_steps: int | None = None
) -> Callable[[int], float]:
    """``step -> factor`` on the spiked steps ``spike_at <= step < spike_at + spike_steps``,
    else 1.

    ``spike_steps`` None holds the spike to the end (paper Fig. 6); ``1`` multiplies one
    step (the paper's published code for Fig. 10 / Table 1). ``spike_at`` None: from
    the start.
    """
    if spike_steps is not None and int(spike_steps) < 1:
        raise ValueError(f"spike_steps must be >= 1 or None, got {spike_steps!r}")
    start = 0 if spike_at is None else int(spike_at)
    stop = math.inf if spike_steps is None else start + int(spike_steps)
    return lambda step: float(factor) if start <= step < stop else 1.0


OPTIMIZERS = ("adam", "sgd", "sgdm", "lion")


def make_optimizer(name: str | Callable[..., Any], params, lr: float) -> torch.optim.Optimizer:
    """The base optimizer ``name`` at learning rate ``lr``.

    ``"adam"``: ``torch.optim.Adam`` (betas 0.9, 0.999); ``"sgd"``: plain SGD;
    ``"sgdm"``: SGD with momentum 0.9; ``"lion"``: ``pytorch_optimizer.Lion`` (betas
    0.9, 0.99, no weight decay; needs the ``baselines`` extra). A callable is a
    factory ``name(params, lr)``.
    """
    if callable(name):
        return name(params, lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "sgdm":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "lion":
        from pytorch_optimizer import Lion

        return Lion(params, lr=lr)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS} or a factory, got {name!r}")


def _record_evaluation(
    rec: RunRecord, model, data, done: int, eval_train: bool, loss_fn=F.cross_entropy
) -> None:
    """Append the test (and optionally train) evaluation after ``done`` steps to ``rec``."""
    ev = evaluate(model, data.X_test, data.y_test, loss_fn)
    rec.eval_steps.append(done)
    rec.test_acc.append(ev.accuracy)
    rec.test_loss.append(ev.loss)
    if eval_train:
        rec.train_eval_loss.append(evaluate(model, data.X_train, data.y_train, loss_fn).loss)
    if done == rec.steps:
        preds = predict(model, data.X_test).argmax(-1)
        rec.final_pred_classes = int(preds.unique().numel())


def _grad_hook(model, clip_norm: float | None, grad_transform) -> Callable | None:
    """The ``before_step`` hook: fixed-norm clipping or a fresh ``grad_transform()``."""
    if clip_norm is not None and grad_transform is not None:
        raise ValueError("pass clip_norm or grad_transform, not both")
    if clip_norm is not None:
        return lambda info: torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    if grad_transform is not None:
        transform = grad_transform()  # one per run: adaptive clippers keep state
        return lambda info: transform(model)
    return None


def controlled_run(
    arch: str,
    *,
    seed: int,
    lr: float,
    steps: int,
    batch_size: int,
    mode: str = "monitor",
    target_r: float = 1.0,
    factor: float = 1.0,
    spike_at: int | None = None,
    spike_steps: int | None = None,
    clip_norm: float | None = None,
    grad_transform: Callable[[], Callable[[torch.nn.Module], Any]] | None = None,
    eval_every: int = 1,
    eval_train: bool = False,
    optimizer: str | Callable[..., Any] = "adam",
    wrap: bool = True,
    controller_cls: type[RadiusController] = RadiusController,
    controller_kwargs: Mapping[str, Any] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    method: str | None = None,
    data=None,
    progress: bool = False,
) -> RunRecord:
    """Train ``build_model(arch)`` on digits with a wrapped optimizer; record everything.

    Args:
        arch: a name for :func:`~ghoststep_lab.common.models.build_model`.
        seed: seeds model initialization and data order (the split is fixed by ``data``).
        lr: base learning rate eta0 of the inner optimizer.
        steps: optimizer steps.
        batch_size: minibatch size (the radius is measured on the same minibatch).
        mode: the controller mode (``"monitor"``, ``"clip"``, ``"set"``).
        target_r: r* of the controller.
        factor, spike_at, spike_steps: LR multiplier ``factor`` on ``spike_steps``
            steps from step ``spike_at`` on (see :func:`spike_schedule`).
        clip_norm: if set, ``clip_grad_norm_(max_norm=clip_norm)`` before each step.
        grad_transform: a factory called once per run; what it returns is called with
            the model after backward, before each step (edits the gradients in place).
        eval_every: test evaluation period in steps (plus before training and at the end).
        eval_train: also record the full training-set loss at every evaluation.
        optimizer: a name for :func:`make_optimizer` or a factory ``(params, lr)``.
        wrap: wrap the optimizer in ``controller_cls``; False trains the bare optimizer
            (``mode`` must be ``"monitor"``; nothing per step is recorded).
        controller_cls, controller_kwargs: the wrapper class and extra arguments.
        model_kwargs: passed to ``build_model``.
        loss_fn: ``(logits, targets) -> loss`` for training and evaluation.
        method: label stored in the record (default: the mode).
        data: a ``Split`` (default: :func:`~ghoststep_lab.common.data.digits`).
        progress: show a progress bar.

    Returns:
        A :class:`RunRecord`.
    """
    if not wrap and mode != "monitor":
        raise ValueError(f"wrap=False trains the bare optimizer; mode {mode!r} needs the wrapper")
    data = digits() if data is None else data
    generator = set_seed(seed)
    model = build_model(arch, **dict(model_kwargs or {}))
    rec = RunRecord(arch, method or mode, seed, lr, factor, steps, spike_at, spike_steps)
    opt = inner = make_optimizer(optimizer, model.parameters(), lr)
    if wrap:
        sink = CallbackSink(rec.stats.append)  # every step's StepStats, skipped ones included
        # the experiments measure with the exact JVP unless a run says otherwise
        kwargs = {"mode": mode, "target_r": target_r, "history_size": 0, "method": "jvp"}
        kwargs.update(controller_kwargs or {})
        opt = controller_cls(inner, model, sinks=[sink], **kwargs)
    eval_seconds = [0.0]

    def after(info: StepInfo) -> None:
        done = info.step + 1
        if done % eval_every == 0 or done == steps:
            t = time.perf_counter()
            _record_evaluation(rec, model, data, done, eval_train, loss_fn)
            eval_seconds[0] += time.perf_counter() - t

    _record_evaluation(rec, model, data, 0, eval_train, loss_fn)
    before_step = _grad_hook(model, clip_norm, grad_transform)  # imports happen here
    t0 = time.perf_counter()
    rec.train_loss = train(
        model,
        data,
        opt,
        steps,
        batch_size,
        lr_schedule=spike_schedule(factor, spike_at, spike_steps),
        before_step=before_step,
        on_step=after,
        generator=generator,
        loss_fn=loss_fn,
        progress=progress,
        desc=f"{arch} {rec.method} seed {seed}",
    )
    rec.seconds = time.perf_counter() - t0
    rec.train_seconds = rec.seconds - eval_seconds[0]
    if wrap:
        opt.close()
        rec.skipped = opt.skipped_steps
    return rec


def spike_run(
    arch: str,
    method: str,
    base_lr: float,
    factor: float,
    seed: int,
    *,
    steps: int = 200,
    spike_at: int = 50,
    spike_steps: int | None = None,
    batch_size: int = 64,
    eval_every: int = 1,
    target_r: float = 1.0,
    clip_norm: float = 1.0,
    slope_method: str = "jvp",
    data=None,
    progress: bool = False,
) -> RunRecord:
    """One learning-rate spike run (paper Fig. 6 / Fig. 10): Adam at ``base_lr``, times
    ``factor`` on ``spike_steps`` steps from step ``spike_at`` on (None: to the end),
    with ``method`` in :data:`METHODS`. ``slope_method`` is the controller's ``method=``
    (``"jvp"``, ``"fast"``, ``"fd"``), for the controller and the monitored runs alike.

    >>> rec = spike_run("mlp", "controller", 1e-3, 1000.0, seed=0, steps=6, spike_at=3)
    >>> len(rec.r_after), max(rec.r_after) <= 1.0 + 1e-6
    (6, True)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return controlled_run(
        arch,
        seed=seed,
        lr=base_lr,
        steps=steps,
        batch_size=batch_size,
        mode="clip" if method == "controller" else "monitor",
        target_r=target_r,
        factor=factor,
        spike_at=spike_at,
        spike_steps=spike_steps,
        clip_norm=clip_norm if method == "clip_grad" else None,
        eval_every=eval_every,
        controller_kwargs={"method": slope_method},
        method=method,
        data=data,
        progress=progress,
    )


# ----------------------------------------------------------------------------- summaries


def sig(x: float, digits: int = 3) -> float | str:
    """``x`` rounded to ``digits`` significant digits for tables; non-finite as a string."""
    return float(f"{x:.{digits}g}") if math.isfinite(x) else str(x)


def median_iqr(values, axis: int = 0):
    """Median and interquartile range, ignoring NaNs.

    Args:
        values: a sequence of numbers (e.g. one per seed), or an array whose ``axis``
            indexes seeds (e.g. ``(seeds, steps)`` curves).

    Returns:
        ``(median, q25, q75)``: floats for 1-D input, arrays otherwise.
    """
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise ValueError("median_iqr of an empty sequence")
    med = np.nanmedian(arr, axis=axis)
    q25, q75 = np.nanpercentile(arr, [25, 75], axis=axis)
    if arr.ndim == 1:
        return float(med), float(q25), float(q75)
    return med, q25, q75


def finite_median(values) -> float:
    """Median of the finite entries (NaN if none)."""
    arr = np.asarray(list(values), dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(np.median(arr)) if arr.size else math.nan


def post_spike_r(rec: RunRecord, spike_at: int | None = None, window: int | None = None) -> float:
    """Median proposed r (``r_before``) from the spike on (optionally ``window`` steps)."""
    start = rec.spike_at if spike_at is None else spike_at
    stop = None if window is None else start + window
    return finite_median(rec.r_before[start:stop])


def summarize_finals(records: Sequence[RunRecord], diverge_loss: float = 10.0) -> dict:
    """Median, IQR of final test accuracy and the number of divergent seeds.

    A seed is divergent when its final test loss exceeds ``diverge_loss`` or is not
    finite (paper Table 1's criterion: final loss > 10).
    """
    accs = [r.final_acc for r in records]
    med, q25, q75 = median_iqr(accs)
    divergent = sum(
        1 for r in records if not math.isfinite(r.final_loss) or r.final_loss > diverge_loss
    )
    return {
        "median": med,
        "q25": q25,
        "q75": q75,
        "divergent": divergent,
        "n": len(records),
        "per_seed": accs,
    }


def recovery_steps(rec: RunRecord, fraction: float = 0.9) -> float:
    """Steps after the spike until test accuracy is back to ``fraction`` of its pre-spike
    value (the evaluation at ``spike_at``, before the first spiked step).

    0 when no evaluation after the spike falls below the threshold; ``inf`` when the
    accuracy never returns; NaN without a spike or an evaluation at ``spike_at``.
    Resolution: the evaluation period.
    """
    if rec.spike_at is None or rec.spike_at not in rec.eval_steps:
        return math.nan
    i0 = rec.eval_steps.index(rec.spike_at)
    threshold = fraction * rec.test_acc[i0]
    after = list(zip(rec.eval_steps[i0 + 1 :], rec.test_acc[i0 + 1 :]))
    if all(acc >= threshold for _, acc in after):
        return 0.0
    dropped = False
    for step, acc in after:
        dropped = dropped or acc < threshold
        if dropped and acc >= threshold:
            return float(step - rec.spike_at)
    return math.inf
