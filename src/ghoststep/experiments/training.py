"""Training loops and summaries shared by the digits experiments.

:func:`train` is the plain minibatch loop. :func:`controlled_run` is the one loop of
the spike, archgrid and transformer experiments: the optimizer is always wrapped in
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
``factor if step >= spike_at else 1`` (steps count from 0, so ``spike_at=50`` gives
50 steps at ``eta0`` and then ``steps - 50`` at ``factor * eta0``).

Reference: P. Sao, "Ghosts of Softmax", arXiv:2603.13552 (2026), Sections 5-6.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ghoststep.controller import RadiusController
from ghoststep.experiments.data import digits
from ghoststep.experiments.models import build_model
from ghoststep.experiments.runner import progress_bar
from ghoststep.monitor import CallbackSink, StepStats

__all__ = [
    "METHODS",
    "StepInfo",
    "Evaluation",
    "RunRecord",
    "set_seed",
    "train",
    "predict",
    "evaluate",
    "spike_schedule",
    "controlled_run",
    "spike_run",
    "sig",
    "median_iqr",
    "finite_median",
    "post_spike_r",
    "summarize_finals",
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
    """What :func:`train` passes to its hooks. ``loss`` is the pre-step minibatch loss;
    ``lr`` the first param group's learning rate used for this step."""

    step: int
    loss: float
    lr: float
    inputs: torch.Tensor
    targets: torch.Tensor
    model: torch.nn.Module
    optimizer: Any
    extra: dict = field(default_factory=dict)


class Evaluation(NamedTuple):
    loss: float  # mean cross-entropy, nats
    accuracy: float  # fraction in [0, 1]


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


def train(
    model: torch.nn.Module,
    data,
    optimizer,
    steps: int,
    batch_size: int,
    lr_schedule: Callable[[int], float] | Any | None = None,
    on_step: Callable[[StepInfo], Any] | None = None,
    generator: torch.Generator | None = None,
    *,
    before_step: Callable[[StepInfo], Any] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    start_step: int = 0,
    progress: bool = False,
    desc: str | None = None,
) -> list[float]:
    """Minibatch training loop shared by the digits experiments.

    Each step: draw a minibatch (shuffled epochs from ``generator``, full batch when
    ``batch_size >= N``, last partial batch dropped), ``zero_grad``, forward,
    ``loss_fn(logits, y)``, backward, ``before_step(info)``, ``optimizer.step()``,
    ``on_step(info)``. The model is put in train mode.

    Args:
        model: maps a batch of inputs to logits.
        data: ``Split`` / ``(X_train, y_train, ...)`` tuple / anything with
            ``X_train`` and ``y_train``.
        optimizer: a ``torch.optim.Optimizer`` or wrapper (e.g. ``RadiusController``).
        steps: number of optimizer steps.
        batch_size: minibatch size.
        lr_schedule: either a callable ``step -> multiplier`` applied to every param
            group's learning rate at the start of the loop (e.g. a spike
            ``lambda s: 1000.0 if s >= 50 else 1.0``), or an object with ``.step()``
            (a torch LR scheduler), stepped after every optimizer step.
        on_step: called after ``optimizer.step()`` with a :class:`StepInfo`; returning
            ``"stop"`` ends training early.
        generator: data-order RNG (default: ``torch.Generator().manual_seed(0)``).
        before_step: called after backward, before ``optimizer.step()`` (gradients
            are final; snapshot parameters or hand the batch to a controller here).
        loss_fn: ``(logits, targets) -> scalar loss``; default cross-entropy.
        start_step: index of the first step (for continuing a run).
        progress: show a progress bar (see :func:`~ghoststep.experiments.runner.progress_bar`).

    Returns:
        The per-step minibatch losses (floats; NaN/inf kept as they are).
    """
    X, y = _xy(data)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    scheduler = lr_schedule if hasattr(lr_schedule, "step") else None
    multiplier = lr_schedule if scheduler is None else None
    batches = _batches_forever(X, y, batch_size, generator)
    losses: list[float] = []
    model.train()
    for step in progress_bar(range(start_step, start_step + steps), desc=desc, enabled=progress):
        if multiplier is not None:
            _set_lr(optimizer, base_lrs, float(multiplier(step)))
        xb, yb = next(batches)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        lr = optimizer.param_groups[0]["lr"]
        info = StepInfo(step, float(loss.detach()), lr, xb, yb, model, optimizer)
        if before_step is not None:
            before_step(info)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(info.loss)
        if on_step is not None and on_step(info) == "stop":
            break
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
    ``scale`` and ``lr_applied`` (group lr times scale) are read from them.
    Evaluations are taken before training (``eval_steps[0] = 0``) and after every
    ``eval_every`` steps; ``eval_steps`` counts optimizer steps done.
    """

    arch: str
    method: str
    seed: int
    base_lr: float
    factor: float
    steps: int
    spike_at: int | None
    train_loss: list[float] = field(default_factory=list)
    stats: list[StepStats] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    train_eval_loss: list[float] = field(default_factory=list)
    final_pred_classes: int = 0  # distinct predicted classes on the test set at the end
    skipped: int = 0
    seconds: float = 0.0

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


def spike_schedule(factor: float, spike_at: int | None) -> Callable[[int], float]:
    """``step -> factor if step >= spike_at else 1`` (constant ``factor`` if spike_at None)."""
    start = 0 if spike_at is None else int(spike_at)
    return lambda step: float(factor) if step >= start else 1.0


def _make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f'optimizer must be "adam" or "sgd", got {name!r}')


def _record_evaluation(rec: RunRecord, model, data, done: int, eval_train: bool) -> None:
    """Append the test (and optionally train) evaluation after ``done`` steps to ``rec``."""
    ev = evaluate(model, data.X_test, data.y_test)
    rec.eval_steps.append(done)
    rec.test_acc.append(ev.accuracy)
    rec.test_loss.append(ev.loss)
    if eval_train:
        rec.train_eval_loss.append(evaluate(model, data.X_train, data.y_train).loss)
    if done == rec.steps:
        preds = predict(model, data.X_test).argmax(-1)
        rec.final_pred_classes = int(preds.unique().numel())


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
    clip_norm: float | None = None,
    eval_every: int = 1,
    eval_train: bool = False,
    optimizer: str = "adam",
    controller_cls: type[RadiusController] = RadiusController,
    controller_kwargs: Mapping[str, Any] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    method: str | None = None,
    data=None,
    progress: bool = False,
) -> RunRecord:
    """Train ``build_model(arch)`` on digits with a wrapped optimizer; record everything.

    Args:
        arch: a name for :func:`~ghoststep.experiments.models.build_model`.
        seed: seeds model initialization and data order (the split is fixed by ``data``).
        lr: base learning rate eta0 of the inner optimizer.
        steps: optimizer steps.
        batch_size: minibatch size (the radius is measured on the same minibatch).
        mode: the controller mode (``"monitor"``, ``"clip"``, ``"set"``).
        target_r: r* of the controller.
        factor, spike_at: LR multiplier ``factor`` from step ``spike_at`` on
            (``spike_at=None``: from the start).
        clip_norm: if set, ``clip_grad_norm_(max_norm=clip_norm)`` before each step.
        eval_every: test evaluation period in steps (plus before training and at the end).
        eval_train: also record the full training-set loss at every evaluation.
        optimizer: ``"adam"`` or ``"sgd"``.
        controller_cls, controller_kwargs: the wrapper class and extra arguments.
        model_kwargs: passed to ``build_model``.
        method: label stored in the record (default: the mode).
        data: a digits ``Split`` (default: :func:`~ghoststep.experiments.data.digits`).
        progress: show a progress bar.

    Returns:
        A :class:`RunRecord`.
    """
    data = digits() if data is None else data
    generator = set_seed(seed)
    model = build_model(arch, **dict(model_kwargs or {}))
    rec = RunRecord(arch, method or mode, seed, lr, factor, steps, spike_at)
    inner = _make_optimizer(optimizer, model.parameters(), lr)
    sink = CallbackSink(rec.stats.append)  # every step's StepStats, skipped ones included
    kwargs = dict(mode=mode, target_r=target_r, history_size=0, **(controller_kwargs or {}))
    opt = controller_cls(inner, model, sinks=[sink], **kwargs)

    def clip(info: StepInfo) -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=clip_norm)

    def after(info: StepInfo) -> None:
        done = info.step + 1
        if done % eval_every == 0 or done == steps:
            _record_evaluation(rec, model, data, done, eval_train)

    t0 = time.perf_counter()
    _record_evaluation(rec, model, data, 0, eval_train)
    rec.train_loss = train(
        model,
        data,
        opt,
        steps,
        batch_size,
        lr_schedule=spike_schedule(factor, spike_at),
        before_step=None if clip_norm is None else clip,
        on_step=after,
        generator=generator,
        progress=progress,
        desc=f"{arch} {rec.method} seed {seed}",
    )
    opt.close()
    rec.skipped = opt.skipped_steps
    rec.seconds = time.perf_counter() - t0
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
    batch_size: int = 64,
    eval_every: int = 1,
    target_r: float = 1.0,
    clip_norm: float = 1.0,
    data=None,
    progress: bool = False,
) -> RunRecord:
    """One learning-rate spike run (paper Fig. 6 / Fig. 10): Adam at ``base_lr``, times
    ``factor`` from step ``spike_at`` on, with ``method`` in :data:`METHODS`.

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
        clip_norm=clip_norm if method == "clip_grad" else None,
        eval_every=eval_every,
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
