"""Directional logit slopes of any PyTorch model, and the radius measurement built on them.

Along a parameter step ``theta + t v`` the logits of every sample move, to first order,
as ``z + a t`` with slopes ``a = J_z(x) v``: one forward-mode Jacobian-vector product
per batch. ``logit_slopes`` computes ``(z, a)``; ``measure`` turns them into the
per-sample spread ``Delta a = max_k a_k - min_k a_k``, the radius ``rho_a = pi T /
Delta a``, the batch radius, its bottleneck sample and the normalized step
``r = ||p|| / rho_a`` (see ``ghoststep.radius`` for the math).

Methods and semantics
---------------------
All evaluation goes through :mod:`ghoststep.directional` (its docstring states what
exactly is differentiated and the side-effect guarantees): the model runs in its
current mode (train-mode BatchNorm uses batch statistics, dropout draws a mask);
parameters, buffers and the RNG stream are left bitwise as they were.

* ``method="jvp"``: forward-mode AD, one pass, exact.
* ``method="fd"``: central difference in float64 (three forwards), a reference.
* ``method="fast"``: one-sided float32 difference through the model's ordinary
  forward (two forwards here; inside the controller one, against the training
  forward's logits). Relative error about 1e-4 to 1e-3 on smooth networks; a secant
  across ReLU / max-pool switches within the step h.

Directions
----------
Only parameters with ``requires_grad=True`` take part, in the order (and with the
names) of ``model.named_parameters()`` (tied weights are listed once, under their
first name). A direction is one of

* a dict ``{name: tensor}`` (or keyed by the parameter objects themselves); every
  trainable parameter needs an entry (``None`` means zero), entries for frozen
  parameters are ignored, unknown names are an error; an alias name of a tied weight
  is accepted;
* a sequence aligned with ``[p for p in model.parameters() if p.requires_grad]``
  (``None`` entries mean zero);
* one flat 1-D tensor of length ``sum(p.numel())`` over that same list, in that order.

Reference: P. Sao, "Ghosts of Softmax", arXiv:2603.13552 (2026), section 3.

>>> import torch
>>> from ghoststep.slopes import logit_slopes, measure, random_direction
>>> _ = torch.manual_seed(0)
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
>>> x = torch.randn(5, 4)
>>> v = random_direction(model, seed=1)
>>> logits, slopes = logit_slopes(model, x, v)
>>> slopes.shape
torch.Size([5, 3])
>>> m = measure(model, x, v, step_norm=0.1)
>>> m.n_samples
5
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ghoststep.directional import (
    METHODS,
    check_chunking,
    chunks,
    cuda_devices,
    default_logits_fn,
    direction_norm,
    directional,
    logits_reader,
    preserved_buffers,
    replay_rng,
    resolve_direction,
    split_inputs,
    trainable_parameters,
)
from ghoststep.directional import (
    fd_step as fd_step_default,
)
from ghoststep.radius import aggregate as _aggregate
from ghoststep.radius import (
    exact_radius,
    logit_spread,
    normalized_step,
    radius_from_spread,
    top2_radius,
)

__all__ = [
    "Measurement",
    "logit_slopes",
    "per_sample_spread",
    "measure",
    "flatten_samples",
    "gradient_direction",
    "random_direction",
    "optimizer_update_direction",
    "direction_norm",
    "trainable_parameters",
]


# ---------------------------------------------------------------------- evaluation


class _Evaluator:
    """``(logits, slopes)`` of slices of the inputs along one resolved direction."""

    def __init__(self, model, direction, method, logits_fn, fd_step):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if fd_step is not None and not (isinstance(fd_step, (int, float)) and fd_step > 0):
            raise ValueError(f"fd_step must be a positive number, got {fd_step!r}")
        self.model = model
        self.method = method
        self.logits_fn = logits_reader(logits_fn)
        self.tangents = resolve_direction(model, direction)
        self.step = fd_step
        if method == "fast" and fd_step is None:  # one step for every chunk
            params = [p.detach() for _, p in trainable_parameters(model)]
            norm = float(direction_norm(self.tangents))
            self.step = fd_step_default(float(direction_norm(params)), norm, params[0].dtype)

    def __call__(self, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return directional(
            self.model,
            args,
            kwargs,
            self.tangents,
            method=self.method,
            output_fn=self.logits_fn,
            step=self.step,
        )


@contextlib.contextmanager
def _guarded(model: nn.Module):
    """no_grad, and a check that the mode is what it was (functional calls never change it)."""
    training = model.training
    try:
        with torch.no_grad():
            yield
    finally:
        if model.training != training:  # pragma: no cover - defensive
            model.train(training)


def logit_slopes(
    model: nn.Module,
    inputs,
    direction,
    *,
    method: str = "jvp",
    logits_fn: Callable[[Any], torch.Tensor] | None = None,
    chunk_size: int | None = None,
    fd_step: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``z`` and directional logit slopes ``a = J_z(x) v`` of every sample.

    Args:
        model: any ``nn.Module``; evaluated in its current mode, without side effects
            (see the module docstring).
        inputs: a tensor, a tuple/list of tensors (positional arguments) or a dict
            (keyword arguments, e.g. ``input_ids``, ``attention_mask``).
        direction: parameter-space direction v (dict, aligned sequence or flat
            tensor; see the module docstring). It need not be unit norm: the slopes
            are linear in v.
        method: ``"jvp"`` (forward-mode AD, exact), ``"fd"`` (float64 central
            difference) or ``"fast"`` (one-sided float32 difference, two forwards).
        logits_fn: maps the model output to the logits tensor; default
            ``default_logits_fn`` (a tensor, ``.logits``, ``["logits"]``, or a Hugging
            Face ``(loss, logits)`` tuple; never a guess). A single logit per sample
            (shape (B,) or (..., 1), a binary classifier) is read as the two-class
            softmax [0, z] (``ghoststep.directional.class_logits``).
        chunk_size: evaluate the input batch in slices of this many rows (dim 0) and
            concatenate. Not allowed when a BatchNorm uses batch statistics (the
            slopes would depend on the chunking).
        fd_step: step h for ``"fd"`` (theta +- h v; default eps^(1/3)/||v||) and
            ``"fast"`` (theta + h v; default ``ghoststep.directional.fd_step``).
    Returns:
        ``(logits, slopes)``, both shaped like the model's logits (e.g. (B, K) or
        (B, T, V)); slopes in logit units per unit of t along v.
    Raises:
        ValueError: bad direction (names the parameter), bad method or chunk_size, no
            trainable parameters.
        TypeError: non-tensor inputs.
        NotImplementedError: an op without forward-mode AD (names it, suggests fixes).
    """
    args, kwargs = split_inputs(inputs)
    evaluator = _Evaluator(model, direction, method, logits_fn, fd_step)
    check_chunking(model, args, kwargs, chunk_size)
    with _guarded(model):
        parts = [evaluator(a, k) for _, _, a, k in chunks(args, kwargs, chunk_size)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ------------------------------------------------------------------- sample handling


def _valid_mask(sample_shape, mask, targets, ignore_index, device) -> torch.Tensor | None:
    keep = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(sample_shape):
            raise ValueError(
                f"mask must have the sample shape {tuple(sample_shape)} (logits without the "
                f"class axis), got {tuple(mask.shape)}"
            )
        keep = mask.to(device=device, dtype=torch.bool)
    if ignore_index is not None:
        if targets is None:
            raise ValueError("ignore_index needs targets")
        not_ignored = targets.to(device) != ignore_index
        keep = not_ignored if keep is None else keep & not_ignored
    return keep


def _check_targets(targets, sample_shape):
    if targets is None:
        return
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be an integer tensor, got {type(targets).__name__}")
    if tuple(targets.shape) != tuple(sample_shape):
        raise ValueError(
            f"targets must have the sample shape {tuple(sample_shape)}, got {tuple(targets.shape)}"
        )


def flatten_samples(
    logits: torch.Tensor, slopes: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of samples: (..., V) -> (N, V), keeping positions where ``mask`` is True.

    Every leading position is one sample (a sequence model's (B, T, V) logits are
    B*T samples), in row-major order.

    Args:
        logits: (..., V).
        slopes: optional, same shape as logits.
        mask: optional bool tensor of shape ``logits.shape[:-1]``; False drops a
            position (padding).
    Returns:
        ``(logits_rows, slopes_rows)`` of shape (N, V); ``slopes_rows`` is None when
        ``slopes`` is None.
    """
    if slopes is not None and slopes.shape != logits.shape:
        raise ValueError(
            f"slopes shape {tuple(slopes.shape)} differs from logits {tuple(logits.shape)}"
        )
    keep = _valid_mask(logits.shape[:-1], mask, None, None, logits.device)
    v = logits.shape[-1]
    rows = logits.reshape(-1, v)
    srows = slopes.reshape(-1, v) if slopes is not None else None
    if keep is not None:
        flat = keep.reshape(-1)
        rows = rows[flat]
        srows = srows[flat] if srows is not None else None
    return rows, srows


def _spread_map(evaluator, model, args, kwargs, chunk_size, want_full: bool):
    """Per-position spread (sample shape); optionally also full logits and slopes.

    With ``want_full=False`` every chunk's tangent is reduced to its spread at once,
    so only one chunk's logits and tangent are alive at a time.
    """
    spreads, logits_parts, slope_parts = [], [], []
    with _guarded(model):
        for _, _, a, k in chunks(args, kwargs, chunk_size):
            logits, slopes = evaluator(a, k)
            spreads.append(logit_spread(slopes))  # NaN for a row with a non-finite slope
            if want_full:
                logits_parts.append(logits)
                slope_parts.append(slopes)
            del logits, slopes
    spread = torch.cat(spreads)
    if want_full:
        return spread, torch.cat(logits_parts), torch.cat(slope_parts)
    return spread, None, None


def per_sample_spread(
    model: nn.Module,
    inputs,
    direction,
    *,
    chunk_size: int | None = None,
    mask: torch.Tensor | None = None,
    method: str = "jvp",
    logits_fn: Callable[[Any], torch.Tensor] | None = None,
    fd_step: float | None = None,
) -> torch.Tensor:
    """Per-sample spread Delta a = max_k a_k - min_k a_k, memory-lean.

    With ``chunk_size`` the input batch is split along dim 0 and each chunk's
    (chunk, ..., V) tangent is reduced to its spread immediately: the full tangent
    is never materialized, so the peak memory is that of one chunk's forward plus
    its tangent (for a (8 x 1024, 50257) language model head and ``chunk_size=1``,
    well under twice the plain forward's peak; see
    ``benchmarks/bench_slopes_memory.py``). Chunking is for models without
    batch-coupled layers (BatchNorm in train mode raises).

    Args:
        model, inputs, direction, method, logits_fn, fd_step: as in ``logit_slopes``.
        chunk_size: rows of the input batch per evaluation (None: one pass).
        mask: optional bool tensor of the sample shape (logits without the class
            axis); False positions are dropped.
    Returns:
        (N,) spreads of the kept samples in row-major (flattened) order.
    """
    args, kwargs = split_inputs(inputs)
    evaluator = _Evaluator(model, direction, method, logits_fn, fd_step)
    check_chunking(model, args, kwargs, chunk_size)
    spread, _, _ = _spread_map(evaluator, model, args, kwargs, chunk_size, want_full=False)
    keep = _valid_mask(spread.shape, mask, None, None, spread.device)
    flat = spread.reshape(-1)
    return flat if keep is None else flat[keep.reshape(-1)]


# ---------------------------------------------------------------------- measurement


def _scalar(x) -> float | None:
    if x is None:
        return None
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _as_list(x: torch.Tensor | None):
    return None if x is None else x.detach().cpu().tolist()


@dataclass(repr=False)
class Measurement:
    """Radius measurement of one batch along one direction.

    Per-sample tensors cover the kept samples (mask / ignore_index applied) in
    flattened row-major order; ``sample_index[i]`` is sample i's position among all
    flattened samples (``torch.unravel_index(sample_index, sample_shape)`` gives
    (b, t)).

    Attributes:
        spread: (N,) Delta a = max_k a_k - min_k a_k (before dividing by T).
        rho: (N,) rho_a = pi T / Delta a (+inf where Delta a = 0).
        rho_batch: aggregate of ``rho`` (``aggregate``: "min" -> pi T / max Delta a).
        bottleneck: flattened-sample index (into all B*T positions) of the sample
            with the largest spread, i.e. the smallest rho_a.
        r: ||p|| / rho_batch when ``step_norm`` was given, else None.
        top2, exact: (N,) top-2 proxy and certified exact radii (``exact=True``), in
            the same units as rho (temperature applied), else None.
    """

    spread: torch.Tensor
    rho: torch.Tensor
    rho_batch: float
    bottleneck: int
    sample_index: torch.Tensor
    sample_shape: tuple[int, ...]
    temperature: float
    aggregate: Any = "min"
    step_norm: float | None = None
    r: float | None = None
    top2: torch.Tensor | None = None
    exact: torch.Tensor | None = None
    method: str = "jvp"

    @property
    def n_samples(self) -> int:
        return int(self.spread.numel())

    @property
    def max_spread(self) -> float:
        return float(self.spread.max()) if self.n_samples else float("nan")

    def __repr__(self) -> str:
        parts = [
            f"n_samples={self.n_samples}",
            f"rho_batch={self.rho_batch:.4g}",
            f"max_spread={self.max_spread:.4g}",
            f"bottleneck={self.bottleneck}",
        ]
        if self.aggregate != "min":
            parts.append(f"aggregate={self.aggregate!r}")
        if self.temperature != 1.0:
            parts.append(f"temperature={self.temperature:g}")
        if self.r is not None:
            parts.append(f"step_norm={self.step_norm:.4g}, r={self.r:.4g}")
        if self.top2 is not None:
            parts.append(f"min_top2={float(self.top2.min()):.4g}")
        if self.exact is not None:
            parts.append(f"min_exact={float(torch.nan_to_num(self.exact, nan=math.inf).min()):.4g}")
        return f"Measurement({', '.join(parts)})"

    def to_dict(self) -> dict:
        """Plain Python floats, ints and lists (``json.dumps`` writes inf as Infinity)."""
        agg = self.aggregate if isinstance(self.aggregate, str) else list(self.aggregate)
        return {
            "n_samples": self.n_samples,
            "sample_shape": list(self.sample_shape),
            "temperature": self.temperature,
            "aggregate": agg,
            "method": self.method,
            "rho_batch": self.rho_batch,
            "max_spread": self.max_spread,
            "bottleneck": self.bottleneck,
            "step_norm": self.step_norm,
            "r": self.r,
            "spread": _as_list(self.spread),
            "rho": _as_list(self.rho),
            "sample_index": _as_list(self.sample_index),
            "top2": _as_list(self.top2),
            "exact": _as_list(self.exact),
        }


def measure(
    model: nn.Module,
    inputs,
    direction,
    *,
    step_norm: float | torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    temperature: float = 1.0,
    aggregate: str | Sequence = "min",
    exact: bool = False,
    mask: torch.Tensor | None = None,
    ignore_index: int | None = None,
    chunk_size: int | None = None,
    method: str = "jvp",
    logits_fn: Callable[[Any], torch.Tensor] | None = None,
    fd_step: float | None = None,
) -> Measurement:
    """Measure the softmax radius of a batch along ``direction``.

    ``rho_a(x) = pi T / Delta a(x)`` per sample, the batch radius
    ``aggregate(rho_a)`` (``"min"`` = pi T / max_x Delta a(x), the guaranteed one;
    or ``("quantile", q)``), the bottleneck sample, and ``r = step_norm / rho_batch``.
    Slopes are per unit of ``direction``, so radii are in units of t along it: for
    the normalized step of an optimizer update p pass ``direction=p`` together with
    ``step_norm=1`` (the step is t = 1), or equivalently the unit direction p / ||p||
    with ``step_norm=||p||``.

    Args:
        model, inputs, method, logits_fn, fd_step: as in ``logit_slopes``.
        direction: the step direction v; radii are in units of t along v, so use a
            unit-norm v for radii in parameter-space distance.
        step_norm: ||p||, the step length along v, for r.
        targets: optional integer targets of the sample shape (for ``ignore_index``
            and the top-2 proxy's class y).
        temperature: softmax temperature T (logits z / T).
        aggregate: "min" or ("quantile", q) (see ``ghoststep.radius.aggregate``).
        exact: also compute per-sample top-2 and certified exact radii (needs the
            full logits and slopes; with ``chunk_size`` they are concatenated).
        mask: bool (sample shape); False positions (padding) are left out of every
            statistic.
        ignore_index: with ``targets``, positions whose target equals it are left out.
        chunk_size: as in ``per_sample_spread`` (the full tangent is never stored
            unless ``exact=True``).
    Returns:
        ``Measurement``.
    """
    if not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    args, kwargs = split_inputs(inputs)
    evaluator = _Evaluator(model, direction, method, logits_fn, fd_step)
    check_chunking(model, args, kwargs, chunk_size)
    spread_map, logits, slopes = _spread_map(
        evaluator, model, args, kwargs, chunk_size, want_full=exact
    )
    sample_shape = tuple(spread_map.shape)
    _check_targets(targets, sample_shape)
    keep = _valid_mask(sample_shape, mask, targets, ignore_index, spread_map.device)
    flat = spread_map.reshape(-1)
    index = torch.arange(flat.numel(), device=flat.device)
    if keep is not None:
        index = index[keep.reshape(-1)]
    if index.numel() == 0:
        raise ValueError("no samples left to measure (the mask removes every position)")
    spread = flat[index]
    if bool(torch.isnan(spread).any()):
        raise ValueError("the slopes are not finite for some samples (NaN/inf in the model?)")
    rho = radius_from_spread(spread, temperature)  # +inf where spread == 0
    rho_batch = _scalar(_aggregate(rho, aggregate))
    bottleneck = int(index[int(torch.argmax(spread))])
    r = None
    if step_norm is not None:
        r = _scalar(normalized_step(step_norm, torch.tensor(rho_batch, dtype=torch.float64)))
        step_norm = _scalar(step_norm)
    top2 = ex = None
    if exact:
        z_rows, a_rows = flatten_samples(logits, slopes, keep)
        z_rows, a_rows = z_rows / temperature, a_rows / temperature
        t_rows = None
        if targets is not None:
            t_rows = targets.to(z_rows.device).reshape(-1)
            t_rows = t_rows if keep is None else t_rows[keep.reshape(-1)]
        top2 = top2_radius(z_rows, a_rows, target=t_rows)
        ex = exact_radius(z_rows, a_rows)
    return Measurement(
        spread=spread,
        rho=rho,
        rho_batch=rho_batch,
        bottleneck=bottleneck,
        sample_index=index,
        sample_shape=sample_shape,
        temperature=float(temperature),
        aggregate=aggregate,
        step_norm=step_norm,
        r=r,
        top2=top2,
        exact=ex,
        method=method,
    )


# ------------------------------------------------------------------------ directions


def _normalize(parts: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    norm = torch.sqrt(sum(t.double().pow(2).sum() for t in parts))
    if float(norm) > 0:
        parts = [(t.double() / norm).to(t.dtype) for t in parts]
    return parts, norm


def gradient_direction(
    model: nn.Module,
    loss,
    inputs=None,
    targets=None,
    *,
    logits_fn: Callable[[Any], torch.Tensor] | None = None,
    normalize: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The (normalized) gradient of a loss as a direction.

    Three ways to give the loss:

    * a scalar tensor still attached to the graph (e.g. the training loss you just
      computed); the graph is kept (``retain_graph=True``) so a later ``backward``
      still works;
    * a callable with no arguments returning that scalar (a closure);
    * a callable ``loss_fn(logits, targets)`` (or ``loss_fn(logits)`` when
      ``targets`` is None) together with ``inputs``: the model is run here, in its
      current mode, with buffers and the RNG state restored afterwards (no side
      effects), e.g. ``gradient_direction(model, F.cross_entropy, x, y)``.

    ``.grad`` fields are not touched (``torch.autograd.grad``). Parameters the loss
    does not reach get a zero component.

    Returns:
        ``(direction, grad_norm)``: a dict ``{name: tensor}`` over the trainable
        parameters (g / ||g||, or g when ``normalize=False``; zeros if g = 0) and
        ||g|| as a 0-d float64 tensor.
    """
    named = trainable_parameters(model)
    params = [p for _, p in named]
    if isinstance(loss, torch.Tensor):
        value, retain = loss, True
    elif callable(loss) and inputs is None:
        value, retain = loss(), False
    elif callable(loss):
        args, kwargs = split_inputs(inputs)
        with replay_rng(cuda_devices(model)), preserved_buffers(model), torch.enable_grad():
            out = (logits_fn or default_logits_fn)(model(*args, **kwargs))
            value = loss(out, targets) if targets is not None else loss(out)
            grads = torch.autograd.grad(value, params, allow_unused=True)
        value, retain = None, False
    else:
        raise TypeError("loss must be a scalar tensor or a callable")
    if value is not None:
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError("the loss must be a scalar tensor")
        if not value.requires_grad:
            raise ValueError(
                "the loss is not attached to an autograd graph (computed under no_grad?)"
            )
        grads = torch.autograd.grad(value, params, allow_unused=True, retain_graph=retain)
    parts = [
        torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)
    ]
    parts, norm = _normalize(parts) if normalize else (parts, None)
    if norm is None:
        norm = torch.sqrt(sum(t.double().pow(2).sum() for t in parts))
    return {n: t for (n, _), t in zip(named, parts, strict=True)}, norm


def random_direction(
    model: nn.Module, seed: int = 0, *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """A random unit direction over the trainable parameters, reproducible by ``seed``.

    Gaussian entries drawn on the CPU from a private ``torch.Generator`` (the global
    RNG is neither used nor advanced), then scaled to unit global L2 norm and moved
    to each parameter's device and dtype (``dtype`` overrides the dtype). The same
    seed gives the same direction on any device.

    Returns:
        dict ``{name: tensor}``.
    """
    named = trainable_parameters(model)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    draws = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for _, p in named]
    norm = torch.sqrt(sum(d.pow(2).sum() for d in draws))
    return {
        n: (d / norm).to(device=p.device, dtype=dtype or p.dtype)
        for (n, p), d in zip(named, draws, strict=True)
    }


def _snapshot(value):
    """(original object, value copy) so a restore keeps object identity."""
    if isinstance(value, torch.Tensor):
        return value, value.detach().clone()
    return value, copy.deepcopy(value)


def _restore(pair):
    original, saved = pair
    if isinstance(original, torch.Tensor):
        with torch.no_grad():
            original.copy_(saved)
        return original
    return saved


def optimizer_update_direction(
    optimizer: torch.optim.Optimizer,
    model: nn.Module | None = None,
    *,
    closure: Callable[[], Any] | None = None,
):
    """The pending update p = what ``optimizer.step()`` would add to each parameter.

    The step is actually taken, the parameter change recorded, and then the
    parameters, the optimizer state (every tensor restored in place, object identity
    kept), the param-group settings and the LR scheduler's step flag are put back
    exactly; ``.grad`` is not touched. The update includes momentum, Adam's
    preconditioning and weight decay. Pass the *inner* optimizer, not a wrapper
    whose ``step`` itself measures or rescales.

    Memory: transiently one copy of every parameter plus one copy of the optimizer
    state (Adam: two more parameter-sized tensors), plus the returned update.

    Args:
        optimizer: a ``torch.optim.Optimizer`` whose gradients are ready.
        model: if given, the result is a dict ``{name: update}`` over the model's
            trainable parameters (zeros for parameters the optimizer does not hold);
            otherwise a list aligned with the optimizer's parameters in param-group
            order (the same as ``model.parameters()`` when the optimizer was built
            from it).
        closure: passed to ``optimizer.step`` (it is evaluated, with its side effects).
    Returns:
        The update p (not normalized; ``direction_norm(p)`` is ||p||).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in params]
    state_keys = list(optimizer.state.keys())
    saved_state = {
        key: {k: _snapshot(v) for k, v in optimizer.state[key].items()} for key in state_keys
    }
    saved_groups = [
        {k: (v, None) if k == "params" else _snapshot(v) for k, v in g.items()}
        for g in optimizer.param_groups
    ]
    missing = object()
    opt_called = getattr(optimizer, "_opt_called", missing)
    try:
        optimizer.step(closure) if closure is not None else optimizer.step()
        with torch.no_grad():
            updates = [p.detach() - b for p, b in zip(params, before, strict=True)]
    finally:
        with torch.no_grad():
            for p, b in zip(params, before, strict=True):
                p.copy_(b)
        for key in list(optimizer.state.keys()):
            if key not in saved_state:
                del optimizer.state[key]
        for key, entries in saved_state.items():
            current = optimizer.state[key]
            current.clear()
            current.update({k: _restore(pair) for k, pair in entries.items()})
        for g, saved in zip(optimizer.param_groups, saved_groups, strict=True):
            g.clear()  # same dict object, same key order as before
            g.update({k: pair[0] if k == "params" else _restore(pair) for k, pair in saved.items()})
        if opt_called is missing:
            if hasattr(optimizer, "_opt_called"):
                del optimizer._opt_called
        else:
            optimizer._opt_called = opt_called
    if model is None:
        return updates
    by_id = {id(p): u for p, u in zip(params, updates, strict=True)}
    return {
        n: by_id[id(p)] if id(p) in by_id else torch.zeros_like(p)
        for n, p in trainable_parameters(model)
    }
