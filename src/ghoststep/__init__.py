"""ghoststep: step-safe cross-entropy training.

The softmax partition function F(t) = sum_k exp(z_k + a_k t) has complex zeros
("ghosts") that cap the radius in which the loss's Taylor series along an update
direction converges. ghoststep computes that radius (``ghoststep.radius``, the pure
math), evaluates a model along a direction (``ghoststep.evaluation``), measures the
radius of a batch (``ghoststep.measurement``), monitors it (``ghoststep.monitor``) and
keeps optimizer updates inside it (``ghoststep.controller``).

Reference: P. Sao, "Ghosts of Softmax: Complex Singularities That Limit Safe Step
Sizes in Cross-Entropy", arXiv:2603.13552 (2026).

The top level holds the names most code needs (``__all__``); each subpackage exports
the rest of its public names. They are imported lazily so that ``import ghoststep``
stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # the radius: pure tensor math (more in ghoststep.radius)
    "rho_bound": "radius",
    "exact_radius": "radius",
    # measuring a model along a direction (more in ghoststep.measurement)
    "measure": "measurement",
    "Measurement": "measurement",
    "logit_slopes": "measurement",
    # directions in parameter space (more in ghoststep.evaluation)
    "gradient_direction": "evaluation",
    "random_direction": "evaluation",
    "optimizer_update_direction": "evaluation",
    "Call": "evaluation",
    # the controller and its monitoring
    "RadiusController": "controller",
    "Sampling": "controller",
    "StepStats": "monitor",
    "CSVSink": "monitor",
    "JSONLSink": "monitor",
    "CallbackSink": "monitor",
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
