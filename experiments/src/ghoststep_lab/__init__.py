"""The experiments of ghoststep: reproductions and extensions of the paper, one module
per experiment, run by ``ghoststep run <name>`` (the subcommands are in
:mod:`ghoststep_lab.cli`).

The helpers they share (runner, results, training loop, data, models, ...) are in
:mod:`ghoststep_lab.common`.

The registry maps each name to its module (``ghoststep_lab.<name>``; the
``directions`` experiment is ``gradient_directions``), imported only when the
experiment is run (``ghoststep list`` imports nothing). What a module
must define is described in :mod:`ghoststep_lab.common.runner` (the runner).

Example:
    >>> from ghoststep_lab import EXPERIMENTS
    >>> EXPERIMENTS["hessian"].paper
    'Fig. 13'
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple

__version__ = "0.1.0"

__all__ = [
    "EXPERIMENTS",
    "Experiment",
    "ExperimentNotWritten",
    "names",
    "registry_entry",
    "load_experiment",
]


class Experiment(NamedTuple):
    module: str
    description: str
    paper: str


EXPERIMENTS: dict[str, Experiment] = {
    "phase": Experiment(
        "ghoststep_lab.phase",
        "one step of size r*rho_a along the gradient, six architectures: collapse once r >= 1",
        "Fig. 1, Fig. 7",
    ),
    "directions": Experiment(
        "ghoststep_lab.gradient_directions",
        "gradient vs 20 random directions at three training stages; Hessian step vs rho_a",
        "Fig. 8",
    ),
    "spike": Experiment(
        "ghoststep_lab.spike",
        "MLP + Adam with a 1000x learning-rate spike at step 50: plain Adam vs the controller",
        "Fig. 6",
    ),
    "archgrid": Experiment(
        "ghoststep_lab.archgrid",
        "controller vs plain Adam vs gradient clipping across architectures and spike sizes",
        "Fig. 10, Table 1",
    ),
    "temperature": Experiment(
        "ghoststep_lab.temperature",
        "softmax temperature fingerprint: collapse onsets align after normalizing by rho_a(T)",
        "Fig. 9",
    ),
    "transformer": Experiment(
        "ghoststep_lab.transformer",
        "tiny transformer: all-radii vs output-only controller vs fixed LR; which radius binds",
        "Fig. 11, Table 2",
    ),
    "resnet": Experiment(
        "ghoststep_lab.resnet",
        "ResNet-18 on CIFAR-10 (data on disk, GPU): r at fixed LRs vs the set-controller",
        "Fig. 12, Table 3",
    ),
    "hessian": Experiment(
        "ghoststep_lab.hessian",
        "binary logistic theory: Hessian step 2/f'' vs convergence radius across margins",
        "Fig. 13",
    ),
    "ghostmap": Experiment(
        "ghoststep_lab.ghostmap",
        "nearest ghosts of held-out samples along the Adam update, in units of the step",
        "new (the method's picture)",
    ),
    "calibration": Experiment(
        "ghoststep_lab.calibration",
        "calibration of the bound rho_a against the exact radius rho* and the real line loss",
        "open question",
    ),
    "baselines": Experiment(
        "ghoststep_lab.baselines",
        "the controller vs AGC, ZClip, AdaGC, SPAM, StableSPAM and clipping under LR spikes",
        "beyond the paper",
    ),
    "lrsweep": Experiment(
        "ghoststep_lab.lrsweep",
        "no spike: final accuracy vs base LR over six decades, plain vs controller",
        "beyond the paper",
    ),
    "lm": Experiment(
        "ghoststep_lab.lm",
        "GPT-style LM on the Python standard library, V = 256..50257: r, rho*/rho_a, high LR",
        "open question",
    ),
    "lmstability": Experiment(
        "ghoststep_lab.lmstability",
        "Wortsman et al. small-scale proxies: LR sensitivity, attention / output-logit growth",
        "beyond the paper",
    ),
}


class ExperimentNotWritten(NotImplementedError):
    """The experiment is registered but its module does not exist yet."""


def names() -> list[str]:
    """Registered experiment names, in registry order."""
    return list(EXPERIMENTS)


def registry_entry(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise KeyError(
            f"unknown experiment {name!r}; valid names: {', '.join(EXPERIMENTS)}"
        ) from None


def load_experiment(name: str) -> ModuleType:
    """Import and return the module of experiment ``name`` (checked against the contract)."""
    entry = registry_entry(name)
    try:
        module = importlib.import_module(entry.module)
    except ModuleNotFoundError as exc:
        if exc.name != entry.module:
            raise
        raise ExperimentNotWritten(
            f"experiment {name!r} is registered but {entry.module} is not written yet"
        ) from exc
    missing = [attr for attr in ("Config", "PRESETS", "run") if not hasattr(module, attr)]
    if missing:
        raise TypeError(f"{entry.module} breaks the runner contract: missing {missing}")
    return module
