"""Figures: Agg-drawn matplotlib figures saved into the run folder, and shared styles.

matplotlib is imported inside the functions: it is an optional extra, and
``ghoststep list`` / the core tests should not pay for it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ghoststep_lab.common.results import Figure
from ghoststep_lab.common.training import median_iqr

__all__ = ["METHOD_LABELS", "METHOD_COLORS", "new_figure", "save_figure", "plot_band"]

METHOD_LABELS = {
    "plain": "plain Adam",
    "clip_grad": "Adam + grad clip (‖g‖ ≤ 1)",
    "controller": "ρa-controller (clip, r* = 1)",
}
# the paper's palette: red plain, teal clipping, gold controller
METHOD_COLORS = {"plain": "#c0392b", "clip_grad": "#16a085", "controller": "#d4a017"}


def new_figure(
    nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] | None = None, **subplot_kw
):
    """A matplotlib ``(Figure, axes)`` pair drawn by Agg, without touching pyplot's backend.

    ``figsize`` in inches (default 4.2 x 3.4 per panel).
    """
    from matplotlib.figure import Figure as MplFigure

    if figsize is None:
        figsize = (4.2 * ncols, 3.4 * nrows)
    fig = MplFigure(figsize=figsize, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=True, **subplot_kw)
    return fig, axes


def save_figure(fig, out_dir: str | Path, name: str, caption: str = "", dpi: int = 130) -> Figure:
    """Save ``fig`` as ``out_dir/name`` (PNG) and return its entry for ``Results.figures``."""
    if not name.endswith(".png"):
        name += ".png"
    fig.savefig(Path(out_dir) / name, dpi=dpi)
    return Figure(name, caption)


def plot_band(ax, x, curves, label: str, color: str | None = None, **kwargs) -> None:
    """Median line and IQR band of ``curves`` (seeds x points) against ``x`` (points,)."""
    arr = np.asarray(curves, dtype=float)
    arr = np.where(np.isfinite(arr), arr, np.nan)
    with np.errstate(all="ignore"):
        med, q25, q75 = median_iqr(arr, axis=0)
    line = ax.plot(x, med, label=label, color=color, **kwargs)[0]
    ax.fill_between(x, q25, q75, color=line.get_color(), alpha=0.2, linewidth=0)
