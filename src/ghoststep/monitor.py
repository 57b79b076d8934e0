"""Per-step radius statistics and the sinks that record them.

:class:`StepStats` is the typed record a :class:`~ghoststep.RadiusController` fills once
per optimizer step (``controller.last``, ``controller.history``). Sinks receive each record
as it is produced; anything with ``write(stats)`` and ``close()`` is a sink
(:class:`Sink` protocol), so a TensorBoard or wandb sink can be added without touching
this module::

    class TensorBoardSink:
        def __init__(self, writer):
            self.writer = writer

        def write(self, stats):
            for key, value in stats.scalars().items():
                self.writer.add_scalar(f"ghoststep/{key}", value, stats.step)

        def close(self):
            self.writer.flush()

The two file sinks here write incrementally -- a header (CSV) and then one line per step,
flushed after every write -- so a crashed or still-running job can be inspected.

Examples:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "r.csv"
    >>> sink = CSVSink(path)
    >>> sink.write(StepStats(step=1, tau=0.1, rho_a=0.2, r_before=0.5, r_after=0.5,
    ...                      scale=1.0, bottleneck=3, radius_seconds=0.01, skipped=False,
    ...                      lr=1e-3))
    >>> sink.close()
    >>> path.read_text().splitlines()[0].split(",")[:3]
    ['step', 'tau', 'rho_a']
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Protocol, runtime_checkable

__all__ = ["StepStats", "Sink", "CSVSink", "JSONLSink", "CallbackSink", "DEFAULT_KEYS"]

#: StepStats fields the trainer integrations log by default (as ``ghoststep/<key>``).
DEFAULT_KEYS: tuple[str, ...] = ("tau", "rho_a", "r_before", "r_after", "scale")


_NON_SCALAR = ("rho_samples", "radii")


@dataclass(frozen=True)
class StepStats:
    """What one controlled optimizer step did.

    Attributes:
        step: 1-based count of ``step()`` calls on the controller (skipped ones included).
        tau: ``||p||``, Euclidean norm of the inner optimizer's proposed update p
            (over all trainable parameters of all groups). NaN when p was not formed.
        rho_a: the output logits' radius bound of this step, ``pi * T / spread`` (after
            the quantile aggregation); ``inf`` when no logit moves along p.
        r_before: ``tau / radius``, normalized step the inner optimizer proposed.
        r_after: ``scale * tau / radius``, normalized step actually applied.
        scale: factor s applied to p (``theta = old + s * p``); 0 for a skipped step.
        bottleneck: flat index, over the logit positions of the evaluated rows (the
            batch, or its drawn subset, first, then buffered rows; ``b * T + t`` for
            (B, T, V) logits), of the sample with the largest spread; -1 if none.
        radius_seconds: wall time spent on the radius (slopes, aggregation, reduction).
        skipped: True when the step was skipped because something was not finite.
        lr: learning rate of parameter group 0 at the time of the step.
        loss: value returned by the closure, if one was given and returned a number.
        spread: the aggregated logit-slope spread ``Delta a`` along v = p / ||p||
            (before the window minimum).
        radius: the radius the step rule used: the smallest of ``rho_a`` and the extra
            radii named by ``limit_by``, and of the previous ``window - 1`` steps' ones;
            ``rho_a`` itself without extra radii or window.
    """

    step: int
    tau: float
    rho_a: float
    r_before: float
    r_after: float
    scale: float
    bottleneck: int
    radius_seconds: float
    skipped: bool
    lr: float
    loss: float | None = None
    spread: float = math.nan
    radius: float = math.nan
    # Per-sample rho_a of the step (1-D CPU tensor), only with keep_samples=True; not a
    # scalar column, so the file sinks leave it out (TensorBoard draws a histogram).
    rho_samples: Any = dataclasses.field(default=None, repr=False, compare=False)
    # With the controller's ``extra_radii`` hook: every radius of the step by name
    # (``"out"`` is the output-logit rho_a), distances along the unit update direction.
    radii: Any = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def field_names(cls) -> list[str]:
        """Column order used by the sinks (the scalar fields)."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in _NON_SCALAR]

    @property
    def binding(self) -> str | None:
        """Name of the smallest radius in ``radii`` (None without the hook)."""
        return min(self.radii, key=self.radii.get) if self.radii else None

    def as_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of the scalar fields (JSON-friendly Python scalars)."""
        return {name: getattr(self, name) for name in self.field_names()}

    def scalars(self) -> dict[str, float]:
        """Numeric fields as floats (booleans as 0/1, a missing loss left out)."""
        out: dict[str, float] = {}
        for key, value in self.as_dict().items():
            if value is None or key == "step":
                continue
            out[key] = float(value)
        return out


@runtime_checkable
class Sink(Protocol):
    """Anything that records :class:`StepStats`: ``write`` once per step, ``close`` at the end.

    ``write`` must not keep a reference that it later mutates; records are immutable.
    """

    def write(self, stats: StepStats) -> None: ...

    def close(self) -> None: ...


class _FileSink:
    """Shared plumbing: open lazily-created parent directories, flush per write."""

    def __init__(self, path: str | os.PathLike[str], *, append: bool = False) -> None:
        self.path = os.fspath(path)
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._existing = append and os.path.exists(self.path) and os.path.getsize(self.path) > 0
        self._file: IO[str] | None = open(  # closed in close()
            self.path, "a" if append else "w", newline="", encoding="utf-8"
        )

    def _handle(self) -> IO[str]:
        if self._file is None:
            raise ValueError(f"{type(self).__name__}({self.path!r}) is closed")
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"


class CSVSink(_FileSink):
    """Write one CSV row per step (header first), flushed after each row.

    Args:
        path: file to create (parent directories are made). Truncated unless ``append``.
        append: add rows to an existing file (the header is written only if it is empty).
    """

    def __init__(self, path: str | os.PathLike[str], *, append: bool = False) -> None:
        super().__init__(path, append=append)
        self._writer = csv.DictWriter(self._handle(), fieldnames=StepStats.field_names())
        if not self._existing:
            self._writer.writeheader()
            self._handle().flush()

    def write(self, stats: StepStats) -> None:
        row = stats.as_dict()
        if row["loss"] is None:
            row["loss"] = ""
        self._writer.writerow(row)
        self._handle().flush()


class JSONLSink(_FileSink):
    """Write one JSON object per line and step, flushed after each line.

    Non-finite floats are written as the strings ``"inf"``, ``"-inf"``, ``"nan"`` so every
    line is strict JSON.
    """

    def write(self, stats: StepStats) -> None:
        row = {key: _json_value(value) for key, value in stats.as_dict().items()}
        handle = self._handle()
        handle.write(json.dumps(row, allow_nan=False) + "\n")
        handle.flush()


class CallbackSink:
    """Adapt a function ``fn(stats)`` to the :class:`Sink` protocol (``close`` does nothing
    unless ``on_close`` is given)."""

    def __init__(
        self, fn: Callable[[StepStats], None], on_close: Callable[[], None] | None = None
    ) -> None:
        self.fn = fn
        self.on_close = on_close

    def write(self, stats: StepStats) -> None:
        self.fn(stats)

    def close(self) -> None:
        if self.on_close is not None:
            self.on_close()


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value
