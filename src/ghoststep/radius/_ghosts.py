"""The certified nearest ghost: the exact convergence radius rho* = min{|t| : F(t) = 0}
of softmax cross-entropy along a direction, for any number of classes K (the complex
zero of F(t) = sum_k exp(z_k + a_k t) nearest to the origin, located by Newton iteration
from many starts and certified by an argument-principle zero count).

Conventions as in :mod:`ghoststep.radius` (leading batch shape, class axis last; a row
with a non-finite value gets NaN; NaN also when the zero cannot be certified, never a
wrong radius). ``ghoststep.radius`` re-exports :func:`exact_radius` and
:func:`nearest_ghost`.
"""

from __future__ import annotations

import math
import warnings

import torch

from ._checks import check_pair as _check_pair
from ._checks import row_finite as _row_finite

__all__ = ["exact_radius", "nearest_ghost"]

PI = math.pi


# ------------------------------------------------------------- exact multiclass radius
#
# Scaled coordinates. With Delta a > 0 put u_k = (a_k - min a) / Delta a in [0, 1],
# b_k = u_k - 1/2 in [-1/2, 1/2], c_k = z_k - max z and s = Delta a * t. Then
#     F(t) = exp((min a + Delta a / 2) t) * max_exp * H(s),  H(s) = sum_k exp(c_k + b_k s),
# so F and H have the same zeros, every zero has |Im s| >= pi, and |H'| <= |H|-sized
# terms times 1/2 (centring b halves the derivative bounds used for counting). H is
# real on the real axis: zeros come in conjugate pairs, and we search Im s > 0.

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
    """Newton iteration on H from starts s (M,) of rows (M,); returns (roots, valid).

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


_EDGE_CLASSES = 384  # above this many classes, starts come from a reduced class set
_EDGE_GRID = 65  # real parts probed for the leading term when reducing


def _leading_classes(c: torch.Tensor, b: torch.Tensor, keep: int) -> torch.Tensor:
    """Class indices (N, keep) likely to be Newton-polygon vertices of (b_k, c_k).

    The upper hull's vertices are the terms that lead along some line Re s = x:
    argmax_k (c_k + b_k x) over a symmetric geometric grid of x, plus the classes
    with the largest c (the vertices near x = 0) to fill ``keep``. Starts only seed
    Newton iteration; the zero and its certificate always use every class, so this
    choice can cost a NaN, never a wrong radius.
    """
    mags = torch.logspace(-2, 6, (_EDGE_GRID - 1) // 2, dtype=c.dtype, device=c.device)
    xs = torch.cat([-mags.flip(0), mags.new_zeros(1), mags])
    rows = []
    for i in range(c.shape[0]):
        lead = (c[i][None, :] + xs[:, None] * b[i][None, :]).argmax(-1)
        marked = torch.zeros_like(c[i], dtype=torch.bool)
        marked[lead] = True
        score = torch.where(marked, torch.full_like(c[i], float("inf")), c[i])
        rows.append(score.topk(keep).indices)
    return torch.stack(rows)


def _edge_starts(c: torch.Tensor, b: torch.Tensor, count: int) -> torch.Tensor:
    """Newton starts (N, count + 1); for K > ``_EDGE_CLASSES`` from a reduced class set
    (:func:`_leading_classes`; the full construction is O(K^2) per row)."""
    if c.shape[1] > _EDGE_CLASSES:
        cols = _leading_classes(c, b, _EDGE_CLASSES)
        c, b = c.gather(-1, cols), b.gather(-1, cols)
    return _all_edge_starts(c, b, count)


def _all_edge_starts(c: torch.Tensor, b: torch.Tensor, count: int) -> torch.Tensor:
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
    1: "the Newton iteration found no zero",
    2: "a nearer zero exists but could not be located",
    3: "the zero count along the certifying circle could not be certified",
}


def nearest_ghost(logits: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """Certified nearest complex zero of F(t) = sum_k exp(z_k + a_k t), any K.

    The zero t0 with Im t0 > 0 and the smallest modulus (its conjugate is a zero
    too). Each returned zero is certified: the Newton iteration converged with
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

    See ``nearest_ghost`` for the iteration and its certificate. For K = 2 it equals
    ``binary_radius``; in general ``rho_bound <= exact_radius``.

    Args:
        logits, slopes: (..., K).
    Returns:
        (...) rho* in the input's real dtype; +inf where Delta a == 0; NaN (with a
        ``RuntimeWarning``) where certification failed or the input is not finite.
    """
    return nearest_ghost(logits, slopes).abs().to(logits.dtype)
