"""Shared probes for the one-step experiments (phase, directions, temperature, calibration).

Every one of those experiments does the same three things to a trained digits model:

1. **train** it to a given step count or test accuracy (:func:`pretrain`,
   :func:`train_checkpoints`), optionally with a softmax temperature T inside the loss;
2. **pick a direction** v (the normalized full-batch descent direction,
   :func:`descent_direction`, or a seeded random unit direction,
   ``ghoststep.random_direction``) and measure its radius
   ``rho_a(v) = pi T / max_x Delta a(x; v)`` on the same samples
   (``ghoststep.measure``: ``.rho_a``, per sample ``.rho_samples``, ``exact=True`` for
   the top-2 proxy and the certified exact radius);
3. **probe the real network along v**: the loss, accuracy and predictions after moving
   the parameters to ``theta + tau v`` for a grid of step lengths tau
   (:func:`line_sweep`), its curvature ``v^T H v`` (:func:`curvature_along`), and the
   first tau where the loss ratio reaches 2 (:func:`onset`, :func:`first_crossing`).

Conventions
-----------
* Models are probed **in their current mode**; the experiments put trained models in
  eval mode, so BatchNorm uses its running statistics and the function stepped along,
  the function whose radius is measured and the function evaluated are one and the
  same.
* **Nothing mutates the model.** Shifted parameters are substituted with
  ``torch.func.functional_call``; buffers are cloned inside each call.
* Directions are dicts ``{name: tensor}`` over the trainable parameters (what
  ``ghoststep.evaluation.gradient_direction`` / ``random_direction`` return). The loss
  is mean softmax cross-entropy of ``logits / T``.

>>> import torch
>>> from ghoststep_lab.common.probes import pretrain, descent_direction, line_sweep
>>> net = pretrain("linear", steps=20, seed=0)
>>> X, y = net.data.X_train[:200], net.data.y_train[:200]
>>> v = descent_direction(net.model, X, y)
>>> sweep = line_sweep(net.model, X, y, v, torch.tensor([0.0, 0.1]))
>>> bool(sweep.loss[1] < sweep.loss0)   # a short gradient step lowers the loss
True
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ghoststep.evaluation import call_at, gradient_direction, resolve_direction
from ghoststep_lab.common.data import Split, digits
from ghoststep_lab.common.models import build_model
from ghoststep_lab.common.training import evaluate, set_seed, train

__all__ = [
    "Checkpoint",
    "LineSweep",
    "tempered_loss",
    "train_checkpoints",
    "pretrain",
    "descent_direction",
    "line_sweep",
    "curvature_along",
    "quadratic_step",
    "onset",
    "first_crossing",
    "log_grid",
    "distribution",
    "value_at",
    "std_log10",
]


# ----------------------------------------------------------------------------- data


def tempered_loss(temperature: float = 1.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(logits, y) -> cross_entropy(logits / T, y)``; plain cross-entropy at T = 1."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature!r}")
    if temperature == 1.0:
        return F.cross_entropy

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits / temperature, y)

    return loss


# ------------------------------------------------------------------------- training


@dataclass
class Checkpoint:
    """A trained model (eval mode, an independent copy) and where it was taken."""

    model: nn.Module
    arch: str
    seed: int
    step: int
    test_accuracy: float
    test_loss: float
    data: Split
    temperature: float = 1.0
    target_accuracy: float | None = None  # the threshold it was taken for, if any
    losses: list[float] = field(default_factory=list, repr=False)


def train_checkpoints(
    arch: str,
    seed: int,
    *,
    steps: int,
    at_steps: Sequence[int] = (),
    at_accuracy: Sequence[float] = (),
    lr: float = 1e-3,
    batch_size: int = 64,
    temperature: float = 1.0,
    data: Split | None = None,
    model_kwargs: Mapping | None = None,
    progress: bool = False,
) -> list[Checkpoint]:
    """Train ``arch`` with Adam and keep copies of the model along the way.

    A copy is kept after every step listed in ``at_steps`` (0 = the initialization)
    and when the test accuracy first reaches each threshold of ``at_accuracy``
    (then the test set is evaluated after every step). Training stops after
    ``steps`` steps or once every requested checkpoint exists. Thresholds that are
    never reached give no checkpoint.

    Args:
        arch: a name for ``build_model``.
        seed: seeds the initialization and the data order.
        steps: maximum number of Adam steps.
        at_steps: step counts to snapshot.
        at_accuracy: test-accuracy thresholds in [0, 1] to snapshot at first crossing.
        lr, batch_size: Adam learning rate and minibatch size.
        temperature: softmax temperature T inside the training loss.
        data: a digits ``Split`` (default ``digits(0)``).
    Returns:
        Checkpoints ordered by step (each model in eval mode).
    """
    data = digits(0) if data is None else data
    generator = set_seed(seed)
    model = build_model(arch, **dict(model_kwargs or {}))
    loss_fn = tempered_loss(temperature)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    want_steps = sorted({int(s) for s in at_steps if 0 <= int(s) <= steps})
    want_acc = sorted(float(a) for a in at_accuracy)
    out: list[Checkpoint] = []

    def snapshot(step: int, target: float | None, ev=None) -> None:
        ev = ev or evaluate(model, data.X_test, data.y_test, loss_fn)
        copy_ = copy.deepcopy(model).eval()
        out.append(
            Checkpoint(copy_, arch, seed, step, ev.accuracy, ev.loss, data, temperature, target)
        )

    if want_steps and want_steps[0] == 0:
        snapshot(0, None)
        want_steps.pop(0)

    def on_step(info) -> str | None:
        step = info.step + 1
        if want_acc:
            ev = evaluate(model, data.X_test, data.y_test, loss_fn)
            while want_acc and ev.accuracy >= want_acc[0]:
                snapshot(step, want_acc.pop(0), ev)
        if want_steps and step == want_steps[0]:
            snapshot(step, None)
            want_steps.pop(0)
        model.train()
        if not want_steps and not want_acc:
            return "stop"
        return None

    if want_steps or want_acc:
        losses = train(
            model,
            data,
            optimizer,
            steps,
            batch_size,
            on_step=on_step,
            generator=generator,
            loss_fn=loss_fn,
            progress=progress,
            desc=f"train {arch}",
        )
        for ck in out:
            ck.losses = losses[: ck.step]
    out.sort(key=lambda c: c.step)
    return out


def pretrain(
    arch: str,
    steps: int,
    seed: int,
    **kwargs,
) -> Checkpoint:
    """Train ``arch`` for ``steps`` Adam steps (see :func:`train_checkpoints`)."""
    (ck,) = train_checkpoints(arch, seed, steps=steps, at_steps=(steps,), **kwargs)
    return ck


# ----------------------------------------------------------------------- directions


def descent_direction(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, temperature: float = 1.0
) -> dict[str, torch.Tensor]:
    """Unit direction of steepest descent, ``-g / ||g||``, of the mean loss on ``(X, y)``.

    The model runs in its current mode; nothing is mutated (see
    ``ghoststep.evaluation.gradient_direction``).
    """
    g, _ = gradient_direction(model, tempered_loss(temperature), X, y)
    return {n: -t for n, t in g.items()}


# ----------------------------------------------------------------------- line probes


def _shifted_call(model, direction, tau, X, dtype=None):
    """Logits at theta + tau v (``ghoststep.evaluation.call_at``; the model is unchanged)."""
    return call_at(model, (X,), {}, resolve_direction(model, direction), tau, dtype=dtype)


@dataclass
class LineSweep:
    """The real network at ``theta + tau v`` for every tau of a grid.

    Attributes (n = number of taus, N = samples):
        taus: (n,) step lengths.
        loss, accuracy: (n,) mean loss (cross-entropy of logits / T) and accuracy.
        predictions: (n, N) predicted classes.
        sample_loss: (n, N) per-sample losses (None unless asked for).
        loss0, accuracy0, predictions0, sample_loss0: the same at tau = 0.
    """

    taus: torch.Tensor
    loss: torch.Tensor
    accuracy: torch.Tensor
    predictions: torch.Tensor
    loss0: float
    accuracy0: float
    predictions0: torch.Tensor
    sample_loss: torch.Tensor | None = None
    sample_loss0: torch.Tensor | None = None

    @property
    def loss_ratio(self) -> torch.Tensor:
        """Post-step loss / pre-step loss (inf or NaN where the loss blew up)."""
        return self.loss / self.loss0

    @property
    def accuracy_retained(self) -> torch.Tensor:
        """Post-step accuracy / pre-step accuracy."""
        return self.accuracy / self.accuracy0

    @property
    def flip_fraction(self) -> torch.Tensor:
        """Share of samples whose predicted class differs from the one at tau = 0."""
        return (self.predictions != self.predictions0).double().mean(-1)

    @property
    def sample_loss_ratio(self) -> torch.Tensor:
        if self.sample_loss is None or self.sample_loss0 is None:
            raise ValueError("line_sweep(..., per_sample=True) was not asked for")
        return self.sample_loss / self.sample_loss0


@torch.no_grad()
def line_sweep(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    direction,
    taus,
    *,
    temperature: float = 1.0,
    per_sample: bool = False,
    dtype: torch.dtype | None = None,
) -> LineSweep:
    """Loss, accuracy and predictions after moving the parameters by ``tau * v``.

    The real (nonlinear) network is evaluated at ``theta + tau v`` for each tau,
    through ``functional_call`` on the model's current parameters: the model itself
    is never changed. ``v`` is used as given (pass a unit direction for tau to be a
    parameter-space distance; negate the gradient for a descent step).

    Args:
        model: evaluated in its current mode.
        X, y: samples and integer targets.
        direction: dict ``{name: tensor}`` (or a sequence aligned with the trainable
            parameters).
        taus: 1-D step lengths (tensor, array or list).
        temperature: the loss is cross-entropy of ``logits / T``.
        per_sample: also keep every sample's loss.
        dtype: evaluate in this floating dtype (parameters, buffers, direction and
            inputs cast; default: the parameters' own).
    Returns:
        :class:`LineSweep`.
    """
    if dtype is not None:
        X = X.to(dtype)
    taus = torch.as_tensor(np.asarray(taus, dtype=np.float64), dtype=torch.float64).reshape(-1)

    def at(tau: float):
        logits = _shifted_call(model, direction, tau, X, dtype).double()
        losses = F.cross_entropy(logits / temperature, y, reduction="none")
        return losses, logits.argmax(-1)

    l0, p0 = at(0.0)
    losses, preds = zip(*(at(float(t)) for t in taus)) if len(taus) else ((), ())
    losses = torch.stack(losses) if losses else torch.empty(0, len(y), dtype=torch.float64)
    preds = torch.stack(preds) if preds else torch.empty(0, len(y), dtype=torch.long)
    return LineSweep(
        taus=taus,
        loss=losses.mean(-1),
        accuracy=(preds == y).double().mean(-1),
        predictions=preds,
        loss0=float(l0.mean()),
        accuracy0=float((p0 == y).double().mean()),
        predictions0=p0,
        sample_loss=losses if per_sample else None,
        sample_loss0=l0 if per_sample else None,
    )


def curvature_along(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    direction,
    *,
    temperature: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> float:
    """Directional curvature ``kappa(v) = v^T H v`` of the mean loss on ``(X, y)``.

    Computed as the exact second derivative of the line loss
    ``l(tau) = L(theta + tau v)`` at tau = 0 (double backward through a scalar tau),
    which is ``v^T H v`` without forming H. ReLU kinks contribute nothing (the
    generalized Hessian autograd sees). Parameters, buffers, direction and inputs
    are cast to ``dtype`` (float64 by default: along random directions of a trained
    network kappa is small and float32 cancellation would swamp it). The model is
    not mutated.
    """
    with torch.enable_grad():
        tau = torch.zeros((), dtype=dtype, requires_grad=True)
        logits = _shifted_call(model, direction, tau, X.to(dtype), dtype)
        loss = F.cross_entropy(logits / temperature, y)
        (slope,) = torch.autograd.grad(loss, tau, create_graph=True)
        if not slope.requires_grad:  # the loss is linear in tau
            return 0.0
        (curv,) = torch.autograd.grad(slope, tau)
    return float(curv)


def quadratic_step(curvature: float) -> float:
    """The Hessian-implied step ``2 / kappa`` (+inf when kappa <= 0: no quadratic limit)."""
    return 2.0 / curvature if curvature > 0 else math.inf


# ----------------------------------------------------------------------- onsets etc.


def first_crossing(xs, values, threshold: float = 2.0) -> np.ndarray:
    """First x (grid point) where ``values >= threshold``, along axis 0.

    Non-finite values (a loss that overflowed) count as crossed. ``values`` has
    shape (n,) or (n, ...); the result has the trailing shape (NaN = never crossed).
    """
    xs = np.asarray(xs, dtype=float)
    vals = np.asarray(values, dtype=float)
    if vals.shape[0] != xs.shape[0]:
        raise ValueError(f"{xs.shape[0]} grid points but values of shape {vals.shape}")
    hit = (vals >= threshold) | ~np.isfinite(vals)
    first = hit.argmax(axis=0)
    out = xs[first]
    return np.where(hit.any(axis=0), out, np.nan)


def onset(xs, ratios, threshold: float = 2.0) -> float:
    """First grid point where a loss ratio reaches ``threshold`` (NaN if none)."""
    return float(first_crossing(xs, ratios, threshold))


def log_grid(lo: float, hi: float, n: int) -> np.ndarray:
    """``n`` log-spaced points from ``lo`` to ``hi`` (both included)."""
    if not (lo > 0 and hi > lo and n >= 2):
        raise ValueError(f"need 0 < lo < hi and n >= 2, got {lo}, {hi}, {n}")
    return np.logspace(math.log10(lo), math.log10(hi), int(n))


def value_at(xs, values, x: float) -> float:
    """``values`` interpolated linearly in log x at ``x`` (xs increasing, positive)."""
    return float(
        np.interp(math.log10(x), np.log10(np.asarray(xs, float)), np.asarray(values, float))
    )


def distribution(values, percentiles: Sequence[float] = (5, 50, 95)) -> dict:
    """Summary of the finite entries: n, n_nonfinite, min, max, and ``p<q>`` percentiles
    (``median`` = p50)."""
    arr = np.asarray(values, dtype=float).reshape(-1)
    finite = arr[np.isfinite(arr)]
    out: dict = {"n": int(finite.size), "n_nonfinite": int(arr.size - finite.size)}
    if finite.size:
        out["min"] = float(finite.min())
        out["max"] = float(finite.max())
        for q, v in zip(percentiles, np.percentile(finite, list(percentiles))):
            out[f"p{q:g}"] = float(v)
        out["median"] = float(np.median(finite))
    return out


def std_log10(values) -> float:
    """Population standard deviation of log10 of the finite positive values."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr) & (arr > 0)]
    return float(np.std(np.log10(arr))) if arr.size >= 2 else math.nan
