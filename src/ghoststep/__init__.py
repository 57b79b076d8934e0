"""ghoststep: step-safe cross-entropy training.

The softmax partition function F(t) = sum_k exp(z_k + a_k t) has complex zeros
("ghosts") that cap the radius in which the loss's Taylor series along an update
direction converges. ghoststep measures that radius (``radius``, ``slopes``,
``measurement``), monitors it (``monitor``) and keeps optimizer updates inside it
(``controller``).

Reference: P. Sao, "Ghosts of Softmax: Complex Singularities That Limit Safe Step
Sizes in Cross-Entropy", arXiv:2603.13552 (2026).

Public names are imported lazily so that ``import ghoststep`` stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # radius: pure tensor math
    "logit_spread": "radius",
    "rho_bound": "radius",
    "binary_radius": "radius",
    "top2_radius": "radius",
    "exact_radius": "radius",
    "nearest_ghost": "radius",
    "aggregate": "radius",
    "normalized_step": "radius",
    # slopes: directional logit derivatives of modules
    "logit_slopes": "slopes",
    "per_sample_spread": "slopes",
    "flatten_samples": "slopes",
    # measurement: the radius measurement of a batch
    "measure": "measurement",
    "Measurement": "measurement",
    # directions and the optimizer's update
    "gradient_direction": "directions",
    "random_direction": "directions",
    "direction_norm": "directions",
    "optimizer_update_direction": "updates",
    # controller and monitoring
    "RadiusController": "controller",
    "StepStats": "monitor",
    "CSVSink": "monitor",
    "JSONLSink": "monitor",
    "CallbackSink": "monitor",
    "Sink": "monitor",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ghoststep' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ghoststep.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
