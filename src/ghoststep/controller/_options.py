"""``RadiusController``'s grouped options: what travels together as one argument.

* ``sampling=Sampling(...)`` (``_plan``): which training forwards, rows and logit
  positions set the radius;
* ``logits_fn=`` a function, or a ``LogitsReader(fn, class_dim=..., activation=...)``
  (``ghoststep.evaluation``): how the loss reads the model output;
* ``measuring=Measuring(...)``: how the spreads are evaluated (rows per chunk, the
  slope method's keyword arguments, the process group of the distributed reduction);
* ``recording=Recording(...)``: what is kept and written (sinks, history length,
  per-sample radii).

Each option is also accepted as a keyword of its own (``subset=8`` is
``sampling=Sampling(subset=8)``, ``class_dim=1`` is read with ``logits_fn``,
``sinks=[...]`` is ``recording=Recording(sinks=[...])``); :func:`grouped` sorts them.
Beside a grouped argument, such a keyword must be at its default (then it is ignored)
or it is a ``ValueError``: one option, one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ._checks import check_real, is_int
from ._plan import Sampling

__all__ = ["Measuring", "Recording", "grouped"]


@dataclass(frozen=True)
class Measuring:
    """How the controller evaluates the spreads.

    Attributes:
        chunk_size: rows per evaluation (``"jvp"``: each chunk's tangent is reduced to
            its spread at once; ``ghoststep.measurement.per_sample_spread``). None: the
            batch in one pass. Not with train-mode BatchNorm.
        slopes_kwargs: extra keyword arguments for ``ghoststep.evaluation.directional``
            (``"jvp"`` / ``"fd"``; e.g. ``step=`` for ``"fd"``).
        process_group: group of the distributed reduction (default: the world).
        every: measure every step (1, the default: the exact guarantee on every
            applied update), or run always-on (``every=k > 1``): measure every k-th
            step and every step whose proposal is suspicious, and apply the others as
            proposed. A step is measured when there is no measured radius yet, when
            k - 1 steps have passed without one, when tau = ||p|| exceeds ``jump``
            times the tau of the last measured step (a learning-rate spike, a gradient
            spike through Adam's moments), when it would not fit ``target_r (1 -
            stale_margin)`` times the last measured radius (it may need clipping: a
            spike held over many steps is measured on every one of them), or when the
            last measurement found the radius under half the one before (it is moving:
            measure until it holds). What it gives: measured steps keep the exact
            guarantee; an unmeasured step has r <= target_r as long as the radius along
            its update is at least ``1 - stale_margin`` of the last measured one. What
            it gives up: that condition is not checked; an unmeasured step's StepStats
            hold ``rho_a`` NaN, ``measured`` False and r predicted from the last
            measured radius. Clip and monitor mode (set mode needs each step's radius).
        stale_margin: the room, relative to the last measured radius, that an
            unmeasured step must leave, in [0, 1).
        jump: tau over the last measured step's tau above which a step is measured
            (> 1).
    """

    chunk_size: int | None = None
    slopes_kwargs: Mapping[str, Any] | None = None
    process_group: Any = None
    every: int = 1
    stale_margin: float = 0.25
    jump: float = 1.5

    def __post_init__(self) -> None:
        if self.chunk_size is not None and not (is_int(self.chunk_size) and self.chunk_size >= 1):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {self.chunk_size!r}")
        if not (is_int(self.every) and self.every >= 1):
            raise ValueError(f"every must be an int >= 1, got {self.every!r}")
        check_real("stale_margin", self.stale_margin)
        if not 0.0 <= self.stale_margin < 1.0:
            raise ValueError(f"stale_margin must be in [0, 1), got {self.stale_margin!r}")
        check_real("jump", self.jump)
        if not self.jump > 1.0:
            raise ValueError(f"jump must be > 1, got {self.jump!r}")


@dataclass(frozen=True)
class Recording:
    """What the controller keeps and writes per step.

    Attributes:
        sinks: objects with ``write(stats)`` / ``close()`` (see ``ghoststep.monitor``).
        history_size: length of the ``history`` deque of ``StepStats``.
        keep_samples: also keep each step's per-sample rho_a
            (``StepStats.rho_samples``, a CPU tensor; e.g. for the TensorBoard
            histogram). Off by default: for language models it is one number per
            token per step of history.
    """

    sinks: Iterable[Any] = ()
    history_size: int = 1000
    keep_samples: bool = False

    def __post_init__(self) -> None:
        if not (is_int(self.history_size) and self.history_size >= 0):
            raise ValueError(f"history_size must be an int >= 0, got {self.history_size!r}")


_READING = ("class_dim", "activation")


def _at_default(value, default) -> bool:
    return value is default or (type(value) is type(default) and value == default)


def grouped(options: dict[str, Any], *, sampling, measuring, recording):
    """``(sampling, (class_dim, activation), measuring, recording)`` from the grouped
    arguments and the options given as keywords of their own."""
    groups = {"sampling": Sampling, "measuring": Measuring, "recording": Recording}
    given = {"sampling": sampling, "measuring": measuring, "recording": recording}
    out = {}
    for name, cls in groups.items():
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        loose = {k: options.pop(k) for k in list(options) if k in fields}
        if given[name] is not None:
            # a keyword at its default says nothing (e.g. an integration's default
            # ``micro_batches="all"``): the grouped argument decides
            loose = {k: v for k, v in loose.items() if not _at_default(v, fields[k])}
        if loose and given[name] is not None:
            raise ValueError(
                f"pass {sorted(loose)} inside {name}={cls.__name__}(...), not beside it"
            )
        if given[name] is not None and not isinstance(given[name], cls):
            raise TypeError(f"{name} must be a {cls.__name__}, got {type(given[name]).__name__}")
        out[name] = given[name] if given[name] is not None else cls(**loose)
    reading = tuple(options.pop(k, None) for k in _READING)
    if options:
        raise TypeError(f"RadiusController got unexpected keyword argument(s) {sorted(options)}")
    return out["sampling"], reading, out["measuring"], out["recording"]
