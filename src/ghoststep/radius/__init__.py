"""Convergence radii of softmax cross-entropy along a direction: the pure tensor math.

The spread ``Delta a`` of the logit slopes, the bound ``rho_a = pi T / Delta a``, the
exact radius for K = 2 and (certified, for any K) the nearest complex zero of the
partition function, batch radii and ``r = ||p|| / rho``, the step rule, and the theory
helpers of the KL remainder and the binary-logistic Hessian comparison. Tensors in,
tensors out; no model is evaluated here (see ``ghoststep.evaluation``).
"""

from ._bounds import (
    aggregate,
    binary_radius,
    clip_radius,
    crossover_margin,
    hessian_radius_ratio,
    hessian_step,
    kl_quadratic_term,
    kl_remainder_bound,
    logistic_curvature,
    logistic_radius,
    logit_spread,
    normalized_step,
    quantile_position,
    radius_from_spread,
    rho_bound,
    step_scale,
    top2_radius,
)
from ._ghosts import exact_radius, nearest_ghost

__all__ = [
    "logit_spread",
    "rho_bound",
    "binary_radius",
    "clip_radius",
    "top2_radius",
    "exact_radius",
    "nearest_ghost",
    "aggregate",
    "quantile_position",
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
