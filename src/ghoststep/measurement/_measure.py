"""The radius measurement of one batch along one direction.

``measure`` evaluates the per-sample logit spread ``Delta a`` (``per_sample_spread``)
and turns it into the per-sample radius ``rho_a = pi T / Delta a``, the batch radius
(an aggregate, by default the minimum), its bottleneck sample and the normalized step
``r = ||p|| / rho_a`` (see ``ghoststep.radius`` for the math); optionally also the
top-2 proxy and the certified exact radius of every sample. The result is a
``Measurement``.

Reference: P. Sao, "Ghosts of Softmax", arXiv:2603.13552 (2026), section 3.

>>> import torch
>>> from ghoststep.evaluation import random_direction
>>> from ghoststep.measurement import measure
>>> _ = torch.manual_seed(0)
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
>>> x = torch.randn(5, 4)
>>> m = measure(model, x, random_direction(model, seed=1), tau=0.1)
>>> m.n_samples
5
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..radius._bounds import (
    aggregate_quantile,
    normalized_step,
    radius_from_spread,
    reduce_spreads,
    top2_radius,
)
from ..radius._checks import check_temperature
from ..radius._ghosts import exact_radius
from ._slopes import flatten_samples, sample_mask, spread_map

__all__ = ["Measurement", "measure"]


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
        rho_samples: (N,) per-sample rho_a = pi T / Delta a (+inf where Delta a = 0).
        rho_a: the batch's radius bound, the aggregate of ``rho_samples``
            (``aggregate``: "min" -> pi T / max Delta a).
        bottleneck: flattened-sample index (into all B*T positions) of the sample
            with the largest spread, i.e. the smallest rho_a.
        tau: ||p||, the step length along the direction, when given, else None.
        r: tau / rho_a when ``tau`` was given, else None.
        top2, exact: (N,) top-2 proxy and certified exact radii (``exact=True``), in
            the same units as rho_a (temperature applied), else None.
    """

    spread: torch.Tensor
    rho_samples: torch.Tensor
    rho_a: float
    bottleneck: int
    sample_index: torch.Tensor
    sample_shape: tuple[int, ...]
    temperature: float
    aggregate: Any = "min"
    tau: float | None = None
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
            f"rho_a={self.rho_a:.4g}",
            f"max_spread={self.max_spread:.4g}",
            f"bottleneck={self.bottleneck}",
        ]
        if self.aggregate != "min":
            parts.append(f"aggregate={self.aggregate!r}")
        if self.temperature != 1.0:
            parts.append(f"temperature={self.temperature:g}")
        if self.r is not None:
            parts.append(f"tau={self.tau:.4g}, r={self.r:.4g}")
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
            "rho_a": self.rho_a,
            "max_spread": self.max_spread,
            "bottleneck": self.bottleneck,
            "tau": self.tau,
            "r": self.r,
            "spread": _as_list(self.spread),
            "rho_samples": _as_list(self.rho_samples),
            "sample_index": _as_list(self.sample_index),
            "top2": _as_list(self.top2),
            "exact": _as_list(self.exact),
        }


def measure(
    model: nn.Module,
    inputs,
    direction,
    *,
    tau: float | torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    temperature: float = 1.0,
    aggregate: str | Sequence = "min",
    exact: bool = False,
    mask: torch.Tensor | None = None,
    ignore_index: int | None = None,
    chunk_size: int | None = None,
    method: str = "jvp",
    logits_fn: Callable[[Any], Any] | None = None,
    secant_step: float | None = None,
    class_dim: int | None = None,
    activation: str | None = None,
) -> Measurement:
    """Measure the softmax radius of a batch along ``direction``.

    ``rho_a(x) = pi T / Delta a(x)`` per sample, the batch radius
    ``aggregate(rho_a)`` (``"min"`` = pi T / max_x Delta a(x), the guaranteed one;
    or ``("quantile", q)``: the radius of the q-quantile spread, q = 1 the min), the
    bottleneck sample, and ``r = tau / rho_a``.
    Slopes are per unit of ``direction``, so radii are in units of t along it: for
    the normalized step of an optimizer update p pass ``direction=p`` together with
    ``tau=1`` (the step is t = 1), or equivalently the unit direction p / ||p||
    with ``tau=||p||``.

    Args:
        model, inputs, method, logits_fn, secant_step, class_dim, activation: as in
            ``logit_slopes`` (``measure`` has no loss to read the class axis from: for
            (B, C, d1, ...) logits pass ``class_dim=1``, or the controller's reader
            as ``logits_fn``, to measure what a ``RadiusController`` bounds).
        direction: the step direction v; radii are in units of t along v, so use a
            unit-norm v for radii in parameter-space distance.
        tau: ||p||, the step length along v, for r.
        targets: optional integer targets of the sample shape (for ``ignore_index``
            and the top-2 proxy's class y).
        temperature: softmax temperature T (logits z / T).
        aggregate: "min" or ("quantile", q) (see ``ghoststep.radius.aggregate``; q is
            a quantile of the spread, as the controller's ``quantile=q``).
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
    check_temperature(temperature, tensor_ok=False)
    spreads, logits, slopes = spread_map(
        model,
        inputs,
        direction,
        want_full=exact,
        chunk_size=chunk_size,
        method=method,
        logits_fn=logits_fn,
        secant_step=secant_step,
        class_dim=class_dim,
        activation=activation,
    )
    index, keep = _kept_samples(spreads, mask, targets, ignore_index)
    found = reduce_spreads(
        [spreads.reshape(-1)],
        [None if keep is None else keep.reshape(-1)],
        quantile=aggregate_quantile(aggregate),
        temperature=temperature,
    )
    spread = found.kept[0]
    rho_samples = radius_from_spread(spread, temperature)  # +inf where spread == 0
    # in the spreads' dtype, as every per-sample rho (min rho = pi T / max spread)
    rho_a = _scalar(radius_from_spread(spread.new_tensor(found.spread), temperature))
    r, tau = _normalized(tau, rho_a)
    top2, ex = _exact_radii(logits, slopes, keep, targets, temperature) if exact else (None, None)
    return Measurement(
        spread=spread,
        rho_samples=rho_samples,
        rho_a=rho_a,
        bottleneck=found.bottleneck,
        sample_index=index,
        sample_shape=tuple(spreads.shape),
        temperature=float(temperature),
        aggregate=aggregate,
        tau=tau,
        r=r,
        top2=top2,
        exact=ex,
        method=method,
    )


def _normalized(tau, rho_a: float) -> tuple[float | None, float | None]:
    """``(r, tau)`` as floats, ``r = tau / rho_a``; ``(None, None)`` without a step."""
    if tau is None:
        return None, None
    r = normalized_step(tau, torch.tensor(rho_a, dtype=torch.float64))
    return _scalar(r), _scalar(tau)


def _kept_samples(spreads, mask, targets, ignore_index):
    """``(index, keep)``: flattened indices of the measured samples and the keep-mask
    (None: all), after checking there is something finite to measure."""
    sample_shape = tuple(spreads.shape)
    _check_targets(targets, sample_shape)
    keep = sample_mask(sample_shape, spreads.device, mask, targets, ignore_index)
    index = torch.arange(spreads.numel(), device=spreads.device)
    if keep is not None:
        index = index[keep.reshape(-1)]
    if index.numel() == 0:
        raise ValueError("no samples left to measure (the mask removes every position)")
    if bool(torch.isnan(spreads.reshape(-1)[index]).any()):
        raise ValueError("the slopes are not finite for some samples (NaN/inf in the model?)")
    return index, keep


def _exact_radii(logits, slopes, keep, targets, temperature):
    """Per-sample top-2 proxy and certified exact radii of the kept samples, at
    temperature T (logits and slopes divided by T)."""
    z_rows, a_rows = flatten_samples(logits, slopes, keep)
    z_rows, a_rows = z_rows / temperature, a_rows / temperature
    t_rows = None
    if targets is not None:
        t_rows = targets.to(z_rows.device).reshape(-1)
        t_rows = t_rows if keep is None else t_rows[keep.reshape(-1)]
    return top2_radius(z_rows, a_rows, target=t_rows), exact_radius(z_rows, a_rows)


def _check_targets(targets, sample_shape):
    if targets is None:
        return
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be an integer tensor, got {type(targets).__name__}")
    if tuple(targets.shape) != tuple(sample_shape):
        raise ValueError(
            f"targets must have the sample shape {tuple(sample_shape)}, got {tuple(targets.shape)}"
        )
