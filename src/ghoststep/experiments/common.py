"""The one experiment runner: configs, run folders, results, reports, training helpers.

Runner contract
===============
Every experiment is a module ``ghoststep.experiments.<name>`` registered in
``ghoststep.experiments.EXPERIMENTS``. The module must define:

``Config``
    A ``@dataclass`` whose defaults ARE the paper's protocol (SPEC.md §5). Fields
    hold plain JSON-able values (int, float, bool, str, None, lists/tuples of
    those). Seeded experiments have a field ``seeds`` (list of ints); ``--seeds``
    replaces it. Experiments reading files take the path from a ``data_dir``
    field (``--data-dir`` sets it); nothing is relative to the source tree. An
    optional ``threads`` field sets torch's intra-op threads while ``run`` runs
    (0: leave torch's setting).

``PRESETS``
    ``{"quick": {...}, "paper": {}}`` -- small dicts of field overrides applied on
    top of the defaults. ``"paper"`` is normally empty; ``"quick"`` shrinks the run
    to seconds (it is what the tests and CI use). More presets are allowed.

``run(config, out_dir, progress) -> dict``
    Does the work. ``out_dir`` (a ``Path``) exists already; write figures there
    with :func:`save_figure`. ``progress`` (bool) says whether to show progress
    bars; pass it to :func:`progress_bar`. Return a JSON-able dict with at least

    * ``"claims"``: list of ``{"claim": str, "paper": str|number,
      "ours": str|number, "reproduced": bool}`` and optionally ``"note": str``
      (say why ours differs) -- build them with :func:`claim`;

    and optionally ``"title"`` (str), ``"summary"`` (str, a paragraph for the
    report), ``"figures"`` (list of :func:`save_figure` entries),
    ``"tables"`` (list of ``{"title": str, "columns": [...], "rows": [[...]]}``),
    ``"metrics"`` (dict of numbers/lists, the raw data behind claims and plots),
    ``"notes"`` (list of str).

The runner (:func:`run_experiment`, used by ``ghoststep run``) builds the config
(defaults -> preset -> CLI overrides), creates ``runs/<name>-<YYYYmmdd-HHMMSS>/``
(or ``--out``), writes ``config.json`` (config, preset, seeds, package/torch/python
versions, command), calls ``run``, validates the results with
:func:`validate_results`, then writes ``results.json`` and ``report.md`` (the
paper's numbers beside ours, figures inline). Modules never write those three
files themselves and never parse arguments.

Shared training helpers for the digits models: :func:`train`, :func:`evaluate`,
:func:`predict`, :func:`median_iqr`, :func:`set_seed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "RunOutput",
    "StepInfo",
    "Evaluation",
    "ResultsError",
    "ConfigError",
    "build_config",
    "torch_threads",
    "sig",
    "parse_override",
    "make_run_dir",
    "run_experiment",
    "claim",
    "validate_results",
    "results_problems",
    "write_json",
    "read_json",
    "render_report",
    "render_merged_report",
    "new_figure",
    "save_figure",
    "progress_bar",
    "set_seed",
    "train",
    "evaluate",
    "predict",
    "median_iqr",
    "versions",
]

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"


# ----------------------------------------------------------------------------- config


class ConfigError(ValueError):
    """A preset, override or seed list that does not fit the experiment's Config."""


def parse_override(text: str) -> tuple[str, str]:
    """Split ``"key=value"`` (a ``--set`` argument) into ``(key, value)``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value")
    return key.strip(), value.strip()


def _coerce_scalar(text: str, like: Any) -> Any:
    if isinstance(like, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if text.lower() in ("none", "null"):
        return None
    if isinstance(like, int):
        return int(text)
    if isinstance(like, float):
        return float(text)
    if isinstance(like, str):
        return text
    # unknown or None default: best effort
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _coerce(text: str, like: Any) -> Any:
    """Turn the CLI string ``text`` into the type of the current value ``like``."""
    if isinstance(like, (list, tuple)):
        parts = [p for p in text.replace(" ", ",").split(",") if p]
        elem = like[0] if len(like) else None
        values = [_coerce_scalar(p, elem) for p in parts]
        return type(like)(values)
    return _coerce_scalar(text, like)


def build_config(
    config_cls: type,
    presets: Mapping[str, Mapping[str, Any]],
    preset: str = "paper",
    overrides: Mapping[str, Any] | None = None,
    seeds: Sequence[int] | None = None,
):
    """Defaults of ``config_cls`` -> ``presets[preset]`` -> ``overrides`` -> ``seeds``.

    Override values may be strings (from ``--set key=value``); they are converted to
    the type of the field's current value. Unknown presets or fields, values that do
    not convert, and seeds for an unseeded experiment raise :class:`ConfigError`.
    """
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"{config_cls!r} is not a dataclass")
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(presets)}")
    config = config_cls()
    names = {f.name for f in dataclasses.fields(config)}

    def apply(cfg, changes: Mapping[str, Any], source: str):
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(
                f"{source}: unknown config field(s) {unknown}; fields: {sorted(names)}"
            )
        resolved = {}
        for key, value in changes.items():
            current = getattr(cfg, key)
            try:
                resolved[key] = _coerce(value, current) if isinstance(value, str) else value
            except ValueError as exc:
                raise ConfigError(f"{source}: {key}={value!r}: {exc}") from None
        return dataclasses.replace(cfg, **resolved)

    config = apply(config, presets[preset], f"preset {preset!r}")
    if overrides:
        config = apply(config, overrides, "override")
    if seeds is not None:
        if "seeds" not in names:
            raise ConfigError(f"{config_cls.__module__} takes no seeds (its Config has no 'seeds')")
        current = config.seeds
        seq = [int(s) for s in seeds]
        config = dataclasses.replace(config, seeds=type(current)(seq) if current else seq)
    return config


def config_seeds(config) -> list[int] | None:
    """The config's seeds as a list, or None when the experiment is not seeded."""
    seeds = getattr(config, "seeds", None)
    if seeds is None:
        return None
    if isinstance(seeds, int):
        return [seeds]
    return [int(s) for s in seeds]


# ----------------------------------------------------------------------------- run folders


def make_run_dir(name: str, out: str | Path | None = None, root: str | Path = "runs") -> Path:
    """``out`` if given (created), else a fresh ``root/<name>-<YYYYmmdd-HHMMSS>[-k]``."""
    if out is not None:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        return path
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}-{stamp}"
    k = 2
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            path = root / f"{name}-{stamp}-{k}"
            k += 1


def versions() -> dict[str, str]:
    """Versions that make a run describable: ghoststep, torch, numpy, python, platform."""
    from ghoststep import __version__

    return {
        "ghoststep": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


class RunOutput(NamedTuple):
    out_dir: Path
    results: dict
    report_path: Path


def run_experiment(
    name: str,
    preset: str = "paper",
    *,
    seeds: Sequence[int] | None = None,
    overrides: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    runs_root: str | Path = "runs",
    progress: bool = True,
    command: str | None = None,
) -> RunOutput:
    """Run experiment ``name`` end to end (see the module docstring) and write its report."""
    from ghoststep.experiments import load_experiment, registry_entry

    module = load_experiment(name)
    entry = registry_entry(name)
    config = build_config(module.Config, module.PRESETS, preset, overrides, seeds)
    out_dir = make_run_dir(name, out, runs_root)
    started = _dt.datetime.now().astimezone()
    meta = {
        "experiment": name,
        "preset": preset,
        "seeds": config_seeds(config),
        "versions": versions(),
        "started": started.isoformat(timespec="seconds"),
        "command": command,
        "paper_figures": entry.paper,
    }
    write_json(out_dir / CONFIG_FILE, {**meta, "config": dataclasses.asdict(config)})

    t0 = time.perf_counter()
    # A ``threads`` config field fixes torch's intra-op threads for the run (tiny models
    # gain nothing from more, and a fixed count keeps float sums reproducible).
    with torch_threads(getattr(config, "threads", 0)):
        results = module.run(config, out_dir, progress)
    elapsed = time.perf_counter() - t0
    validate_results(results)
    results = dict(results)
    results.setdefault("title", entry.description)
    results["meta"] = {**meta, "elapsed_s": round(elapsed, 3)}
    results["config"] = dataclasses.asdict(config)
    write_json(out_dir / RESULTS_FILE, results)
    report_path = out_dir / REPORT_FILE
    report_path.write_text(render_report(results), encoding="utf-8")
    return RunOutput(out_dir, results, report_path)


# ----------------------------------------------------------------------------- results


def claim(
    text: str,
    paper: str | float | int,
    ours: str | float | int,
    reproduced: bool,
    note: str | None = None,
) -> dict:
    """One row of the claims table; ``note`` says how or why ours differs."""
    entry = {"claim": text, "paper": paper, "ours": ours, "reproduced": bool(reproduced)}
    if note:
        entry["note"] = note
    return entry


class ResultsError(ValueError):
    """``run`` returned results that break the runner contract."""


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def results_problems(results: Any) -> list[str]:
    """Every way ``results`` breaks the contract (empty list when valid)."""
    if not isinstance(results, Mapping):
        return [f"results must be a dict, got {type(results).__name__}"]
    problems = []
    claims = results.get("claims")
    if claims is None:
        problems.append("missing required key 'claims'")
    elif not isinstance(claims, list):
        problems.append("'claims' must be a list")
    else:
        for i, c in enumerate(claims):
            where = f"claims[{i}]"
            if not isinstance(c, Mapping):
                problems.append(f"{where} must be a dict")
                continue
            for key in ("claim", "paper", "ours", "reproduced"):
                if key not in c:
                    problems.append(f"{where} missing key {key!r}")
            if "claim" in c and not (isinstance(c["claim"], str) and c["claim"].strip()):
                problems.append(f"{where}.claim must be a non-empty string")
            for key in ("paper", "ours"):
                if key in c and not (isinstance(c[key], str) or _is_number(c[key])):
                    problems.append(f"{where}.{key} must be a string or a number")
            if "reproduced" in c and not isinstance(c["reproduced"], bool):
                problems.append(f"{where}.reproduced must be a bool")
            if "note" in c and not isinstance(c["note"], str):
                problems.append(f"{where}.note must be a string")
    optional = {
        "title": str,
        "summary": str,
        "figures": list,
        "tables": list,
        "metrics": dict,
        "notes": list,
    }
    for key, typ in optional.items():
        if key in results and not isinstance(results[key], typ):
            problems.append(f"{key!r} must be a {typ.__name__}")
    for i, fig in enumerate(results.get("figures") or []):
        if isinstance(fig, str):
            continue
        if not (isinstance(fig, Mapping) and isinstance(fig.get("file"), str)):
            problems.append(f"figures[{i}] must be a file name or a dict with 'file'")
    for i, table in enumerate(results.get("tables") or []):
        if not (
            isinstance(table, Mapping)
            and isinstance(table.get("columns"), list)
            and isinstance(table.get("rows"), list)
        ):
            problems.append(f"tables[{i}] must be a dict with 'columns' and 'rows' lists")
    for i, note in enumerate(results.get("notes") or []):
        if not isinstance(note, str):
            problems.append(f"notes[{i}] must be a string")
    try:
        json.dumps(_jsonable(results), allow_nan=False)
    except (TypeError, ValueError) as exc:
        problems.append(f"results are not JSON-serializable: {exc}")
    return problems


def validate_results(results: Any) -> None:
    """Raise :class:`ResultsError` listing every contract violation of ``results``."""
    problems = results_problems(results)
    if problems:
        raise ResultsError("invalid experiment results:\n  " + "\n  ".join(problems))


def _jsonable(obj: Any) -> Any:
    """Plain-JSON copy: tensors/arrays to lists, paths to str, non-finite floats to str."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.detach().cpu().tolist() if obj.ndim else obj.item())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented strict JSON (see ``_jsonable`` for conversions)."""
    path = Path(path)
    path.write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- reports


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_fmt(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _figure_entries(results: Mapping) -> list[dict]:
    entries = []
    for fig in results.get("figures") or []:
        entries.append({"file": fig} if isinstance(fig, str) else dict(fig))
    return entries


def _run_body(results: Mapping, level: int, fig_prefix: str = "") -> list[str]:
    h = "#" * level  # sections get one more "#" than the run's own heading
    meta = results.get("meta", {})
    lines: list[str] = []
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
    lines.append("Run: " + ", ".join(bits) + ".")
    if meta.get("paper_figures"):
        lines.append(f"Paper: {meta['paper_figures']}.")
    if meta.get("command"):
        lines.append(f"Command: `{meta['command']}`")
    lines.append("")
    if results.get("summary"):
        lines += [results["summary"], ""]

    claims = results.get("claims", [])
    n_ok = sum(1 for c in claims if c.get("reproduced"))
    lines += [f"{h}# Claims: paper vs ours ({n_ok}/{len(claims)} reproduced)", ""]
    if claims:
        lines += _table(
            ["claim", "paper", "ours", "reproduced"],
            [[c["claim"], c["paper"], c["ours"], c["reproduced"]] for c in claims],
        )
    else:
        lines.append("No claims recorded.")
    lines.append("")
    differs = [c for c in claims if not c.get("reproduced") or c.get("note")]
    if differs:
        lines += [f"{h}# Where ours differs", ""]
        for c in differs:
            status = "not reproduced" if not c.get("reproduced") else "reproduced, with a caveat"
            note = c.get("note") or "no explanation recorded"
            lines.append(f"- *{c['claim']}* ({status}): {note}")
        lines.append("")

    for table in results.get("tables") or []:
        lines += [f"{h}# {table.get('title', 'Table')}", ""]
        lines += _table(table["columns"], table["rows"])
        lines.append("")

    figures = _figure_entries(results)
    if figures:
        lines += [f"{h}# Figures", ""]
        for fig in figures:
            caption = fig.get("caption", "")
            lines.append(f"![{caption}]({fig_prefix}{fig['file']})")
            if caption:
                lines.append(f"*{caption}*")
            lines.append("")
    notes = results.get("notes") or []
    if notes:
        lines += [f"{h}# Notes", ""] + [f"- {n}" for n in notes] + [""]
    return lines


def render_report(results: Mapping) -> str:
    """Markdown for one run: header, claims table, differences, tables, figures."""
    meta = results.get("meta", {})
    name = meta.get("experiment", "experiment")
    title = results.get("title")
    head = f"# {name}: {title}" if title else f"# {name}"
    return "\n".join([head, ""] + _run_body(results, level=1)).rstrip() + "\n"


def render_merged_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> str:
    """One Markdown page for several runs; figure links are relative to ``out_dir``."""
    out_dir = Path(out_dir).resolve()
    runs = []
    for d in run_dirs:
        d = Path(d)
        results = read_json(d / RESULTS_FILE)
        runs.append((d, results))
    lines = [
        "# ghoststep: reproduction report",
        "",
        'Paper: P. Sao, "Ghosts of Softmax", arXiv:2603.13552 (2026).',
        "",
    ]
    summary = []
    for d, r in runs:
        meta = r.get("meta", {})
        claims = r.get("claims", [])
        ok = sum(1 for c in claims if c.get("reproduced"))
        summary.append(
            [
                meta.get("experiment", d.name),
                meta.get("preset", "?"),
                f"`{d}`",
                f"{ok}/{len(claims)}",
            ]
        )
    lines += _table(["experiment", "preset", "run", "claims reproduced"], summary) + [""]
    for d, r in runs:
        meta = r.get("meta", {})
        name = meta.get("experiment", d.name)
        title = r.get("title")
        lines += [f"## {name}: {title}" if title else f"## {name}", ""]
        prefix = os.path.relpath(d.resolve(), out_dir).replace(os.sep, "/") + "/"
        lines += _run_body(r, level=2, fig_prefix="" if prefix == "./" else prefix)
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------- figures


def new_figure(
    nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] | None = None, **subplot_kw
):
    """A matplotlib ``(Figure, axes)`` pair drawn by Agg, without touching pyplot's backend.

    matplotlib is imported here, not at module import (it is an optional extra).
    """
    from matplotlib.figure import Figure

    if figsize is None:
        figsize = (4.2 * ncols, 3.4 * nrows)
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=True, **subplot_kw)
    return fig, axes


def save_figure(fig, out_dir: str | Path, name: str, caption: str = "", dpi: int = 130) -> dict:
    """Save ``fig`` as ``out_dir/name`` (PNG) and return its entry for ``results["figures"]``."""
    if not name.endswith(".png"):
        name += ".png"
    fig.savefig(Path(out_dir) / name, dpi=dpi)
    return {"file": name, "caption": caption} if caption else {"file": name}


# ----------------------------------------------------------------------------- progress


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    enabled: bool = True,
    **kwargs,
):
    """tqdm progress bar; disabled when ``enabled`` is False or stderr is not a TTY."""
    from tqdm.auto import tqdm

    show = enabled and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=not show, leave=False, **kwargs)


# ----------------------------------------------------------------------------- training


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run the block with ``torch.set_num_threads(threads)`` (0: leave it), then restore.

    Small models run as fast on one thread, and with several processes sharing the
    cores, multi-threaded kernels can slow down many-fold (threads wait on each other).
    The thread count also fixes the float summation order, so a fixed count keeps runs
    bitwise reproducible across machines.
    """
    if threads <= 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sig(x: float, digits: int = 3) -> float | str:
    """``x`` rounded to ``digits`` significant digits for tables; non-finite as a string."""
    return float(f"{x:.{digits}g}") if math.isfinite(x) else str(x)


def set_seed(seed: int) -> torch.Generator:
    """Seed torch's global RNG (model init, dropout) and return a fresh seeded generator
    for data order. ``torch.set_num_threads`` is left alone."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass
class StepInfo:
    """What :func:`train` passes to its hooks. ``loss`` is the pre-step minibatch loss;
    ``lr`` the first param group's learning rate used for this step."""

    step: int
    loss: float
    lr: float
    inputs: torch.Tensor
    targets: torch.Tensor
    model: torch.nn.Module
    optimizer: Any
    extra: dict = field(default_factory=dict)


class Evaluation(NamedTuple):
    loss: float
    accuracy: float


def _xy(data) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(data, "X_train"):
        return data.X_train, data.y_train
    return data[0], data[1]


def _batches_forever(X, y, batch_size, generator):
    n = X.shape[0]
    if batch_size >= n:
        while True:
            yield X, y
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield X[idx], y[idx]


def train(
    model: torch.nn.Module,
    data,
    optimizer,
    steps: int,
    batch_size: int,
    lr_schedule: Callable[[int], float] | Any | None = None,
    on_step: Callable[[StepInfo], Any] | None = None,
    generator: torch.Generator | None = None,
    *,
    before_step: Callable[[StepInfo], Any] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    start_step: int = 0,
    progress: bool = False,
    desc: str | None = None,
) -> list[float]:
    """Minibatch training loop shared by the digits experiments.

    Each step: draw a minibatch (shuffled epochs from ``generator``, full batch when
    ``batch_size >= N``, last partial batch dropped), ``zero_grad``, forward,
    ``loss_fn(logits, y)``, backward, ``before_step(info)``, ``optimizer.step()``,
    ``on_step(info)``. The model is put in train mode.

    Args:
        model: maps a batch of inputs to logits.
        data: ``Split`` / ``(X_train, y_train, ...)`` tuple / anything with
            ``X_train`` and ``y_train``.
        optimizer: a ``torch.optim.Optimizer`` or wrapper (e.g. ``RadiusController``).
        steps: number of optimizer steps.
        batch_size: minibatch size.
        lr_schedule: either a callable ``step -> multiplier`` applied to every param
            group's learning rate at the start of the loop (e.g. a spike
            ``lambda s: 1000.0 if s >= 50 else 1.0``), or an object with ``.step()``
            (a torch LR scheduler), stepped after every optimizer step.
        on_step: called after ``optimizer.step()`` with a :class:`StepInfo`; returning
            ``"stop"`` ends training early.
        generator: data-order RNG (default: ``torch.Generator().manual_seed(0)``).
        before_step: called after backward, before ``optimizer.step()`` (gradients
            are final; snapshot parameters or hand the batch to a controller here).
        loss_fn: ``(logits, targets) -> scalar loss``; default cross-entropy.
        start_step: index of the first step (for continuing a run).
        progress: show a progress bar (see :func:`progress_bar`).

    Returns:
        The per-step minibatch losses (floats; NaN/inf kept as they are).
    """
    X, y = _xy(data)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    multiplier = lr_schedule if callable(lr_schedule) and not hasattr(lr_schedule, "step") else None
    scheduler = lr_schedule if hasattr(lr_schedule, "step") else None
    batches = _batches_forever(X, y, batch_size, generator)
    losses: list[float] = []
    model.train()
    steps_iter = progress_bar(range(start_step, start_step + steps), desc=desc, enabled=progress)
    for step in steps_iter:
        if multiplier is not None:
            factor = float(multiplier(step))
            for group, lr0 in zip(optimizer.param_groups, base_lrs):
                group["lr"] = lr0 * factor
        xb, yb = next(batches)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        info = StepInfo(
            step=step,
            loss=float(loss.detach()),
            lr=optimizer.param_groups[0]["lr"],
            inputs=xb,
            targets=yb,
            model=model,
            optimizer=optimizer,
        )
        if before_step is not None:
            before_step(info)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(info.loss)
        if on_step is not None and on_step(info) == "stop":
            break
    return losses


@torch.no_grad()
def predict(model: torch.nn.Module, X: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of ``model`` on ``X`` in eval mode (the previous mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        outs = [model(X[i : i + batch_size]) for i in range(0, X.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs)


def evaluate(
    model: torch.nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    batch_size: int = 1024,
) -> Evaluation:
    """Mean loss and accuracy (fraction in [0, 1]) of ``model`` on ``(X, y)`` in eval mode."""
    logits = predict(model, X, batch_size)
    loss = float(loss_fn(logits, y))
    acc = float((logits.argmax(dim=-1) == y).float().mean())
    return Evaluation(loss, acc)


def median_iqr(values, axis: int = 0):
    """Median and interquartile range, ignoring NaNs.

    Args:
        values: a sequence of numbers (e.g. one per seed), or an array whose ``axis``
            indexes seeds (e.g. ``(seeds, steps)`` curves).

    Returns:
        ``(median, q25, q75)``: floats for 1-D input, arrays otherwise.
    """
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise ValueError("median_iqr of an empty sequence")
    med = np.nanmedian(arr, axis=axis)
    q25, q75 = np.nanpercentile(arr, [25, 75], axis=axis)
    if arr.ndim == 1:
        return float(med), float(q25), float(q75)
    return med, q25, q75
