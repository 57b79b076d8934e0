"""Plot a RadiusController history: loss, tau and rho_a, r against r = 1, and s.

Reads what the sinks write -- ``CSVSink`` (``.csv``) or ``JSONLSink`` (``.jsonl``) --, a
Lightning ``CSVLogger`` ``metrics.csv`` or a transformers ``trainer_state.json`` /
``log_history`` list (``.json``) with ``ghoststep/*`` columns, or a run folder holding any
of these (each file one series), and draws one PNG with four panels sharing the step axis:

1. loss (when the controller was given a closure that returned it);
2. ``tau = ||p||`` and ``rho_a`` on a log axis -- the step proposed and the radius;
3. ``r_before = tau / rho_a`` and ``r_after`` on a log axis with the line r = 1 (above it
   the Taylor series of the loss along the step diverges);
4. ``s``, the factor applied to the proposed step (skipped steps marked at 0).

Prefixes ``ghoststep/`` and ``train/`` are stripped from column names; the loss is
read from ``loss`` or ``train_loss``. Non-finite values leave gaps.

Command line: ``ghoststep plot RUN_OR_CSV [--out PNG]``.

Example:
    >>> import tempfile, pathlib
    >>> from ghoststep.monitor import CSVSink, StepStats
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> with CSVSink(folder / "radius.csv") as sink:
    ...     for k in range(1, 4):
    ...         sink.write(StepStats(step=k, tau=0.1 * k, rho_a=0.2, r_before=0.5 * k,
    ...                              r_after=min(1.0, 0.5 * k), scale=1.0, bottleneck=0,
    ...                              radius_seconds=0.0, skipped=False, lr=0.1, loss=1.0))
    >>> plot_history(folder).name
    'history.png'
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

__all__ = ["plot_history", "read_history", "find_histories"]

_SUFFIXES = (".csv", ".jsonl", ".json")
_LOSS_ALIASES = ("loss", "train_loss", "train/loss")
_PREFIXES = ("train/", "ghoststep/")
_FIELDS = ("step", "loss", "tau", "rho_a", "r_before", "r_after", "scale", "skipped")
_REQUIRED = ("tau", "rho_a")


def _field(name: str) -> str:
    """``train/ghoststep/tau`` -> ``tau``; other names unchanged."""
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def _rows(path: Path) -> list[tuple[str, dict]]:
    """``(where, row)`` pairs: CSV records and JSON lines (``where``: ``"<path>:<line>"``),
    or the entries of a JSON list / ``{"log_history": [...]}`` (``"<path>: entry N"``).

    Raises:
        ValueError: a line that is not what the format requires -- a CSV row with another
            number of fields than the header, a JSONL line that is not one JSON object --,
            named by file and line (under ``torch.distributed`` two processes writing one
            file leave such lines; the file sinks write from one rank).
    """
    with path.open(newline="" if path.suffix == ".csv" else None, encoding="utf-8") as f:
        if path.suffix == ".csv":
            return _csv_rows(path, f)
        if path.suffix == ".jsonl":
            return [(f"{path}:{n}", _json_line(path, n, line)) for n, line in enumerate(f, 1)
                    if line.strip()]  # fmt: skip
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err
    if isinstance(data, dict):
        data = data.get("log_history", [])
    if not isinstance(data, list):
        return []
    return [(f"{path}: entry {n}", row) for n, row in enumerate(data, 1) if isinstance(row, dict)]


def _csv_rows(path: Path, f) -> list[tuple[str, dict]]:
    reader = csv.reader(f)
    try:
        header = next(reader, [])
        rows = []
        for values in reader:
            if not values:
                continue
            if len(values) != len(header):
                raise ValueError(
                    f"{path}:{reader.line_num}: malformed row: expected {len(header)} "
                    f"comma-separated fields as in the header, got {len(values)}"
                )
            rows.append((f"{path}:{reader.line_num}", dict(zip(header, values))))
    except csv.Error as err:
        raise ValueError(f"{path}:{reader.line_num}: malformed CSV ({err})") from err
    return rows


def _json_line(path: Path, number: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        row = err
    if not isinstance(row, dict):
        why = f" ({row.msg} at column {row.colno})" if isinstance(row, ValueError) else ""
        raise ValueError(
            f"{path}:{number}: corrupt line: expected one JSON object per line, as "
            f"JSONLSink writes{why}: {line.strip()[:80]!r}"
        )
    return row


def _normalize(row: dict) -> dict:
    """Field names without prefixes; empty CSV cells dropped; the loss under ``loss``."""
    out = {_field(k): v for k, v in row.items() if v not in ("", None)}
    for alias in _LOSS_ALIASES:
        if alias in row and row[alias] not in ("", None):
            out["loss"] = row[alias]
            break
    return out


def _number(value, where: str = "", key: str = "") -> float:
    """A cell as a float (booleans as 0/1, empty as NaN).

    Raises:
        ValueError: a value that is not a number, named by ``where`` and ``key``.
    """
    if value is None or value == "":
        return math.nan
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return float(value.strip().lower() == "true")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: column {key!r}: expected a number, got {value!r}") from None


def read_history(path: str | os.PathLike[str]) -> dict[str, list[float]]:
    """Columns of a CSV / JSONL / JSON history as float lists (``step``, ``tau``, ...).

    Rows without ``tau`` and ``rho_a`` (e.g. other metrics in a Lightning
    ``metrics.csv``) are dropped. Missing values are NaN.

    Raises:
        ValueError: the file has no ``tau`` / ``rho_a`` columns or an unknown suffix, or a
            corrupt line (a malformed CSV row, a JSONL line that is not a JSON object, a
            value that is not a number): the message names the file and the line.
    """
    path = Path(path)
    if path.suffix not in _SUFFIXES:
        raise ValueError(f"{path}: expected a .csv, .jsonl or .json history")
    rows = [(where, _normalize(row)) for where, row in _rows(path)]
    rows = [(where, row) for where, row in rows if any(key in row for key in _REQUIRED)]
    if not rows or not all(any(key in row for _, row in rows) for key in _REQUIRED):
        raise ValueError(f"{path}: not a ghoststep history (no columns {', '.join(_REQUIRED)})")
    columns: dict[str, list[float]] = {key: [] for key in _FIELDS}
    for index, (where, row) in enumerate(rows):
        values = {key: _number(row.get(key), where, key) for key in _FIELDS}
        if math.isnan(values["tau"]) and math.isnan(values["rho_a"]) and not values["skipped"] > 0:
            continue
        if math.isnan(values["step"]):
            values["step"] = float(index + 1)
        for key in _FIELDS:
            columns[key].append(values[key])
    return columns


def _is_history(path: Path) -> bool:
    """Whether ``path`` has ``tau`` and ``rho_a`` columns (a CSV header, the keys of the
    JSON lines that parse, the JSON entries); corrupt lines are left to ``read_history``,
    which names them, so a damaged history is reported rather than skipped."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            if path.suffix == ".csv":
                names = set(next(csv.reader(f), []))
            elif path.suffix == ".jsonl":
                names = {key for line in f for key in _keys(line)}
            else:
                names = {key for _, row in _rows(path) for key in row}
    except (OSError, UnicodeDecodeError, ValueError, csv.Error):
        return False
    names = {_field(name) for name in names}
    return all(key in names for key in _REQUIRED)


def _keys(line: str) -> list[str]:
    try:
        row = json.loads(line)
    except ValueError:
        return []
    return list(row) if isinstance(row, dict) else []


def find_histories(path: str | os.PathLike[str]) -> list[Path]:
    """History files: ``path`` itself, or every CSV / JSONL / JSON history under a folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    found = sorted(p for p in path.rglob("*") if p.suffix in _SUFFIXES and p.is_file())
    histories = [p for p in found if _is_history(p)]
    if not histories:
        raise FileNotFoundError(
            f"{path}: no radius history found (a .csv / .jsonl / .json file with tau and rho_a)"
        )
    return histories


def _finite(values: list[float]) -> list[float]:
    return [v if math.isfinite(v) else math.nan for v in values]


def _positive(values: list[float]) -> list[float]:
    return [v if math.isfinite(v) and v > 0 else math.nan for v in values]


def plot_history(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Draw one PNG of a radius history (or of every history in a run folder).

    Args:
        path: a ``.csv`` / ``.jsonl`` / ``.json`` history, or a folder searched recursively
            for them (each file is one labelled series).
        out: the PNG to write; default ``<file>.png`` beside a file, ``<folder>/history.png``
            for a folder.
    Returns:
        The path of the written PNG.
    """
    from ghoststep.integrations import require

    require("matplotlib", "plots", feature="ghoststep.plots")  # optional dependency
    from matplotlib.figure import Figure

    path = Path(path)
    files = find_histories(path)
    if out is None:
        out = path.with_suffix(".png") if path.is_file() else path / "history.png"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    fig = Figure(figsize=(8, 10), layout="constrained")
    ax_loss, ax_radius, ax_r, ax_s = fig.subplots(4, 1, sharex=True)
    several = len(files) > 1
    any_loss = False
    for index, file in enumerate(files):
        h = read_history(file)
        name = f"{file.stem}: " if several else ""
        color = f"C{index % 10}"
        step = h["step"]
        if any(math.isfinite(v) for v in h["loss"]):
            any_loss = True
            ax_loss.plot(step, _finite(h["loss"]), color=color, label=f"{name}loss")
        ax_radius.plot(step, _positive(h["tau"]), color=color, label=name + r"$\tau = \|p\|$")
        ax_radius.plot(step, _positive(h["rho_a"]), color=color, ls="--", label=name + r"$\rho_a$")
        ax_r.plot(step, _positive(h["r_before"]), color=color, alpha=0.45, label=f"{name}r before")
        ax_r.plot(step, _positive(h["r_after"]), color=color, label=f"{name}r after")
        ax_s.plot(step, _finite(h["scale"]), color=color, label=f"{name}s")
        skipped = [x for x, flag in zip(step, h["skipped"]) if flag > 0]
        if skipped:
            ax_s.plot(skipped, [0.0] * len(skipped), "x", color="red", label=f"{name}skipped")

    if not any_loss:
        ax_loss.text(
            0.5,
            0.5,
            "no loss recorded (pass a closure to step)",
            ha="center",
            va="center",
            transform=ax_loss.transAxes,
            color="gray",
        )
    ax_r.axhline(1.0, color="crimson", lw=1, ls=":", label="r = 1", zorder=0)
    ax_radius.set_yscale("log")
    ax_r.set_yscale("log")
    ax_loss.set_ylabel("loss")
    ax_radius.set_ylabel(r"step $\tau$, radius $\rho_a$")
    ax_r.set_ylabel(r"$r = \tau / \rho_a$")
    ax_s.set_ylabel("s (applied / proposed)")
    ax_s.set_xlabel("optimizer step")
    title = files[0].name if not several else f"{path.name} ({len(files)} histories)"
    ax_loss.set_title(f"ghoststep radius history: {title}")
    for ax in (ax_loss, ax_radius, ax_r, ax_s):
        ax.grid(True, which="major", alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(loc="best", fontsize="small")
    fig.savefig(out, dpi=110)
    return out
