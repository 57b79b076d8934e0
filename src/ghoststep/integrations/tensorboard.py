"""TensorBoard sink: every :class:`~ghoststep.StepStats` field as a scalar, plus histograms.

Example::

    from ghoststep import RadiusController
    from ghoststep.integrations.tensorboard import TensorBoardSink

    opt = RadiusController(torch.optim.Adam(model.parameters()), model,
                           sinks=[TensorBoardSink("runs/tb", histogram_every=50)])
    # tensorboard --logdir runs/tb  ->  ghoststep/tau, ghoststep/rho_a, ghoststep/r_after, ...

Scalars are written under ``<prefix><field>`` at ``global_step = stats.step``; booleans
as 0/1; a missing loss is left out. Histograms (every ``histogram_every`` steps): the
per-sample radii ``pi T / Delta a(x)`` of that step under ``<prefix>rho_a_samples`` when
the record carries them (``RadiusController(..., keep_samples=True)``), and always the
radii ``rho_a`` of the steps since the previous histogram under ``<prefix>rho_a_steps``.
Non-finite values are dropped from histograms (TensorBoard cannot bin them).
"""

from __future__ import annotations

import math
import os
from typing import Any

from ghoststep.integrations import require
from ghoststep.monitor import StepStats

require("tensorboard", "tensorboard", feature="ghoststep.integrations.tensorboard")
from torch.utils.tensorboard import SummaryWriter  # noqa: E402  (needs the package above)

__all__ = ["TensorBoardSink"]


class TensorBoardSink:
    """Write :class:`StepStats` to TensorBoard (a ``ghoststep.monitor.Sink``).

    Args:
        log_dir: directory for a new ``SummaryWriter`` (ignored when ``writer`` is given).
        writer: an existing ``SummaryWriter`` (e.g. the one your loop already uses); it is
            flushed but not closed by :meth:`close` unless ``close_writer=True``.
        histogram_every: write the histograms every N steps (0: never).
        prefix: tag prefix.
        flush_every: flush the writer every N steps (TensorBoard also flushes on a timer).
        close_writer: close a passed-in ``writer`` in :meth:`close`.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        writer: Any = None,
        histogram_every: int = 0,
        prefix: str = "ghoststep/",
        flush_every: int = 50,
        close_writer: bool = False,
    ) -> None:
        if writer is None and log_dir is None:
            raise ValueError("give log_dir or writer")
        for name, value in (("histogram_every", histogram_every), ("flush_every", flush_every)):
            if not (isinstance(value, int) and value >= 0):
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        self._owns_writer = writer is None or close_writer
        self.writer = writer if writer is not None else SummaryWriter(os.fspath(log_dir))
        self.histogram_every = histogram_every
        self.prefix = prefix
        self.flush_every = flush_every
        self._recent_rho: list[float] = []
        self._closed = False

    def write(self, stats: StepStats) -> None:
        if self._closed:
            raise ValueError("TensorBoardSink is closed")
        step = int(stats.step)
        for key, value in stats.scalars().items():
            self.writer.add_scalar(f"{self.prefix}{key}", value, step)
        if self.histogram_every:
            if not stats.skipped:
                self._recent_rho.append(float(stats.rho_a))
            if step % self.histogram_every == 0:
                self._histograms(stats, step)
        if self.flush_every and step % self.flush_every == 0:
            self.writer.flush()

    def _histograms(self, stats: StepStats, step: int) -> None:
        import numpy as np

        samples = getattr(stats, "rho_samples", None)
        if samples is not None:
            values = np.asarray(_to_numpy(samples), dtype=np.float64).reshape(-1)
            values = values[np.isfinite(values)]
            if values.size:
                self.writer.add_histogram(f"{self.prefix}rho_a_samples", values, step)
        steps = np.asarray([r for r in self._recent_rho if math.isfinite(r)], dtype=np.float64)
        self._recent_rho.clear()
        if steps.size:
            self.writer.add_histogram(f"{self.prefix}rho_a_steps", steps, step)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.writer.flush()
        if self._owns_writer:
            self.writer.close()

    def __enter__(self) -> TensorBoardSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorBoardSink({getattr(self.writer, 'log_dir', '?')!r})"


def _to_numpy(values: Any):
    detach = getattr(values, "detach", None)
    if detach is not None:
        return detach().cpu().double().numpy()
    return values
