"""Radius control and monitoring inside the trainers people already use.

Each integration lives in its own module and imports its framework only when the module
itself is imported, so ``import ghoststep`` never pulls in Lightning, transformers or
TensorBoard. Install the matching extra to use one:

=======================================  ========================================
module                                   extra
=======================================  ========================================
``ghoststep.integrations.lightning``     ``pip install 'ghoststep[lightning]'``
``ghoststep.integrations.transformers``  ``pip install 'ghoststep[transformers]'``
``ghoststep.integrations.tensorboard``   ``pip install 'ghoststep[tensorboard]'``
=======================================  ========================================

One line each (see ``docs/integrations.md``)::

    trainer = lightning.Trainer(callbacks=[LightningRadiusCallback(mode="clip", target_r=1.0)])
    add_radius_control(hf_trainer, mode="clip", target_r=1.0)
    RadiusController(opt, model, sinks=[TensorBoardSink("runs/tb")])
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

__all__ = ["require", "repoint_scheduler"]


def require(module: str, extra: str, *, feature: str) -> ModuleType:
    """Import ``module`` or raise an ``ImportError`` naming the extra that provides it.

    Args:
        module: the third-party module to import (e.g. ``"lightning.pytorch"``).
        extra: the ghoststep extra that installs it (e.g. ``"lightning"``).
        feature: what needs it, for the message (e.g. ``"ghoststep.integrations.lightning"``).
    Returns:
        The imported module.
    Raises:
        ImportError: the module is missing (or blocked); the message says
            ``pip install 'ghoststep[<extra>]'``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{feature} needs the optional dependency {module.split('.')[0]!r}, which is not "
            f"installed; install it with: pip install 'ghoststep[{extra}]'"
        ) from err


def repoint_scheduler(scheduler: Any, wrapper: Any) -> None:
    """Make an LR scheduler built on an inner optimizer drive its wrapper instead.

    The wrapper shares the inner optimizer's ``param_groups`` dicts, so learning rates
    are unaffected; what changes is ``scheduler.optimizer`` (used e.g. after
    ``load_state_dict`` re-links the groups). PyTorch's schedulers check on their first
    ``step()`` that ``optimizer.step`` carries their call-tracking wrapper (to warn about
    ``lr_scheduler.step()`` before ``optimizer.step()``); an equivalent is installed on
    the wrapper's bound ``step``.

    Args:
        scheduler: the LR scheduler (anything with an ``optimizer`` attribute).
        wrapper: the optimizer wrapper (a ``RadiusController``) around ``scheduler.optimizer``.
    """
    inner = scheduler.optimizer
    scheduler.optimizer = wrapper
    step = wrapper.step
    if hasattr(step, "_wrapped_by_lr_sched"):
        return

    def tracked_step(*args, **kwargs):
        wrapper._opt_called = True
        return step(*args, **kwargs)

    tracked_step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    tracked_step.__wrapped__ = step  # type: ignore[attr-defined]
    wrapper.step = tracked_step
    wrapper._opt_called = bool(getattr(inner, "_opt_called", False))
