"""Markdown reports of runs: the paper's numbers beside ours, tables, figures inline."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ghoststep_lab.common.results import Results, read_json, results_file, validate_results

__all__ = ["render_report", "render_merged_report"]


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(columns: Sequence[Any], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_fmt(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _run_line(meta: Mapping) -> list[str]:
    """``Run: preset, seeds, versions, start, duration.`` plus the paper and command lines."""
    vers = meta.get("versions", {})
    bits = [f"preset `{meta.get('preset', '?')}`"]
    if meta.get("seeds") is not None:
        bits.append(f"seeds {meta['seeds']}")
    if vers:
        bits.append(f"ghoststep {vers.get('ghoststep')}, torch {vers.get('torch')}")
    if meta.get("started"):
        bits.append(f"started {meta['started']}")
    if meta.get("elapsed_s") is not None:
        bits.append(f"{meta['elapsed_s']:.1f} s")
    lines = ["Run: " + ", ".join(bits) + "."]
    if meta.get("paper_figures"):
        lines.append(f"Paper: {meta['paper_figures']}.")
    if meta.get("command"):
        lines.append(f"Command: `{meta['command']}`")
    return lines + [""]


def _claims_section(results: Results, h: str) -> list[str]:
    claims = results.claims
    lines = [f"{h}# Claims: paper vs ours ({results.n_reproduced}/{len(claims)} reproduced)", ""]
    if claims:
        rows = [[c.claim, c.paper, c.ours, c.reproduced] for c in claims]
        lines += _table(["claim", "paper", "ours", "reproduced"], rows)
    else:
        lines.append("No claims recorded.")
    lines.append("")
    differs = [c for c in claims if not c.reproduced or c.note]
    if differs:
        lines += [f"{h}# Where ours differs", ""]
        for c in differs:
            status = "reproduced, with a caveat" if c.reproduced else "not reproduced"
            lines.append(f"- *{c.claim}* ({status}): {c.note or 'no explanation recorded'}")
        lines.append("")
    return lines


def _run_body(results: Results, level: int, fig_prefix: str = "") -> list[str]:
    h = "#" * level  # sections get one more "#" than the run's own heading
    lines = _run_line(results.meta)
    if results.summary:
        lines += [results.summary, ""]
    lines += _claims_section(results, h)
    for table in results.tables:
        lines += [f"{h}# {table.title}", "", *_table(table.columns, table.rows), ""]
    if results.figures:
        lines += [f"{h}# Figures", ""]
        for fig in results.figures:
            lines.append(f"![{fig.caption}]({fig_prefix}{fig.file})")
            lines += [f"*{fig.caption}*", ""] if fig.caption else [""]
    if results.notes:
        lines += [f"{h}# Notes", ""] + [f"- {n}" for n in results.notes] + [""]
    return lines


def _heading(results: Results, default: str) -> str:
    name = results.meta.get("experiment", default)
    return f"{name}: {results.title}" if results.title else name


def render_report(results: Results | Mapping) -> str:
    """Markdown for one run: header, claims table, differences, tables, figures."""
    results = validate_results(results)
    head = "# " + _heading(results, "experiment")
    return "\n".join([head, ""] + _run_body(results, level=1)).rstrip() + "\n"


def render_merged_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> str:
    """One Markdown page for several runs; figure links are relative to ``out_dir``."""
    out_dir = Path(out_dir).resolve()
    runs = [(Path(d), validate_results(read_json(results_file(d)))) for d in run_dirs]
    lines = [
        "# ghoststep: reproduction report",
        "",
        'Paper: P. Sao, "Ghosts of Softmax", arXiv:2603.13552 (2026).',
        "",
    ]
    summary = [
        [
            r.meta.get("experiment", d.name),
            r.meta.get("preset", "?"),
            f"`{d}`",
            f"{r.n_reproduced}/{len(r.claims)}",
        ]
        for d, r in runs
    ]
    lines += _table(["experiment", "preset", "run", "claims reproduced"], summary) + [""]
    for d, r in runs:
        lines += ["## " + _heading(r, d.name), ""]
        prefix = os.path.relpath(d.resolve(), out_dir).replace(os.sep, "/") + "/"
        lines += _run_body(r, level=2, fig_prefix="" if prefix == "./" else prefix)
    return "\n".join(lines).rstrip() + "\n"
