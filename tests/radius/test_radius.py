"""Tests for ghoststep.radius: closed forms, an mpmath reference, invariants, bad input."""

from __future__ import annotations

import math
import warnings

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ghoststep import radius as R
from ghoststep.radius import _ghosts as ghosts

# ---------------------------------------------------------------- reference solver


def _mp_nearest_zero(z, a, digits=50):
    """Nearest zero of F(t) = sum exp(z_k + a_k t) with mpmath, independently of ghoststep.

    Roots by findroot from many starts (a polar grid plus the two-term zeros of the
    largest logits); the nearest one is then certified by an argument-principle
    winding number showing no zero inside 0.99 of its modulus.
    """
    with mpmath.workdps(digits):
        zs = [mpmath.mpf(float(v)) for v in z]
        sl = [mpmath.mpf(float(v)) for v in a]

        def f(t):
            return mpmath.fsum(mpmath.exp(zk + ak * t) for zk, ak in zip(zs, sl))

        def df(t):
            return mpmath.fsum(ak * mpmath.exp(zk + ak * t) for zk, ak in zip(zs, sl))

        order = np.argsort(-np.asarray(z))[:5]
        starts = []
        for i in order:
            for j in order:
                gap = float(a[j] - a[i])
                if i < j and gap != 0:
                    starts.append(complex((z[i] - z[j]) / gap, math.pi / abs(gap)))
        # top-2 scale for the grid
        spread = float(np.max(a) - np.min(a))
        scale = max(abs(s) for s in starts) if starts else 3 * math.pi / spread
        for frac in (0.3, 0.5, 0.7, 0.85, 1.0, 1.3):
            for ang in np.linspace(0.1, math.pi - 0.1, 9):
                starts.append(frac * scale * complex(math.cos(ang), math.sin(ang)))
        roots = []
        for s0 in starts:
            try:
                root = mpmath.findroot(
                    f, mpmath.mpc(s0), df=df, tol=mpmath.mpf(10) ** (-digits + 10)
                )
            except (ValueError, ZeroDivisionError):
                continue
            total = mpmath.fsum(abs(mpmath.exp(zk + ak * root)) for zk, ak in zip(zs, sl))
            if abs(f(root)) < mpmath.mpf(10) ** (-30) * total:
                roots.append(root)
        assert roots, "reference: findroot found no zero"
        nearest = min(roots, key=abs)
        # Winding number of F along |t| = 0.99 |nearest|, sampled finely enough that
        # consecutive samples (spacing 0.006 |t|) cannot skip a turn around a zero
        # that is at least 0.01 |t| away.
        inner = abs(nearest) * mpmath.mpf("0.99")
        values = [f(inner * mpmath.expj(2 * mpmath.pi * j / 1024)) for j in range(1025)]
        winding = mpmath.fsum(mpmath.arg(v1 / v0) for v0, v1 in zip(values, values[1:]))
        assert abs(winding) < 1, f"reference: zeros inside the nearest found root ({winding})"
        return complex(nearest)


@pytest.mark.slow
@pytest.mark.parametrize("num_classes", [2, 3, 5, 10, 50])
def test_exact_radius_matches_mpmath(num_classes):
    gen = torch.Generator().manual_seed(100 + num_classes)
    samples = 3 if num_classes < 50 else 2
    logits = torch.randn(samples, num_classes, generator=gen, dtype=torch.float64) * 3
    slopes = torch.randn(samples, num_classes, generator=gen, dtype=torch.float64)
    ours = R.exact_radius(logits, slopes)
    ghost = R.nearest_ghost(logits, slopes)
    for i in range(samples):
        ref = _mp_nearest_zero(logits[i].numpy(), slopes[i].numpy())
        assert ours[i].item() == pytest.approx(abs(ref), rel=1e-6)
        # the location, not just the modulus (upper half-plane representative)
        assert abs(complex(ghost[i]) - complex(ref.real, abs(ref.imag))) < 1e-6 * abs(ref)


def test_binary_closed_form_and_zero_location():
    logits = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    slopes = torch.tensor([[0.5, -1.5]], dtype=torch.float64)
    # delta = 3, Delta a = 2: nearest zeros at t = (-3 +- i pi) / 2
    assert R.binary_radius(logits, slopes).item() == pytest.approx(math.sqrt(9 + math.pi**2) / 2)
    ghost = complex(R.nearest_ghost(logits, slopes)[0])
    assert ghost == pytest.approx(complex(-1.5, math.pi / 2), abs=1e-12)
    terms = torch.exp(logits[0] + slopes[0] * ghost)
    assert abs(terms.sum()) < 1e-12 * terms.abs().sum()


def test_geometric_series_closed_form():
    # z = 0, a_k = k / (K - 1): F = (1 - e^{K u}) / (1 - e^u), u = t / (K - 1);
    # nearest zeros at u = 2 pi i / K, so rho* = 2 pi (K - 1) / K.
    for k in (3, 10, 50):
        slopes = torch.linspace(0, 1, k, dtype=torch.float64)[None]
        rho = R.exact_radius(torch.zeros_like(slopes), slopes).item()
        assert rho == pytest.approx(2 * math.pi * (k - 1) / k, rel=1e-9)


def test_exact_handles_extremes():
    gen = torch.Generator().manual_seed(0)
    # K = 1000 and logits spanning +-1e4, all certified, never below the bound
    wide = torch.randn(4, 1000, generator=gen, dtype=torch.float64)
    wide_slopes = torch.randn(4, 1000, generator=gen, dtype=torch.float64)
    huge = torch.randn(3, 10, generator=gen, dtype=torch.float64) * 1e4
    huge_slopes = torch.randn(3, 10, generator=gen, dtype=torch.float64)
    for logits, slopes in ((wide, wide_slopes), (huge, huge_slopes)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rho = R.exact_radius(logits, slopes)
        assert torch.isfinite(rho).all()
        assert (rho >= R.rho_bound(slopes)).all()
    # binary with huge logits against the closed form
    z2 = torch.tensor([[1e4, -1e4]], dtype=torch.float64)
    a2 = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    assert R.exact_radius(z2, a2).item() == pytest.approx(R.binary_radius(z2, a2).item(), rel=1e-9)


def test_ties_zero_spread_and_nonfinite_rows():
    logits = torch.tensor(
        [[1.0, 1.0, 0.0], [0.5, 2.0, -1.0], [0.0, 1.0, 2.0], [float("nan"), 0.0, 0.0]],
        dtype=torch.float64,
    )
    slopes = torch.tensor(
        [[1.0, 1.0, -1.0], [3.0, 3.0, 3.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0]], dtype=torch.float64
    )
    rho = R.exact_radius(logits, slopes)
    assert math.isfinite(rho[0]) and rho[0] >= R.rho_bound(slopes)[0]
    assert rho[1] == float("inf") and R.rho_bound(slopes)[1] == float("inf")
    assert math.isfinite(rho[2])
    assert math.isnan(rho[3])
    ghost = R.nearest_ghost(logits, slopes)
    assert ghost.dtype == torch.complex128 and ghost[1].real == float("inf")


def test_dtypes_and_batch_shapes():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 4, generator=gen)
    slopes = torch.randn(2, 3, 4, generator=gen)
    rho = R.exact_radius(logits, slopes)
    assert rho.shape == (2, 3) and rho.dtype == torch.float32
    assert R.nearest_ghost(logits, slopes).dtype == torch.complex64
    ref = R.exact_radius(logits.double().reshape(6, 4), slopes.double().reshape(6, 4))
    torch.testing.assert_close(rho.reshape(6).double(), ref, rtol=1e-6, atol=0)
    for fn in (R.logit_spread, R.rho_bound):
        assert fn(slopes).shape == (2, 3)
    assert R.top2_radius(logits, slopes).shape == (2, 3)


def test_spread_and_bound_closed_form():
    slopes = torch.tensor([[0.5, -1.0, 2.0], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(R.logit_spread(slopes), torch.tensor([3.0, 0.0]))
    rho = R.rho_bound(slopes, temperature=2.0)
    assert rho[0].item() == pytest.approx(2 * math.pi / 3) and rho[1] == float("inf")


def test_top2_uses_runner_up_or_target():
    logits = torch.tensor([[3.0, 1.0, 2.0]], dtype=torch.float64)
    slopes = torch.tensor([[1.0, 5.0, -1.0]], dtype=torch.float64)
    # no target: y = 0, c = 2 (runner-up), delta = 1, gap = 2
    assert R.top2_radius(logits, slopes).item() == pytest.approx(math.sqrt(1 + math.pi**2) / 2)
    # target 1: c = 0 (strongest other), delta = -2, gap = 4
    target = torch.tensor([1])
    assert R.top2_radius(logits, slopes, target).item() == pytest.approx(
        math.sqrt(4 + math.pi**2) / 4
    )


def test_aggregate_and_normalized_step():
    rho = torch.tensor([4.0, 1.0, float("inf"), 2.0])
    assert R.aggregate(rho).item() == 1.0
    # q is a quantile of the spread: q = 1 the max spread, i.e. the min radius
    assert R.aggregate(rho, ("quantile", 1.0)).item() == 1.0
    assert R.aggregate(rho, ("quantile", 0.5)).item() == 2.0
    assert R.aggregate(rho, ("quantile", 0.0)).item() == float("inf")
    slopes = torch.randn(7, 5)
    assert R.aggregate(R.rho_bound(slopes)).item() == pytest.approx(
        math.pi / R.logit_spread(slopes).max().item()
    )
    assert R.normalized_step(2.0, 4.0).item() == 0.5
    assert R.normalized_step(torch.tensor(1.0), torch.tensor(float("inf"))).item() == 0.0


def test_theory_helpers():
    assert R.logistic_curvature(0.0).item() == pytest.approx(0.25)
    sig = 1 / (1 + math.exp(-10))
    assert R.logistic_curvature(10.0).item() == pytest.approx(sig * (1 - sig), rel=1e-12)
    assert R.logistic_radius(10.0).item() == pytest.approx(math.sqrt(100 + math.pi**2))
    ratio = R.hessian_radius_ratio(10.0).item()
    assert ratio > 4000 and ratio == pytest.approx(
        2 / (sig * (1 - sig)) / math.sqrt(100 + math.pi**2)
    )
    # at the crossover margin 2 / (e^-delta gap^2) equals pi / gap
    gap = 7.0
    delta = R.crossover_margin(gap).item()
    assert 2 / (math.exp(-delta) * gap**2) == pytest.approx(math.pi / gap)
    assert R.kl_remainder_bound(0.5, 2.0).item() == pytest.approx(1 / (18 * math.sqrt(3)))


def test_kl_remainder_bound_holds():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(200, 6, generator=gen, dtype=torch.float64) * 2
    slopes = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    for tau in (0.05, 0.2, 0.5):
        p0 = torch.softmax(logits, -1)
        pt = torch.softmax(logits + tau * slopes, -1)
        kl = (pt * (pt.log() - p0.log())).sum(-1)
        gap = (kl - R.kl_quadratic_term(logits, slopes, tau)).abs()
        assert (gap <= R.kl_remainder_bound(tau, R.logit_spread(slopes)) + 1e-15).all()


# ------------------------------------------------------------------ properties

# Values on a 0.01 grid: shifts and sign flips then change spreads only by rounding
# (a float draw like 4e-142 next to a shift of 1 would lose its spread entirely).
_floats = st.integers(-2000, 2000).map(lambda v: v / 100)
_slopes = st.integers(-500, 500).map(lambda v: v / 100)


@st.composite
def _samples(draw, min_k=2, max_k=7):
    k = draw(st.integers(min_k, max_k))
    z = draw(st.lists(_floats, min_size=k, max_size=k))
    a = draw(st.lists(_slopes, min_size=k, max_size=k))
    return torch.tensor([z], dtype=torch.float64), torch.tensor([a], dtype=torch.float64)


@settings(max_examples=60, deadline=None)
@given(_samples())
def test_bound_below_exact(sample):
    logits, slopes = sample
    rho_a, rho_star = R.rho_bound(slopes), R.exact_radius(logits, slopes)
    assert not torch.isnan(rho_star).any()
    assert (rho_a <= rho_star * (1 + 1e-9)).all()


@settings(max_examples=60, deadline=None)
@given(_samples(2, 2))
def test_binary_exact_equals_closed_form(sample):
    logits, slopes = sample
    torch.testing.assert_close(
        R.exact_radius(logits, slopes), R.binary_radius(logits, slopes), rtol=1e-9, atol=0
    )
    torch.testing.assert_close(
        R.top2_radius(logits, slopes), R.binary_radius(logits, slopes), rtol=1e-12, atol=0
    )


def _all_radii(logits, slopes):
    return torch.stack(
        [
            R.logit_spread(slopes),
            R.rho_bound(slopes),
            R.top2_radius(logits, slopes),
            R.exact_radius(logits, slopes),
        ]
    )


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(_samples(), st.floats(-50, 50), st.floats(-5, 5), st.randoms(use_true_random=False))
def test_invariances(sample, logit_shift, slope_shift, rnd):
    logits, slopes = sample
    base = _all_radii(logits, slopes)
    perm = list(range(logits.shape[-1]))
    rnd.shuffle(perm)
    variants = [
        (logits, -slopes),
        (logits + logit_shift, slopes),
        (logits, slopes + slope_shift),
        (logits[:, perm], slopes[:, perm]),
    ]
    top = logits.sort(dim=-1, descending=True).values[..., :3]
    ties = bool((top[..., 1:] == top[..., :-1]).any())
    for index, (z, a) in enumerate(variants):
        # With tied leading logits the runner-up class is a matter of index order.
        rows = slice(None) if index < 3 or not ties else [0, 1, 3]
        torch.testing.assert_close(_all_radii(z, a)[rows], base[rows], rtol=1e-6, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(_samples(), st.floats(0.05, 20))
def test_temperature_law(sample, temperature):
    _, slopes = sample
    torch.testing.assert_close(
        R.rho_bound(slopes, temperature), temperature * R.rho_bound(slopes), rtol=1e-12, atol=0
    )
    # the same as computing with tempered slopes a / T
    torch.testing.assert_close(
        R.rho_bound(slopes, temperature), R.rho_bound(slopes / temperature), rtol=1e-12, atol=0
    )


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: R.logit_spread(torch.tensor([[1, 2]])), "slopes must be a real floating-point"),
        (
            lambda: R.rho_bound(torch.zeros(3, 2, dtype=torch.complex64)),
            "slopes must be a real floating-point",
        ),
        (lambda: R.rho_bound(torch.zeros(3, 1)), "at least 2 classes"),
        (lambda: R.rho_bound(torch.tensor(1.0)), "class axis"),
        (lambda: R.rho_bound([[1.0, 2.0]]), "slopes must be a torch.Tensor"),
        (lambda: R.rho_bound(torch.zeros(2, 3), temperature=0.0), "temperature"),
        (lambda: R.exact_radius(torch.zeros(2, 3), torch.zeros(2, 4)), "same shape"),
        (lambda: R.exact_radius(torch.zeros(2, 3).int(), torch.zeros(2, 3)), "logits must be"),
        (lambda: R.binary_radius(torch.zeros(2, 3), torch.zeros(2, 3)), "K=2"),
        (
            lambda: R.top2_radius(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.0, 1.0])),
            "target must be an integer",
        ),
        (
            lambda: R.top2_radius(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 3])),
            r"target must hold class indices in \[0, 3\)",
        ),
        (
            lambda: R.top2_radius(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0])),
            "target must have the batch shape",
        ),
        (lambda: R.aggregate(torch.tensor([1.0, float("nan")])), "contains NaN"),
        (lambda: R.aggregate(torch.tensor([])), "empty"),
        (lambda: R.aggregate(torch.tensor([1.0, -1.0])), ">= 0"),
        (lambda: R.aggregate(torch.tensor([1.0]), "max"), "aggregate how"),
        (lambda: R.aggregate(torch.tensor([1.0]), ("quantile", 2)), "quantile q"),
        (lambda: R.normalized_step(-1.0, 1.0), "tau must be >= 0"),
    ],
)
def test_bad_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_nonfinite_values_propagate_per_sample():
    slopes = torch.tensor([[0.0, float("inf")], [0.0, 1.0], [float("nan"), 1.0]])
    logits = torch.zeros_like(slopes)
    for value in (R.logit_spread(slopes), R.rho_bound(slopes), R.binary_radius(logits, slopes)):
        assert math.isnan(value[0]) and math.isfinite(value[1]) and math.isnan(value[2])
    assert torch.isnan(R.exact_radius(logits, slopes)[[0, 2]]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype):
    gen = torch.Generator().manual_seed(11)
    logits = (torch.randn(64, 10, generator=gen) * 3).to(dtype)
    slopes = torch.randn(64, 10, generator=gen).to(dtype)
    for fn in (R.rho_bound, R.logit_spread):
        torch.testing.assert_close(fn(slopes.cuda()).cpu(), fn(slopes))
    torch.testing.assert_close(
        R.top2_radius(logits.cuda(), slopes.cuda()).cpu(), R.top2_radius(logits, slopes)
    )
    on_gpu = R.exact_radius(logits.cuda(), slopes.cuda())
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == dtype
    torch.testing.assert_close(on_gpu.cpu(), R.exact_radius(logits, slopes), rtol=1e-6, atol=0)


@pytest.mark.parametrize("delta", [3.0, 40.0, 5000.0])
def test_zero_count_on_large_circles(delta):
    # Scaled binary H(s) = exp(-s/2) + exp(-delta + s/2) vanishes at s = delta + i pi (2m+1).
    # A circle of radius sqrt(delta^2 + (4 pi)^2) holds the four with |2m+1| <= 3; at
    # delta = 5000 its arcs are certified mostly by one dominant term, not by derivatives.
    c = torch.tensor([[0.0, -delta]], dtype=torch.float64)
    b = torch.tensor([[-0.5, 0.5]], dtype=torch.float64)
    for imag, expected in ((4 * math.pi, 4), (2 * math.pi, 2), (0.5 * math.pi, 0)):
        radius = torch.tensor([math.hypot(delta, imag)], dtype=torch.float64)
        count, certified = ghosts._zero_count(c, b, radius)
        assert bool(certified[0]) and int(count[0]) == expected
