"""Training protocols shared by the spike, archgrid, transformer and resnet experiments.

One loop for every digits run (:func:`controlled_run`, built on
:func:`ghoststep.experiments.common.train`): the optimizer is always wrapped in a
:class:`~ghoststep.RadiusController`, so every run -- plain ones included -- reports
the step length ``tau = ||p||``, the radius ``rho_a`` and ``r = tau / rho_a`` of every
step. What differs between methods is only the wrapper's mode:

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

The transformer experiment adds :class:`AllRadiiController`: the output-logit radius
of the base controller, plus the attention-logit radius ``rho_attn = pi / Delta_attn``
and the FFN kink proxy ``rho_ffn = Q_q(|h| / |h_dot|)`` (paper Section 6.6 and
Appendix 2), all measured along the same update with forward-mode AD.

ResNet-18 / CIFAR-10 has its own epoch loop (:func:`resnet_run`: data on the device,
random-crop + flip augmentation outside the model, so the radius is measured on
exactly the batch the step was computed from).

Reference: P. Sao, "Ghosts of Softmax", arXiv:2603.13552 (2026), Sections 5-6.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ghoststep.controller import RadiusController
from ghoststep.directional import directional, trainable_parameters
from ghoststep.experiments.common import (
    evaluate,
    median_iqr,
    predict,
    progress_bar,
    set_seed,
    torch_threads,
    train,
)
from ghoststep.experiments.data import load_digits_split
from ghoststep.experiments.models import build_model
from ghoststep.radius import logit_spread, radius_from_spread

__all__ = [
    "METHODS",
    "METHOD_LABELS",
    "METHOD_COLORS",
    "RADII",
    "RunRecord",
    "digits",
    "controlled_run",
    "spike_run",
    "spike_schedule",
    "run_jobs",
    "torch_threads",
    "internal_radii",
    "AllRadiiController",
    "post_spike_r",
    "finite_median",
    "summarize_finals",
    "plot_band",
    "pick_device",
    "ResNetRecord",
    "resnet_run",
    "augment_cifar",
]

PI = math.pi
METHODS = ("plain", "clip_grad", "controller")
METHOD_LABELS = {
    "plain": "plain Adam",
    "clip_grad": "Adam + grad clip (‖g‖ ≤ 1)",
    "controller": "ρa-controller (clip, r* = 1)",
}
# the paper's palette: red plain, teal clipping, gold controller
METHOD_COLORS = {"plain": "#c0392b", "clip_grad": "#16a085", "controller": "#d4a017"}
RADII = ("out", "attn", "ffn")


# ----------------------------------------------------------------------------- records


@dataclass
class RunRecord:
    """Everything one digits training run produced.

    Per-step lists have one entry per optimizer step (index = step, from 0). ``tau``
    is the norm of the update the inner optimizer *proposed*; ``r_proposed`` =
    ``tau / rho``; ``r_applied`` = ``scale * r_proposed`` (equal for monitored runs).
    ``lr`` is the effective learning rate ``group lr * scale``. Evaluations are taken
    before training (``eval_steps[0] = 0``) and after every ``eval_every`` steps;
    ``eval_steps`` counts optimizer steps done.
    """

    arch: str
    method: str
    seed: int
    base_lr: float
    factor: float
    steps: int
    spike_at: int | None
    train_loss: list[float] = field(default_factory=list)
    tau: list[float] = field(default_factory=list)
    rho: list[float] = field(default_factory=list)
    r_proposed: list[float] = field(default_factory=list)
    r_applied: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    train_eval_loss: list[float] = field(default_factory=list)
    radii: dict[str, list[float]] = field(default_factory=dict)
    binding: list[str] = field(default_factory=list)
    final_pred_classes: int = 0  # distinct predicted classes on the test set at the end
    skipped: int = 0
    seconds: float = 0.0

    @property
    def final_acc(self) -> float:
        return self.test_acc[-1]

    @property
    def final_loss(self) -> float:
        return self.test_loss[-1]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@functools.lru_cache(maxsize=4)
def digits(split_seed: int = 0):
    """The sklearn digits split (cached: every run of an experiment shares it)."""
    return load_digits_split(seed=split_seed)


def spike_schedule(factor: float, spike_at: int | None) -> Callable[[int], float]:
    """``step -> factor if step >= spike_at else 1`` (constant ``factor`` if spike_at None)."""
    start = 0 if spike_at is None else int(spike_at)
    return lambda step: float(factor) if step >= start else 1.0


def _make_optimizer(name: str, params, lr: float, **kwargs) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, **kwargs)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, **kwargs)
    raise ValueError(f'optimizer must be "adam" or "sgd", got {name!r}')


# ----------------------------------------------------------------------------- the loop


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
        data: a digits ``Split`` (default: :func:`digits`).
        progress: show a progress bar.

    Returns:
        A :class:`RunRecord`.
    """
    data = digits() if data is None else data
    generator = set_seed(seed)
    model = build_model(arch, **dict(model_kwargs or {}))
    inner = _make_optimizer(optimizer, model.parameters(), lr)
    opt = controller_cls(
        inner, model, mode=mode, target_r=target_r, history_size=0, **dict(controller_kwargs or {})
    )
    rec = RunRecord(
        arch=arch,
        method=method or mode,
        seed=seed,
        base_lr=lr,
        factor=factor,
        steps=steps,
        spike_at=spike_at,
    )

    def evaluate_now(done: int) -> None:
        ev = evaluate(model, data.X_test, data.y_test)
        rec.eval_steps.append(done)
        rec.test_acc.append(ev.accuracy)
        rec.test_loss.append(ev.loss)
        if eval_train:
            rec.train_eval_loss.append(evaluate(model, data.X_train, data.y_train).loss)
        if done == steps:
            preds = predict(model, data.X_test).argmax(-1)
            rec.final_pred_classes = int(preds.unique().numel())

    def before(info) -> None:
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=clip_norm)

    def after(info) -> None:
        st = opt.last
        rec.tau.append(st.tau)
        rec.rho.append(st.rho_a)
        rec.r_proposed.append(st.r_before)
        rec.r_applied.append(st.r_after)
        rec.lr.append(info.lr * st.scale)
        radii = getattr(opt, "last_radii", None)
        if radii is not None:
            for key, value in radii.items():
                rec.radii.setdefault(key, []).append(value)
            rec.binding.append(opt.last_binding)
        done = info.step + 1
        if done % eval_every == 0 or done == steps:
            evaluate_now(done)

    t0 = time.perf_counter()
    evaluate_now(0)
    rec.train_loss = train(
        model,
        data,
        opt,
        steps,
        batch_size,
        lr_schedule=spike_schedule(factor, spike_at),
        before_step=before,
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
    >>> len(rec.r_applied), max(rec.r_applied) <= 1.0 + 1e-6
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


def _call_job(job: tuple[Callable[..., Any], dict, int]) -> Any:
    fn, kwargs, threads = job
    torch.set_num_threads(max(threads, 1))  # a worker process: its own thread setting
    return fn(**kwargs)


def run_jobs(
    fn: Callable[..., Any],
    jobs: Sequence[Mapping[str, Any]],
    *,
    workers: int = 1,
    threads: int = 1,
    progress: bool = False,
    desc: str | None = None,
) -> list:
    """``[fn(**job) for job in jobs]``, optionally in ``workers`` spawned processes.

    ``workers == 1`` runs in this process; ``workers > 1`` uses a pool of spawned
    processes; ``workers == 0`` means one worker per CPU core. Each run uses
    ``threads`` torch threads (0: leave the setting alone; in worker processes 0 means
    1). Results come back in job order. Every run seeds itself, so results do not
    depend on ``workers``.
    """
    if workers == 0:
        workers = os.cpu_count() or 1
    jobs = [dict(j) for j in jobs]
    bar = progress_bar(total=len(jobs), desc=desc, enabled=progress)
    try:
        if workers <= 1 or len(jobs) <= 1:
            out = []
            with torch_threads(threads):
                for job in jobs:
                    out.append(fn(**job))
                    bar.update(1)
            return out
        import concurrent.futures as cf
        import multiprocessing as mp

        results: list = [None] * len(jobs)
        with cf.ProcessPoolExecutor(
            max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn")
        ) as pool:
            futures = {pool.submit(_call_job, (fn, job, threads)): i for i, job in enumerate(jobs)}
            for fut in cf.as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update(1)
        return results
    finally:
        bar.close()


# ----------------------------------------------------------------------------- internal radii


def internal_radii(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    direction: Sequence[torch.Tensor | None],
    *,
    ffn_quantile: float = 0.01,
) -> dict[str, float]:
    """Attention and FFN radii of a transformer along ``direction``, in units of t.

    One forward-mode JVP of ``model(inputs, return_internals=True)`` (the models in
    :mod:`~ghoststep.experiments.models` return their pre-softmax attention logits
    ``s`` (B, H, T, T) and FFN pre-activations ``h`` (B, T, d_ff) per layer) gives the
    tangents ``s_dot``, ``h_dot`` along v. Then

    * ``attn``: ``pi / max(max_keys s_dot - min_keys s_dot)`` over layers, heads,
      queries and samples (the softmax-ghost bound of every attention row);
    * ``ffn``: the ``ffn_quantile`` quantile of ``|h| / |h_dot|`` over every
      pre-activation entry with ``h_dot != 0`` (the distance to the ReLU kink,
      paper Appendix 2; a conservative proxy, not a bound).

    ``direction`` is aligned with the model's trainable parameters (None: zero); it
    need not have unit norm: divide the radii by ``||direction||`` for unit units.
    Parameters, buffers and the RNG are left untouched; no autograd graph is built.
    """
    named = trainable_parameters(model)
    if len(direction) != len(named):
        raise ValueError(f"direction has {len(direction)} parts for {len(named)} parameters")

    def internals(out):
        return out[1]["attention_logits"], out[1]["ffn_preacts"]

    (_, pre), (dscores, dpre) = directional(
        model, (inputs,), {"return_internals": True}, list(direction), output_fn=internals
    )
    spread = max((float(logit_spread(d).max()) for d in dscores), default=0.0)
    rho_attn = radius_from_spread(spread)
    h = torch.cat([p.reshape(-1) for p in pre]).double()
    dh = torch.cat([d.reshape(-1) for d in dpre]).double().abs()
    moving = dh > 0
    if bool(moving.any()):
        ratio = h[moving].abs() / dh[moving]
        k = max(1, int(math.ceil(ffn_quantile * ratio.numel())))
        rho_ffn = float(ratio.kthvalue(k).values)
    else:
        rho_ffn = math.inf
    return {"attn": rho_attn, "ffn": rho_ffn}


def _internal_radii_hook(model, inputs, update, *, ffn_quantile: float) -> dict[str, float]:
    """``RadiusController(extra_radii=...)`` hook: attention and FFN radii along p."""
    return internal_radii(
        model, inputs[0] if isinstance(inputs, tuple) else inputs, update, ffn_quantile=ffn_quantile
    )


class AllRadiiController(RadiusController):
    """A :class:`~ghoststep.RadiusController` whose radius is ``min`` over several terms.

    Every step it measures the output-logit radius ``rho_out`` exactly as the base
    controller does, plus the attention and FFN radii of :func:`internal_radii` along
    the same update (through the controller's ``extra_radii`` hook), and uses
    ``rho_net = min(rho_x for x in use)`` (``limit_by``). All three radii and the
    binding term are kept in ``last_radii`` / ``last_binding`` whatever ``use`` is, so
    an output-only controller (``use=("out",)``) or a monitored run still reports
    them. This is the paper's all-radii controller of Section 6.6
    (``use=("out", "attn", "ffn")``, the default).

    Args:
        use: the radii that limit the step, a subset of ``("out", "attn", "ffn")``.
        ffn_quantile: quantile q of ``Q_q(|h| / |h_dot|)``.
        Everything else: as :class:`~ghoststep.RadiusController`.
    """

    def __init__(
        self, optimizer, model, *, use: Sequence[str] = RADII, ffn_quantile: float = 0.01, **kwargs
    ) -> None:
        unknown = set(use) - set(RADII)
        if unknown or not use:
            raise ValueError(f"use must be a non-empty subset of {RADII}, got {use!r}")
        if not 0.0 < ffn_quantile <= 1.0:
            raise ValueError(f"ffn_quantile must be in (0, 1], got {ffn_quantile!r}")
        hook = functools.partial(_internal_radii_hook, ffn_quantile=float(ffn_quantile))
        super().__init__(optimizer, model, extra_radii=hook, limit_by=tuple(use), **kwargs)
        self.use = tuple(use)
        self.ffn_quantile = float(ffn_quantile)

    @property
    def last_radii(self) -> dict[str, float] | None:
        return None if self.last is None else self.last.radii

    @property
    def last_binding(self) -> str | None:
        return None if self.last is None else self.last.binding


# ----------------------------------------------------------------------------- summaries


def finite_median(values) -> float:
    """Median of the finite entries (NaN if none)."""
    arr = np.asarray(list(values), dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(np.median(arr)) if arr.size else math.nan


def post_spike_r(rec: RunRecord, spike_at: int | None = None, window: int | None = None) -> float:
    """Median proposed r over the steps from the spike on (optionally only ``window`` steps)."""
    start = rec.spike_at if spike_at is None else spike_at
    values = rec.r_proposed[start:] if window is None else rec.r_proposed[start : start + window]
    return finite_median(values)


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


def plot_band(ax, x, curves, label: str, color: str | None = None, **kwargs) -> None:
    """Median line and IQR band of ``curves`` (seeds x points) against ``x``."""
    arr = np.asarray(curves, dtype=float)
    arr = np.where(np.isfinite(arr), arr, np.nan)
    with np.errstate(all="ignore"):
        med, q25, q75 = median_iqr(arr, axis=0)
    line = ax.plot(x, med, label=label, color=color, **kwargs)[0]
    ax.fill_between(x, q25, q75, color=line.get_color(), alpha=0.2, linewidth=0)


# ----------------------------------------------------------------------------- ResNet / CIFAR


def pick_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def augment_cifar(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip, per image.

    ``generator`` lives on the CPU (the draws are moved to ``x``'s device) so the
    augmentation stream is the same on every device.
    """
    b, c, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(x.device)
    flips = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


@dataclass
class ResNetRecord:
    """One ResNet-18 run: per-epoch test metrics, r at the logged steps."""

    label: str
    seed: int
    lr: float | None
    target_r: float | None
    epochs_done: int = 0
    steps: int = 0
    test_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)  # mean minibatch loss per epoch
    log_steps: list[int] = field(default_factory=list)
    log_epoch: list[int] = field(default_factory=list)
    r: list[float] = field(default_factory=list)  # applied r at the logged steps
    r_proposed: list[float] = field(default_factory=list)
    tau: list[float] = field(default_factory=list)
    rho: list[float] = field(default_factory=list)
    lr_eff: list[float] = field(default_factory=list)
    seconds: float = 0.0
    step_seconds: float = 0.0

    @property
    def final_acc(self) -> float:
        return self.test_acc[-1] if self.test_acc else math.nan

    @property
    def max_r(self) -> float:
        finite = [v for v in self.r if math.isfinite(v)]
        return max(finite) if finite else math.nan

    def max_r_per_epoch(self, epochs: int) -> list[float]:
        out = []
        for e in range(epochs):
            vals = [v for v, ep in zip(self.r, self.log_epoch) if ep == e and math.isfinite(v)]
            out.append(max(vals) if vals else math.nan)
        return out

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def _evaluate_batched(model, X, y, batch_size: int = 1000):
    was = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for i in range(0, X.shape[0], batch_size):
        logits = model(X[i : i + batch_size])
        total_loss += float(F.cross_entropy(logits, y[i : i + batch_size], reduction="sum"))
        correct += int((logits.argmax(-1) == y[i : i + batch_size]).sum())
    model.train(was)
    n = X.shape[0]
    return total_loss / n, correct / n


def resnet_run(
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_data: tuple[torch.Tensor, torch.Tensor],
    *,
    seed: int,
    lr: float | None = None,
    target_r: float | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    augment: bool = True,
    width: int = 64,
    log_every: int = 50,
    measure_rows: int = 256,
    max_steps_per_epoch: int | None = None,
    set_base_lr: float = 0.1,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> ResNetRecord:
    """ResNet-18 on CIFAR-10 with SGD + momentum: a fixed ``lr`` or a set-controller.

    Exactly one of ``lr`` (fixed learning rate, r monitored every ``log_every`` steps of
    an epoch) and ``target_r`` (``RadiusController(mode="set", target_r=...)`` every
    step: ``tau = r* rho_a`` along the momentum update; ``set_base_lr`` only sets the
    inner optimizer's nominal rate) must be given. The radius is measured on (at most
    ``measure_rows`` rows of) the current training batch, along the actual update
    ``p`` (momentum and weight decay included). The monitor shares the inner
    optimizer: on logged steps ``monitor.step()`` (s = 1, bitwise the plain step), on
    the others ``inner.step()``.

    Returns:
        A :class:`ResNetRecord` (test loss / accuracy after each epoch, r at logged steps).
    """
    if (lr is None) == (target_r is None):
        raise ValueError("give exactly one of lr (fixed) and target_r (set-controller)")
    device = torch.device(device)
    generator = set_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 10_000)
    model = build_model("resnet18", width=width).to(device)
    inner = torch.optim.SGD(
        model.parameters(),
        lr=set_base_lr if lr is None else lr,
        momentum=momentum,
        weight_decay=weight_decay,
    )
    subset = measure_rows if measure_rows < batch_size else None
    if target_r is not None:
        opt = RadiusController(
            inner, model, mode="set", target_r=target_r, subset=subset, history_size=0, seed=seed
        )
        label = f"set r*={target_r:g}"
    else:
        opt = RadiusController(
            inner, model, mode="monitor", subset=subset, history_size=0, seed=seed
        )
        label = f"lr={lr:g}"
    rec = ResNetRecord(label=label, seed=seed, lr=lr, target_r=target_r)
    X, y = train_data
    X, y = X.to(device), y.to(device)
    Xt, yt = test_data[0].to(device), test_data[1].to(device)
    n = X.shape[0]
    per_epoch = n // batch_size
    if max_steps_per_epoch is not None:
        per_epoch = min(per_epoch, max_steps_per_epoch)
    if per_epoch < 1:
        raise ValueError(f"{n} training images are fewer than one batch of {batch_size}")
    t0 = time.perf_counter()
    step = 0
    bar = progress_bar(
        total=epochs * per_epoch, desc=f"resnet {label} seed {seed}", enabled=progress
    )
    model.train()
    train_seconds = 0.0
    for epoch in range(epochs):
        te = time.perf_counter()
        order = torch.randperm(n, generator=generator).to(device)
        losses = []
        for i in range(per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            xb, yb = X[idx], y[idx]
            if augment:
                xb = augment_cifar(xb, aug_gen)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            logged = i % log_every == 0
            if target_r is not None or logged:
                opt.step()
                st = opt.last
                if logged:
                    rec.log_steps.append(step)
                    rec.log_epoch.append(epoch)
                    rec.r.append(st.r_after)
                    rec.r_proposed.append(st.r_before)
                    rec.tau.append(st.tau * st.scale)
                    rec.rho.append(st.rho_a)
                    rec.lr_eff.append(inner.param_groups[0]["lr"] * st.scale)
            else:
                inner.step()
            losses.append(loss.detach())
            step += 1
            bar.update(1)
        rec.train_loss.append(float(torch.stack(losses).mean()))  # syncs the device
        train_seconds += time.perf_counter() - te
        test_loss, test_acc = _evaluate_batched(model, Xt, yt)
        rec.test_loss.append(test_loss)
        rec.test_acc.append(test_acc)
        rec.epochs_done = epoch + 1
    bar.close()
    opt.close()
    rec.steps = step
    rec.seconds = time.perf_counter() - t0
    rec.step_seconds = train_seconds / max(step, 1)
    return rec
