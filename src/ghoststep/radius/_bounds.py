"""Convergence radii of softmax cross-entropy along a direction: pure tensor math.

Along a step ``theta + t v`` the logits move as ``z_k + a_k t`` (slopes ``a = J_z v``),
and the loss depends on ``t`` through the partition function

    F(t) = sum_k exp(z_k + a_k t).

F is positive on the real line but has complex zeros ("ghosts"); ``log F`` branches
there, so the Taylor series of the loss in ``t`` converges exactly for
``|t| < rho* = min{|t| : F(t) = 0}``. This module computes

* ``logit_spread``: Delta a = max_k a_k - min_k a_k;
* ``rho_bound``: rho_a = pi T / Delta a, a proven lower bound on rho*;
* ``binary_radius``: the exact rho* for K = 2;
* ``top2_radius``: the top-2 proxy (not a bound for K > 2);
* ``exact_radius`` / ``nearest_ghost`` (in ``_ghosts``): the certified nearest zero for any K;
* ``aggregate`` / ``normalized_step``: batch radii and r = ||p|| / rho;
* theory helpers for the KL remainder and the binary-logistic Hessian comparison.

Conventions. Every function takes tensors with any leading batch shape and the class
axis last (``K >= 2``), works in float32 and float64 on any device, and returns
tensors. Bad input raises ``ValueError`` naming the argument: non-tensors, integer,
bool or complex dtypes, ``K < 2``, shapes that disagree. Non-finite values are
*per-sample* data, not errors: a sample with a NaN or infinite logit or slope gets a
NaN radius, so one bad row never hides the others. ``aggregate`` refuses NaN (a
batch radius must not silently skip samples).

Reference: P. Sao, "Ghosts of Softmax", arXiv:2603.13552 (2026), sections 3-4.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ._checks import check_float as _check_float
from ._checks import check_pair as _check_pair
from ._checks import check_temperature as _check_temperature
from ._checks import nan_where_bad as _nan_where_bad
from ._checks import row_finite as _row_finite

# The public names are listed once, in the package's ``__init__``.

PI = math.pi
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


# --------------------------------------------------------------------- simple radii


def logit_spread(slopes: torch.Tensor) -> torch.Tensor:
    """Spread of the logit slopes, Delta a = max_k a_k - min_k a_k.

    Args:
        slopes: (..., K) directional logit derivatives a = J_z v, in logit units per
            unit step.
    Returns:
        (...) spread, >= 0; NaN for samples with a non-finite slope.
    """
    _check_float("slopes", slopes)
    return _nan_where_bad(logit_spread_unchecked(slopes), _row_finite(slopes))


def logit_spread_unchecked(slopes: torch.Tensor) -> torch.Tensor:
    """:func:`logit_spread` without its checks (no NaN marking of non-finite rows): the
    core the controller's measurement runs on every step."""
    return slopes.amax(-1) - slopes.amin(-1)


def rho_bound(slopes: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Guaranteed radius rho_a = pi T / Delta a per sample.

    If Delta a |Im t| < pi every term exp(z_k + a_k t) of F (after factoring out
    exp(min_k a_k t)) points into one open half-plane, so F cannot vanish: rho_a <= rho*.
    With a softmax temperature T the logits are z / T, the slopes a / T.

    Args:
        slopes: (..., K) logit slopes along a unit direction (before dividing by T).
        temperature: softmax temperature T > 0 (a number or a tensor broadcastable
            to the batch shape).
    Returns:
        (...) rho_a in step-length units; +inf where Delta a == 0 (no ghost); NaN
        where a slope is not finite.
    """
    _check_temperature(temperature)
    return radius_from_spread(logit_spread(slopes), temperature)


def radius_from_spread(spread, temperature: float | torch.Tensor = 1.0):
    """The radius bound of a spread, rho = pi T / Delta a (and back: the map is its own
    inverse, Delta a = pi T / rho).

    Args:
        spread: Delta a >= 0, a number or a tensor (logit units per unit step).
        temperature: softmax temperature T > 0.
    Returns:
        rho, of the input's kind: +inf where the spread is 0 (no ghost), 0 where it is
        +inf, NaN where it is NaN.
    """
    if isinstance(spread, torch.Tensor):
        return PI * temperature / spread  # IEEE: x / 0 = inf, x / inf = 0
    spread = float(spread)
    if spread == 0.0:
        return math.inf
    return PI * float(temperature) / spread


# What the controller does with r (``mode=``): cap it, set it, or only record it.
MODES = ("clip", "set", "monitor")


def step_scale(tau: float, rho: float, mode: str = "clip", target_r: float = 1.0) -> float:
    """The factor s applied to an update of length tau given the radius rho (paper Prop. 5.2).

    * ``"clip"``: ``s = min(1, r* rho / tau)``, so the step moves at most r* radii;
    * ``"set"``: ``s = r* rho / tau``, the step moves exactly r* radii;
    * ``"monitor"``: ``s = 1``.

    An infinite radius (nothing moves the logits) or a zero step gives s = 1.

    Args:
        tau: ||p|| >= 0, the proposed step length.
        rho: the radius bound along p / ||p|| (same length units), >= 0.
        mode: ``"clip"`` | ``"set"`` | ``"monitor"``.
        target_r: r* > 0.
    Returns:
        s as a float.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "monitor" or math.isinf(rho) or tau == 0.0:
        return 1.0
    scale = target_r * rho / tau
    return min(1.0, scale) if mode == "clip" else scale


def clip_radius(rho: float, margin: float, rounding: float = 0.0) -> float:
    """The radius clip mode caps at: ``rho (1 - margin) - rounding``, at least 0.

    ``margin`` covers the relative error of the measured radius (the method's), and
    ``rounding`` the float rounding of ``old + s p`` (about 2 eps ||old|| in length),
    so that the realised step stays within the radius.
    """
    return max(rho * (1.0 - margin) - rounding, 0.0)


def binary_radius(logits: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """Exact convergence radius for two classes, rho* = sqrt(delta^2 + pi^2) / |Delta a|.

    With delta = z_1 - z_2 and Delta a = a_1 - a_2 the zeros of F solve
    exp(Delta a t) = -exp(-delta), i.e. t = (-delta + i pi (2m + 1)) / Delta a.

    Args:
        logits, slopes: (..., 2).
    Returns:
        (...) rho*; +inf where Delta a == 0; NaN for non-finite samples.
    """
    _check_pair(logits, slopes)
    if logits.shape[-1] != 2:
        raise ValueError(f"binary_radius needs K=2 classes, got logits with K={logits.shape[-1]}")
    delta = logits[..., 0] - logits[..., 1]
    gap = (slopes[..., 0] - slopes[..., 1]).abs()
    radius = torch.sqrt(delta * delta + PI**2) / gap
    return _nan_where_bad(radius, _row_finite(logits, slopes))


def top2_radius(
    logits: torch.Tensor, slopes: torch.Tensor, target: torch.Tensor | None = None
) -> torch.Tensor:
    """Top-2 proxy sqrt(delta^2 + pi^2) / |a_y - a_c|.

    y is ``target`` (or the arg-max class when ``target`` is None) and c the
    strongest other class (the runner-up); delta = z_y - z_c. This is the exact
    binary radius of the two-class reduction. For K > 2 it is a *proxy*, not a
    bound: the other classes can put a zero closer to t = 0 (or farther).

    Args:
        logits, slopes: (..., K).
        target: optional (...) integer class indices in [0, K).
    Returns:
        (...) proxy radius; +inf where a_y == a_c; NaN for non-finite samples.
    """
    _check_pair(logits, slopes)
    num_classes = logits.shape[-1]
    if target is None:
        top = logits.topk(2, dim=-1).indices
        y, c = top[..., 0], top[..., 1]
    else:
        if not isinstance(target, torch.Tensor) or target.dtype not in _INDEX_DTYPES:
            raise ValueError("target must be an integer tensor of class indices")
        if target.shape != logits.shape[:-1]:
            raise ValueError(
                f"target must have the batch shape {tuple(logits.shape[:-1])}, "
                f"got {tuple(target.shape)}"
            )
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
            raise ValueError(f"target must hold class indices in [0, {num_classes})")
        y = target.to(device=logits.device, dtype=torch.long)
        others = logits.masked_fill(
            torch.nn.functional.one_hot(y, num_classes).bool(), float("-inf")
        )
        c = others.argmax(-1)
    z_y, z_c = logits.gather(-1, y[..., None])[..., 0], logits.gather(-1, c[..., None])[..., 0]
    a_y, a_c = slopes.gather(-1, y[..., None])[..., 0], slopes.gather(-1, c[..., None])[..., 0]
    delta = z_y - z_c
    proxy = torch.sqrt(delta * delta + PI**2) / (a_y - a_c).abs()
    return _nan_where_bad(proxy, _row_finite(logits, slopes))


# ----------------------------------------------------------------- batch quantities


def quantile_position(n: int, q: float) -> int:
    """The one quantile convention: ``q`` is a quantile of the *spread*. Of ``n`` values
    the q-quantile spread is the one at this position in decreasing spread order,
    which is increasing radius order (rho = pi T / Delta a): the upper order statistic
    of the spreads, the lower (1 - q) order statistic of the radii, no interpolation.
    q = 1 is the max spread (the min radius, the guaranteed one)."""
    return math.floor((1.0 - q) * (n - 1))


def aggregate(per_sample_rho: torch.Tensor, how: str | Sequence = "min") -> torch.Tensor:
    """Batch or dataset radius from per-sample radii.

    ``"min"`` gives the guaranteed batch radius: for rho_a it equals
    pi / max_x Delta a(x). ``("quantile", q)`` gives the radius of the q-quantile
    spread (:func:`quantile_position`: q = 1 is the min radius, q = 0.99 the radius
    that 99 % of the samples' spreads stay below; in radius terms the lower
    (1 - q) order statistic, no interpolation). It ignores the (1 - q) share of
    samples with the smallest radii, so it gives up the guarantee for them in
    exchange for robustness to a few outliers. The controller's ``quantile=q`` is
    the same q.

    Args:
        per_sample_rho: tensor of radii (any shape, all entries pooled), >= 0,
            +inf allowed.
        how: "min" or ("quantile", q) with 0 <= q <= 1.
    Returns:
        0-d tensor.
    """
    _check_float("per_sample_rho", per_sample_rho, class_axis=False)
    if per_sample_rho.numel() == 0:
        raise ValueError("per_sample_rho must hold at least one radius, got an empty tensor")
    if bool(torch.isnan(per_sample_rho).any()):
        raise ValueError("per_sample_rho contains NaN; a batch radius cannot skip samples")
    if bool((per_sample_rho < 0).any()):
        raise ValueError("per_sample_rho must be >= 0 (radii are distances)")
    flat = per_sample_rho.reshape(-1)
    q = aggregate_quantile(how)
    if q is None:
        return flat.min()
    # Increasing radii (no interpolation): conservative, and exact with +inf entries.
    ordered = flat.sort().values
    return ordered[quantile_position(ordered.numel(), q)]


def aggregate_quantile(how: str | Sequence) -> float | None:
    """The q of an aggregate ``how`` (None for ``"min"``); refuses anything else."""
    if how == "min":
        return None
    if (
        isinstance(how, Sequence)
        and not isinstance(how, str)
        and len(how) == 2
        and how[0] == "quantile"
    ):
        q = how[1]
        if not (isinstance(q, (int, float)) and 0.0 <= q <= 1.0):
            raise ValueError(f"aggregate quantile q must be a number in [0, 1], got {q!r}")
        return q
    raise ValueError(f'aggregate how must be "min" or ("quantile", q), got {how!r}')


def normalized_step(tau, rho) -> torch.Tensor:
    """Normalized step r = tau / rho, tau = ||p|| (r < 1: inside the guaranteed disk).

    Args:
        tau: step length(s) ||p|| >= 0 (number or tensor).
        rho: radius/radii, broadcastable with tau; +inf gives r = 0.
    Returns:
        r as a tensor.
    """
    step = _as_float(tau)
    radius = _as_float(rho)
    _check_float("tau", step, class_axis=False)
    _check_float("rho", radius, class_axis=False)
    if bool((step < 0).any()):
        raise ValueError("tau must be >= 0")
    if bool((radius < 0).any()):
        raise ValueError("rho must be >= 0")
    return step / radius


# ------------------------------------------------------------------- theory helpers


def kl_quadratic_term(logits: torch.Tensor, slopes: torch.Tensor, tau) -> torch.Tensor:
    """Second-order KL term tau^2 / 2 * Var_{p(0)}(a) with p(0) = softmax(logits).

    Args:
        logits, slopes: (..., K); tau: step length (number or tensor broadcastable
            to the batch shape).
    Returns:
        (...) the quadratic term of KL(p(tau) || p(0)).
    """
    _check_pair(logits, slopes)
    probs = torch.softmax(logits, dim=-1)
    mean = (probs * slopes).sum(-1, keepdim=True)
    variance = (probs * (slopes - mean) ** 2).sum(-1)
    return 0.5 * torch.as_tensor(tau, dtype=logits.dtype, device=logits.device) ** 2 * variance


def kl_remainder_bound(tau, spread) -> torch.Tensor:
    """Bound on |KL(p(tau)||p(0)) - tau^2/2 Var(a)|: |tau|^3 Delta a^3 / (18 sqrt 3).

    It follows from the sharp third-central-moment bound Delta^3 / (6 sqrt 3) for a
    variable supported on an interval of width Delta.
    """
    tau, spread = _as_float(tau), _as_float(spread)
    return (tau.abs() * spread) ** 3 / (18 * math.sqrt(3))


def _as_float(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64) if not isinstance(x, torch.Tensor) else x


def logistic_curvature(margin) -> torch.Tensor:
    """Curvature sigma(delta)(1 - sigma(delta)) of the binary logistic loss at margin delta.

    Decays like exp(-|delta|); computed stably for large margins.
    """
    margin = _as_float(margin)
    e = torch.exp(-margin.abs())
    return e / (1 + e) ** 2


def logistic_radius(margin, slope_gap=1.0) -> torch.Tensor:
    """Exact radius sqrt(delta^2 + pi^2) / |slope_gap| of the binary logistic loss."""
    margin = _as_float(margin)
    return torch.sqrt(margin**2 + PI**2) / _as_float(slope_gap).abs()


def hessian_step(margin, slope_gap=1.0) -> torch.Tensor:
    """Step 2 / f'' implied by the curvature f'' = sigma(1 - sigma) * slope_gap^2."""
    return 2.0 / (logistic_curvature(margin) * _as_float(slope_gap) ** 2)


def hessian_radius_ratio(margin, slope_gap=1.0) -> torch.Tensor:
    """How far the Hessian-implied step overshoots the radius: (2/f'') / rho*.

    About 4200 at delta = 10: curvature vanishes exponentially with the margin while
    the ghosts stay at distance sqrt(delta^2 + pi^2).
    """
    return hessian_step(margin, slope_gap) / logistic_radius(margin, slope_gap)


def crossover_margin(slope_gap) -> torch.Tensor:
    """Margin delta* = ln(pi |Delta| / 2) beyond which 2/f'' (with f'' ~ e^-delta Delta^2)
    exceeds the guaranteed radius pi / |Delta|."""
    return torch.log(PI * _as_float(slope_gap).abs() / 2)


# ------------------------------------------------------- per-position spreads to a radius


class Reduction(NamedTuple):
    """The batch's radius from its spreads.

    ``spread``: the spread that sets the radius (max, or the q-quantile, over the
    counted positions; the largest over the parts, and over the ranks with
    ``combine``; 0.0 when nothing was counted); ``rho_a``: pi T / spread (a float);
    ``bottleneck``: flat index, over the parts in order, of the largest counted spread
    of the part that sets the radius (-1: none counted); ``counted``: some position
    was counted (after ``combine``); ``count``: the positions counted here; ``finite``:
    every counted spread finite (after ``combine``); ``finite_here``: before ``combine``;
    ``kept``: the counted spreads of each part."""

    spread: float
    rho_a: float
    bottleneck: int
    counted: bool
    count: int
    finite: bool
    finite_here: bool
    kept: list[torch.Tensor]


def aggregate_spread(spread: torch.Tensor, quantile: float | None = None) -> torch.Tensor:
    """The spread that sets the radius: the max, or the q-quantile spread (upper order
    statistic: :func:`~ghoststep.radius.quantile_position`); 0-d, no host sync; 0 for
    an empty tensor."""
    if spread.numel() == 0:
        return spread.new_zeros(())
    if quantile is None:
        return spread.max()
    ordered = spread.sort(descending=True).values
    return ordered[quantile_position(spread.numel(), quantile)]


def _summary(spread, keep, quantile, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(aggregate, finite, argmax + offset, count) of one part on its device, and the
    counted spreads."""
    valid = spread if keep is None else spread[keep]
    masked = spread if keep is None else spread.masked_fill(~keep, -math.inf)
    row = torch.stack(
        [
            aggregate_spread(valid, quantile),
            torch.isfinite(valid).all().double(),
            (masked.argmax().double() if spread.numel() else spread.new_zeros(())) + offset,
            spread.new_full((), float(valid.numel())),  # no host copy
        ]
    )
    return row, valid


def reduce_spreads(
    spreads: Sequence[torch.Tensor],
    keeps: Sequence[torch.Tensor | None],
    *,
    quantile: float | None = None,
    temperature: float = 1.0,
    combine: Callable[[float, bool], tuple[float, bool]] | None = None,
) -> Reduction:
    """Reduce flat per-position spreads (one tensor per part, with its flat bool mask or
    None) to the batch's spread, radius and bottleneck, with one host sync. A part with
    no counted position takes no part in the max. ``combine(spread, finite) -> (spread,
    finite)`` then reduces them over whatever else shares the decision (the controller:
    a MAX over the ranks, so that every rank decides alike; a spread of -1.0 counted
    nothing)."""
    rows, kept, offset = [], [], 0
    for spread, keep in zip(spreads, keeps, strict=True):
        row, valid = _summary(spread, keep, quantile, offset)
        rows.append(row)
        kept.append(valid)
        offset += spread.numel()
    # no part at all (a rank with no batch to measure) counts nothing, and still reduces
    summary = torch.stack([r.to(rows[0].device) for r in rows]).tolist() if rows else []
    finite_here = all(row[1] == 1.0 for row in summary)
    # -1: no position counted here (every one masked)
    spread, bottleneck, count = -1.0, -1, 0
    for agg, _, index, n in summary:
        count += int(n)
        if n and (bottleneck < 0 or agg > spread):
            spread, bottleneck = agg, int(index)
    finite = finite_here
    if combine is not None:
        spread, finite = combine(spread, finite)
    counted = spread >= 0.0
    spread = max(spread, 0.0)
    rho_a = radius_from_spread(spread, temperature)
    return Reduction(spread, rho_a, bottleneck, counted, count, finite, finite_here, kept)
