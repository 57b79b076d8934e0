"""Measuring the radius of a model along a direction.

``logit_slopes`` gives the logits and their directional slopes, ``per_sample_spread``
the per-sample spreads ``Delta a`` (chunk by chunk), and ``measure`` the radius,
bottleneck and ``r = ||p|| / rho_a`` of one batch (``Measurement``).
"""

from ._measure import Measurement, measure
from ._slopes import flatten_samples, logit_slopes, per_sample_spread

__all__ = ["Measurement", "measure", "logit_slopes", "per_sample_spread", "flatten_samples"]
