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
flushed after every write -- so a crashed or still-running job can be inspected. Under
``torch.distributed`` one rank writes (rank 0 by default) or each rank its own file
(``ranks="all"``): never two processes one file.

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

__all__ = [
    "StepStats",
    "Sink",
    "CSVSink",
    "JSONLSink",
    "CallbackSink",
    "DEFAULT_KEYS",
    "process_rank",
]

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
            ``rho_a`` itself without extra radii or window; on an always-on step between
            measurements the last measured one.
        measured: whether this step measured its radius (False: an always-on step
            between measurements, ``rho_a`` NaN, ``r_before`` / ``r_after`` predicted
            from the last measured radius).
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
    measured: bool = True
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
    """Shared plumbing: one writing process per file, the file opened at the first write.

    Under ``torch.distributed`` (DDP, FSDP, torchrun, Lightning's DDP strategies) every rank
    runs the same script and builds the same sink; two processes appending to one file
    interleave their bytes. Which rank writes is decided at the first ``write`` -- by then
    the process group of a training run exists, also when the sink was built before
    ``init_process_group`` (a script run by torchrun, a Lightning callback's arguments) --
    and nothing is created before it, so a rank that does not write never opens,
    truncates or creates the file.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, append: bool = False, ranks: int | str = 0
    ) -> None:
        if not (ranks == "all" or (isinstance(ranks, int) and not isinstance(ranks, bool))):
            raise ValueError(f"ranks must be a rank (int) or 'all', got {ranks!r}")
        self.path = os.fspath(path)
        self.append = append
        self.ranks = ranks
        #: the file this process writes; None until the first write, and on a rank that
        #: writes nothing
        self.file_path: str | None = None
        self._decided = False
        self._closed = False
        self._file: IO[str] | None = None

    def _target(self) -> str | None:
        """The file this process writes (None: another rank's), from the process group."""
        rank, world = process_rank()
        if self.ranks == "all":
            if world == 1:
                return self.path
            stem, suffix = os.path.splitext(self.path)
            return f"{stem}.rank{rank}{suffix}"
        return self.path if rank == self.ranks else None

    def _handle(self) -> IO[str] | None:
        """The open file, opened on first use; None on a rank that does not write."""
        if self._closed:
            raise ValueError(f"{type(self).__name__}({self.path!r}) is closed")
        if not self._decided:
            self._decided = True
            self.file_path = self._target()
            if self.file_path is not None:
                self._file = self._open(self.file_path)
        return self._file

    def _open(self, path: str) -> IO[str]:
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        existing = self.append and os.path.exists(path) and os.path.getsize(path) > 0
        handle = open(path, "a" if self.append else "w", newline="", encoding="utf-8")
        self._start(handle, existing)
        return handle

    def _start(self, handle: IO[str], existing: bool) -> None:
        """Write what precedes the first record (nothing by default)."""

    def write(self, stats: StepStats) -> None:
        handle = self._handle()
        if handle is not None:
            self._write(handle, stats)
            handle.flush()

    def _write(self, handle: IO[str], stats: StepStats) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, ranks={self.ranks!r})"


def process_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: from ``torch.distributed`` when its process
    group is initialised, else from the ``RANK`` / ``WORLD_SIZE`` variables torchrun sets,
    else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class CSVSink(_FileSink):
    """Write one CSV row per step (header first), flushed after each row.

    Args:
        path: file to create (parent directories are made). Truncated unless ``append``.
        append: add rows to an existing file (the header is written only if it is empty).
        ranks: under ``torch.distributed``, the rank that writes ``path`` (default 0; the
            other ranks open nothing), or ``"all"``: every rank writes its own file,
            ``path`` with ``.rank<r>`` before the suffix (``radius.rank1.csv``; ``path``
            itself in a single process).

    The rank is read at the first ``write`` (:func:`process_rank`), so a sink built before
    ``init_process_group`` writes as the rank it turns out to be; the file is created at
    that first write, not at construction.
    """

    def _start(self, handle: IO[str], existing: bool) -> None:
        self._writer = csv.DictWriter(handle, fieldnames=StepStats.field_names())
        if not existing:
            self._writer.writeheader()

    def _write(self, handle: IO[str], stats: StepStats) -> None:
        row = stats.as_dict()
        if row["loss"] is None:
            row["loss"] = ""
        self._writer.writerow(row)


class JSONLSink(_FileSink):
    """Write one JSON object per line and step, flushed after each line.

    Non-finite floats are written as the strings ``"inf"``, ``"-inf"``, ``"nan"`` so every
    line is strict JSON. Arguments as :class:`CSVSink`.
    """

    def _write(self, handle: IO[str], stats: StepStats) -> None:
        row = {key: _json_value(value) for key, value in stats.as_dict().items()}
        handle.write(json.dumps(row, allow_nan=False) + "\n")


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
