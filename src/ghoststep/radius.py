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
* ``exact_radius`` / ``nearest_ghost``: the certified nearest zero for any K;
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
import warnings
from collections.abc import Sequence

import torch

__all__ = [
    "logit_spread",
    "rho_bound",
    "binary_radius",
    "clip_radius",
    "top2_radius",
    "exact_radius",
    "nearest_ghost",
    "aggregate",
    "normalized_step",
    "radius_from_spread",
    "step_scale",
    "kl_quadratic_term",
    "kl_remainder_bound",
    "logistic_curvature",
    "logistic_radius",
    "hessian_step",
    "hessian_radius_ratio",
    "crossover_margin",
]

PI = math.pi


# --------------------------------------------------------------------------- checks


def _check_float(name: str, x, *, class_axis: bool = True) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex() or not x.is_floating_point():
        raise ValueError(f"{name} must be a real floating-point tensor, got dtype {x.dtype}")
    if class_axis:
        if x.dim() == 0:
            raise ValueError(f"{name} must have a class axis (last dimension), got a 0-d tensor")
        if x.shape[-1] < 2:
            raise ValueError(
                f"{name} must have at least 2 classes along the last axis, got K={x.shape[-1]}"
            )
    return x


def _check_pair(logits, slopes) -> tuple[torch.Tensor, torch.Tensor]:
    _check_float("logits", logits)
    _check_float("slopes", slopes)
    if logits.shape != slopes.shape:
        raise ValueError(
            f"logits and slopes must have the same shape, got logits {tuple(logits.shape)} "
            f"and slopes {tuple(slopes.shape)}"
        )
    if logits.device != slopes.device:
        raise ValueError(
            f"logits and slopes must be on the same device, got {logits.device} and {slopes.device}"
        )
    return logits, slopes


def _row_finite(*xs: torch.Tensor) -> torch.Tensor:
    ok = torch.isfinite(xs[0]).all(-1)
    for x in xs[1:]:
        ok = ok & torch.isfinite(x).all(-1)
    return ok


def _nan_where_bad(value: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    return torch.where(finite, value, torch.full_like(value, float("nan")))


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
    spread = slopes.amax(-1) - slopes.amin(-1)
    return _nan_where_bad(spread, _row_finite(slopes))


def _check_temperature(temperature) -> None:
    if isinstance(temperature, torch.Tensor):
        if not temperature.is_floating_point() or not bool(
            torch.all(torch.isfinite(temperature) & (temperature > 0))
        ):
            raise ValueError("temperature must be positive and finite")
    elif not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


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


_MODES = ("clip", "set", "monitor")


def step_scale(tau: float, rho: float, mode: str = "clip", target_r: float = 1.0) -> float:
    """The factor s applied to an update of length tau given the radius rho (SPEC 3).

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
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
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


# ------------------------------------------------------------- exact multiclass radius
#
# Scaled coordinates. With Delta a > 0 put u_k = (a_k - min a) / Delta a in [0, 1],
# b_k = u_k - 1/2 in [-1/2, 1/2], c_k = z_k - max z and s = Delta a * t. Then
#     F(t) = exp((min a + Delta a / 2) t) * max_exp * H(s),  H(s) = sum_k exp(c_k + b_k s),
# so F and H have the same zeros, every zero has |Im s| >= pi, and |H'| <= |H|-sized
# terms times 1/2 (centring b halves the derivative bounds used for counting). H is
# real on the real axis: zeros come in conjugate pairs, and we search Im s > 0.

_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_EPS = torch.finfo(torch.float64).eps
_RESIDUAL_TOL = 1e-9  # |H(s0)| / sum_k |terms| accepted as "a zero"
_CERTIFY_SHRINK = 1e-6  # certify no zero with |s| < (1 - 1e-6) |s0|
_ELEMENT_BUDGET = 1 << 21  # points*K evaluated at once (bounds temporary memory)


def _evaluate(c: torch.Tensor, b: torch.Tensor, s: torch.Tensor, derivative: bool = False):
    """H at one point per row, scaled by exp(-m) with m the largest log-modulus term.

    c, b: (M, K) float64; s: (M,) complex128.
    Returns a dict with value (M,) complex, total = sum_k |term| (M,), slope_mass =
    sum_k |b_k| |term| (M,), m (M,), and, if asked, derivative (M,) complex.
    """
    log_mod = c + b * s.real[:, None]
    m = log_mod.amax(-1)
    mod = torch.exp(log_mod - m[:, None])
    phase = b * s.imag[:, None]
    re, im = mod * torch.cos(phase), mod * torch.sin(phase)
    out = {
        "value": torch.complex(re.sum(-1), im.sum(-1)),
        "total": mod.sum(-1),
        "slope_mass": (b.abs() * mod).sum(-1),
        "m": m,
    }
    if derivative:
        out["derivative"] = torch.complex((b * re).sum(-1), (b * im).sum(-1))
    return out


def _evaluate_rows(c, b, rows, s, derivative=False):
    """``_evaluate`` for points s (M,) belonging to rows (M,), in memory-bounded chunks."""
    step = max(1, _ELEMENT_BUDGET // c.shape[1])
    parts = [
        _evaluate(c[rows[i : i + step]], b[rows[i : i + step]], s[i : i + step], derivative)
        for i in range(0, s.numel(), step)
    ]
    if not parts:
        empty = _evaluate(c[:0], b[:0], s[:0], derivative)
        return empty
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _newton(c, b, rows, s, iterations: int = 40):
    """Newton's method on H from starts s (M,) of rows (M,); returns (roots, valid).

    Converged iterates leave the active set. A root is valid when it is finite, in
    the upper half-plane and |H| <= 1e-9 sum_k |terms| there. Iterates that cross
    into the lower half-plane are reflected (conjugate symmetry).
    """
    s = s.clone()
    active = torch.arange(s.numel(), device=s.device)
    for _ in range(iterations):
        if active.numel() == 0:
            break
        ev = _evaluate_rows(c, b, rows[active], s[active], derivative=True)
        step = ev["value"] / ev["derivative"]
        finite = torch.isfinite(step)
        moved = s[active] - torch.where(finite, step, torch.zeros_like(step))
        moved = torch.where(moved.imag < 0, moved.conj(), moved)
        s[active] = moved
        settled = ~finite | (step.abs() <= 1e-14 * torch.clamp(moved.abs(), min=1.0))
        active = active[~settled]
    ev = _evaluate_rows(c, b, rows, s)
    valid = torch.isfinite(s) & (s.imag > 0) & (ev["value"].abs() <= _RESIDUAL_TOL * ev["total"])
    return s, valid


def _edge_starts(c: torch.Tensor, b: torch.Tensor, count: int) -> torch.Tensor:
    """Newton starts from the Newton polygon of the points (b_k, c_k): (N, count + 1).

    Along Re s = x the largest term is the one on the upper hull of (b_k, c_k) with
    the right slope; on the line where two neighbouring hull vertices i, j tie,
    x = -(c_j - c_i) / (b_j - b_i), their two-term sum vanishes at
    y = pi / (b_j - b_i). For each class i we take j maximizing that slope among
    b_j > b_i (its hull successor when i is a vertex) and keep the ``count`` starts of
    smallest modulus, true hull edges first, plus s = i pi.
    """
    parts = []
    step = max(1, _ELEMENT_BUDGET // (c.shape[1] ** 2))
    for lo in range(0, c.shape[0], step):
        cc, bb = c[lo : lo + step], b[lo : lo + step]
        gap = bb[:, None, :] - bb[:, :, None]  # b_j - b_i, indexed [row, i, j]
        rise = cc[:, None, :] - cc[:, :, None]
        slope = torch.where(gap > 0, rise / gap, torch.full_like(gap, float("-inf")))
        best, j = slope.max(-1)
        width = gap.gather(-1, j[..., None])[..., 0]
        starts = torch.complex(-best, PI / width)
        modulus = torch.where(
            torch.isfinite(best), starts.abs(), torch.full_like(best, float("inf"))
        )
        # Prefer true hull edges: at x the pair (i, j) must be the largest terms. A
        # start where a third term dominates sends Newton marching off (H'/H ~ b_d).
        x = torch.where(torch.isfinite(best), -best, torch.zeros_like(best))
        level = cc + bb * x  # log-modulus of term i at its balance line
        top = (cc[:, None, :] + bb[:, None, :] * x[:, :, None]).amax(-1)
        off_hull = level < top - 1e-9 * (1 + top.abs())
        modulus = torch.where(off_hull, modulus + 1e300, modulus)
        k = min(count, cc.shape[1])
        order = modulus.topk(k, dim=-1, largest=False).indices
        chosen = starts.gather(-1, order)
        chosen = torch.where(
            modulus.gather(-1, order).isfinite(), chosen, chosen.new_tensor(PI * 1j)
        )
        parts.append(torch.cat([chosen, torch.full_like(chosen[:, :1], PI * 1j)], dim=-1))
    return torch.cat(parts)


def _grid_starts(radius: torch.Tensor, radial: int = 8, angular: int = 16) -> torch.Tensor:
    """Polar grid of starts filling the upper half-disk |s| < radius: (N, radial*angular)."""
    dev = radius.device
    fractions = torch.linspace(0.2, 0.99, radial, dtype=torch.float64, device=dev)
    angles = torch.linspace(0.1, PI - 0.1, angular, dtype=torch.float64, device=dev)
    polar = torch.polar(fractions[:, None].expand(-1, angular), angles[None, :].expand(radial, -1))
    return radius[:, None].to(torch.complex128) * polar.reshape(1, -1)


def _nearest_root(c, b, starts: torch.Tensor):
    """Newton from starts (N, P); returns (nearest valid root (N,), found (N,))."""
    n_rows, n_starts = starts.shape
    rows = torch.arange(n_rows, device=c.device).repeat_interleave(n_starts)
    roots, valid = _newton(c, b, rows, starts.reshape(-1))
    roots, valid = roots.view(n_rows, n_starts), valid.view(n_rows, n_starts)
    modulus = torch.where(valid, roots.abs(), torch.full_like(roots.real, float("inf")))
    best = modulus.argmin(-1, keepdim=True)
    return roots.gather(-1, best)[:, 0], valid.any(-1)


def _zero_count(
    c, b, radius: torch.Tensor, focus: torch.Tensor | None = None, max_rounds: int = 64
):
    """Certified number of zeros of H in the open disk |s| < radius (argument principle).

    The winding number of H along the circle counts the zeros inside; by conjugate
    symmetry it is twice the winding along the upper half circle (H > 0 at s = +-R).
    The half circle is cut into arcs. On an arc of length L starting at s_0,
    |s - s_0| <= L and |b_k| <= 1/2, so |H'(s)| <= e^{L/2} sum_k |b_k| |term_k(s_0)|
    and |H(s) - H(s_0)| <= L e^{L/2} sum_k |b_k| |term_k(s_0)|. When that plus the
    rounding error of both end values is below |H(s_0)|, the arc's image lies in a
    disk around H(s_0) that excludes 0, so the continuous change of arg H along the
    arc is the principal value of arg(H(s_1) / H(s_0)). Arcs that fail are halved
    (one new evaluation each); rows with arcs left after ``max_rounds`` halvings
    are reported as uncertified. ``focus`` (N,) optionally names an angle near which
    a zero lies just outside the circle. Long arcs on large circles are accepted
    instead by domination (``_dominated_arcs``).

    Returns (count (N,) int64, certified (N,) bool).
    """
    n_rows, num_classes = c.shape
    dev = c.device
    # Initial arcs of length about 1 (|H'/H| is about 1/2 where nothing cancels); on
    # large circles longer arcs, which one dominant term usually certifies whole.
    per_row = torch.clamp(torch.ceil(PI * radius), 16, 512).long()
    point_rows = torch.repeat_interleave(torch.arange(n_rows, device=dev), per_row + 1)
    first = torch.cumsum(per_row + 1, 0) - (per_row + 1)
    index = torch.arange(point_rows.numel(), device=dev) - first[point_rows]
    theta = index.double() * (PI / per_row[point_rows].double())
    if focus is not None:
        # A zero just outside the circle near angle ``focus`` needs arcs as short as
        # their distance to it: add a geometric mesh there instead of halving 20 times.
        offsets = _CERTIFY_SHRINK * 4.0 ** torch.arange(10, device=dev, dtype=torch.float64)
        graded = (focus[:, None] + torch.cat([-offsets, offsets])[None, :]).clamp(0, PI)
        point_rows = torch.cat([point_rows, torch.arange(n_rows, device=dev).repeat_interleave(20)])
        theta = torch.cat([theta, graded.reshape(-1)])
        order = torch.sort(theta, stable=True).indices
        order = order[torch.sort(point_rows[order], stable=True).indices]
        point_rows, theta = point_rows[order], theta[order]
    ev = _evaluate_rows(c, b, point_rows, torch.polar(radius[point_rows], theta))
    start = (point_rows[:-1] == point_rows[1:]).nonzero()[:, 0]
    arcs = {"row": point_rows[start], "t0": theta[start], "t1": theta[start + 1]}
    for key, val in ev.items():
        arcs[key + "0"] = val[start]
        arcs[key + "1"] = val[start + 1]
    winding = torch.zeros(n_rows, dtype=torch.float64, device=dev)
    rounding = 64 * num_classes * _EPS
    for _ in range(max_rounds):
        if arcs["row"].numel() == 0:
            break
        length = radius[arcs["row"]] * (arcs["t1"] - arcs["t0"])
        drift = length * torch.exp(0.5 * length) * arcs["slope_mass0"]
        err = rounding * (arcs["total0"] + arcs["total1"] * torch.exp(arcs["m1"] - arcs["m0"]))
        accepted = drift + err < arcs["value0"].abs()
        change = torch.angle(arcs["value1"] * arcs["value0"].conj())
        dominated, dominated_change = _dominated_arcs(c, b, radius, arcs, ~accepted)
        change = torch.where(dominated, dominated_change, change)
        accepted = accepted | dominated
        winding.index_add_(0, arcs["row"][accepted], change[accepted])
        arcs = {key: val[~accepted] for key, val in arcs.items()}
        if arcs["row"].numel() == 0:
            break
        middle = 0.5 * (arcs["t0"] + arcs["t1"])
        mid = _evaluate_rows(c, b, arcs["row"], torch.polar(radius[arcs["row"]], middle))
        left = dict(arcs, t1=middle, **{k + "1": v for k, v in mid.items()})
        right = dict(arcs, t0=middle, **{k + "0": v for k, v in mid.items()})
        arcs = {key: torch.cat([left[key], right[key]]) for key in arcs}
    failed = torch.zeros(n_rows, dtype=torch.bool, device=dev)
    failed[arcs["row"]] = True
    turns = winding / (2 * PI)  # arg change along the half circle: 2 pi per conjugate pair
    consistent = (turns - torch.round(turns)).abs() < 0.25
    return 2 * torch.round(turns).long(), ~failed & consistent


def _dominated_arcs(c, b, radius, arcs, candidates):
    """Arcs on which one term of H outweighs all others together, and arg H's change there.

    On an arc with real parts in [x_lo, x_hi], |term_k| <= exp(c_k + max(b_k x_lo,
    b_k x_hi)) and |term_d| >= exp(c_d + min(b_d x_lo, b_d x_hi)). If the others'
    bounds sum to at most half of term d's, H = term_d (1 + e) with |e| <= 1/2 on the
    whole arc: H has no zero there, arg term_d = b_d Im s + const changes by
    b_d (y_1 - y_0), and arg(1 + e) stays within +-pi/6, so its change is the
    principal value of arg((1 + e_1) / (1 + e_0)). Only arcs in ``candidates`` are
    examined. Returns (dominated (A,) bool, change (A,) float64).
    """
    dominated = torch.zeros_like(candidates)
    change = torch.zeros(candidates.shape, dtype=torch.float64, device=candidates.device)
    index = candidates.nonzero()[:, 0]
    step = max(1, _ELEMENT_BUDGET // c.shape[1])
    for lo in range(0, index.numel(), step):
        part = index[lo : lo + step]
        rows = arcs["row"][part]
        cc, bb, rad = c[rows], b[rows], radius[rows]
        t0, t1 = arcs["t0"][part], arcs["t1"][part]
        x_hi, x_lo = rad * torch.cos(t0), rad * torch.cos(t1)  # cos decreases on [0, pi]
        upper = cc + torch.maximum(bb * x_lo[:, None], bb * x_hi[:, None])
        lower = cc + torch.minimum(bb * x_lo[:, None], bb * x_hi[:, None])
        lower_d, d = lower.max(-1)
        others = torch.logsumexp(upper.scatter(-1, d[:, None], float("-inf")), dim=-1)
        ok = others < lower_d - math.log(2.0)
        c_d, b_d = cc.gather(-1, d[:, None])[:, 0], bb.gather(-1, d[:, None])[:, 0]
        y0, y1 = rad * torch.sin(t0), rad * torch.sin(t1)
        # (1 + e_j) = H(s_j) / term_d(s_j), from the stored scaled values of H
        q0 = arcs["value0"][part] * torch.polar(
            torch.exp(arcs["m0"][part] - c_d - b_d * x_hi), -b_d * y0
        )
        q1 = arcs["value1"][part] * torch.polar(
            torch.exp(arcs["m1"][part] - c_d - b_d * x_lo), -b_d * y1
        )
        dominated[part] = ok
        change[part] = b_d * (y1 - y0) + torch.angle(q1 * q0.conj())
    return dominated, change


def _solve_scaled(c: torch.Tensor, b: torch.Tensor, attempts: int = 4):
    """Nearest certified zero of H in the upper half-plane for each row of (N, K).

    Returns (roots (N,) complex128, status (N,) int64): 0 certified, 1 Newton found
    no zero, 2 a nearer zero exists but was not located, 3 the count failed.
    """
    n_rows, dev = c.shape[0], c.device
    roots = torch.full((n_rows,), complex("nan"), dtype=torch.complex128, device=dev)
    status = torch.ones(n_rows, dtype=torch.long, device=dev)
    pending = torch.arange(n_rows, device=dev)
    starts = _edge_starts(c, b, count=6)
    for _ in range(attempts):
        if pending.numel() == 0:
            break
        cc, bb = c[pending], b[pending]
        best, found = _nearest_root(cc, bb, starts)
        shrunk = (1 - _CERTIFY_SHRINK) * torch.where(found, best.abs(), torch.ones_like(best.real))
        count, certified = _zero_count(cc, bb, shrunk, focus=best.angle().nan_to_num(0.0))
        good = found & certified & (count == 0)
        roots[pending[good]] = best[good]
        status[pending[good]] = 0
        status[pending[found & ~certified]] = 3
        status[pending[found & certified & (count > 0)]] = 2
        # Retry the rest from a grid filling the disk that must hold a nearer zero
        # (or, with nothing found, a generous disk around the two-term estimates).
        retry = ~good
        pending, best, found = pending[retry], best[retry], found[retry]
        if pending.numel() == 0:
            break
        guess = 4 * _edge_starts(c[pending], b[pending], count=1)[:, 0].abs()
        starts = _grid_starts(torch.where(found, best.abs(), guess))
    return roots, status


_STATUS_REASONS = {
    1: "Newton's method found no zero",
    2: "a nearer zero exists but could not be located",
    3: "the zero count along the certifying circle could not be certified",
}


def nearest_ghost(logits: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """Certified nearest complex zero of F(t) = sum_k exp(z_k + a_k t), any K.

    The zero t0 with Im t0 > 0 and the smallest modulus (its conjugate is a zero
    too). Each returned zero is certified: Newton's method converged with
    |F(t0)| <= 1e-9 sum_k |exp(z_k + a_k t0)|, and an argument-principle count
    with rigorous arc-wise derivative bounds shows that F has no zero with
    |t| < (1 - 1e-6)|t0|. Computation is in float64 and in log space, so logits of
    any magnitude (e.g. +-1e4) are fine.

    Args:
        logits, slopes: (..., K) with K >= 2.
    Returns:
        (...) complex tensor (complex64 for float32 input, complex128 for float64)
        in step-length units. inf+infj where Delta a == 0 (no zero at all); NaN for
        non-finite samples and, with a ``RuntimeWarning`` saying why, for samples
        whose zero could not be certified.
    """
    _check_pair(logits, slopes)
    batch_shape, num_classes = logits.shape[:-1], logits.shape[-1]
    complex_dtype = torch.complex128 if logits.dtype == torch.float64 else torch.complex64
    z = logits.detach().reshape(-1, num_classes).double()
    a = slopes.detach().reshape(-1, num_classes).double()
    finite = _row_finite(z, a)
    spread = torch.where(finite, a.amax(-1) - a.amin(-1), torch.zeros_like(z[:, 0]))
    active = finite & (spread > 0)
    out = torch.full((z.shape[0],), complex("nan"), dtype=torch.complex128, device=z.device)
    out[finite & (spread == 0)] = complex(float("inf"), float("inf"))
    if bool(active.any()):
        za, aa, sa = z[active], a[active], spread[active]
        c = za - za.amax(-1, keepdim=True)
        b = (aa - aa.amin(-1, keepdim=True)) / sa[:, None] - 0.5
        roots, status = _solve_scaled(c, b)
        out[active] = roots / sa
        failures = status[status != 0]
        if failures.numel():
            reasons = ", ".join(
                f"{int((failures == code).sum())} because {text}"
                for code, text in _STATUS_REASONS.items()
                if bool((failures == code).any())
            )
            warnings.warn(
                f"nearest_ghost/exact_radius: {failures.numel()} of {z.shape[0]} samples "
                f"could not be certified and are NaN ({reasons})",
                RuntimeWarning,
                stacklevel=3,
            )
    return out.to(complex_dtype).reshape(batch_shape)


def exact_radius(logits: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """Exact convergence radius rho* = min{|t| : F(t) = 0}, certified, any K.

    See ``nearest_ghost`` for the method and its certificate. For K = 2 it equals
    ``binary_radius``; in general ``rho_bound <= exact_radius``.

    Args:
        logits, slopes: (..., K).
    Returns:
        (...) rho* in the input's real dtype; +inf where Delta a == 0; NaN (with a
        ``RuntimeWarning``) where certification failed or the input is not finite.
    """
    return nearest_ghost(logits, slopes).abs().to(logits.dtype)


# ----------------------------------------------------------------- batch quantities


def aggregate(per_sample_rho: torch.Tensor, how: str | Sequence = "min") -> torch.Tensor:
    """Batch or dataset radius from per-sample radii.

    ``"min"`` gives the guaranteed batch radius: for rho_a it equals
    pi / max_x Delta a(x). ``("quantile", q)`` gives the q-quantile of the per-sample
    radii (q = 0 is the min; the lower order statistic, no interpolation). It
    ignores the q share of samples with the smallest radii, so it gives up the
    guarantee for them in exchange for robustness to a few outliers.

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
    if how == "min":
        return flat.min()
    if (
        isinstance(how, Sequence)
        and not isinstance(how, str)
        and len(how) == 2
        and how[0] == "quantile"
    ):
        q = how[1]
        if not (isinstance(q, (int, float)) and 0.0 <= q <= 1.0):
            raise ValueError(f"aggregate quantile q must be a number in [0, 1], got {q!r}")
        # Lower quantile (no interpolation): conservative, and exact with +inf entries.
        ordered = flat.sort().values
        return ordered[math.floor(q * (ordered.numel() - 1))]
    raise ValueError(f'aggregate how must be "min" or ("quantile", q), got {how!r}')


def normalized_step(step_norm, rho) -> torch.Tensor:
    """Normalized step r = ||p|| / rho (r < 1: inside the guaranteed disk).

    Args:
        step_norm: step length(s) ||p|| >= 0 (number or tensor).
        rho: radius/radii, broadcastable with step_norm; +inf gives r = 0.
    Returns:
        r as a tensor.
    """
    step = _as_float(step_norm)
    radius = _as_float(rho)
    _check_float("step_norm", step, class_axis=False)
    _check_float("rho", radius, class_axis=False)
    if bool((step < 0).any()):
        raise ValueError("step_norm must be >= 0")
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
