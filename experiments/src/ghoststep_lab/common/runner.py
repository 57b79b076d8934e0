"""The one experiment runner: configs, run folders, parallel runs, results on disk.

Runner contract
===============
Every experiment is a module of ``ghoststep_lab`` registered in
``ghoststep_lab.EXPERIMENTS``. The module must define:

``Config``
    A ``@dataclass`` whose defaults ARE the paper's protocol (its Section 6). Fields are
    annotated with plain JSON-able types (``int``, ``float``, ``bool``, ``str``,
    ``X | None``, ``list[X]``, ``tuple[X, ...]``); the annotation says how a
    ``--set key=value`` string is parsed (lists comma-separated). Seeded experiments
    have a field ``seeds``; ``--seeds`` replaces it. Experiments reading files take
    the path from a ``data_dir`` field (``--data-dir`` sets it); nothing is relative
    to the source tree. An optional ``threads`` field sets torch's intra-op threads
    while ``run`` runs (0: leave torch's setting).

``PRESETS``
    ``{"quick": {...}, "paper": {}}`` -- small dicts of field overrides applied on
    top of the defaults. ``"paper"`` is normally empty; ``"quick"`` shrinks the run
    to seconds (it is what the tests and CI use). More presets are allowed.

``run(config, out_dir, progress) -> Results``
    Does the work. ``out_dir`` (a ``Path``) exists already; write figures there with
    :func:`~ghoststep_lab.common.figures.save_figure`. ``progress`` (bool) says
    whether to show progress bars (:func:`progress_bar`). Returns a
    :class:`~ghoststep_lab.common.results.Results` (claims, and optionally title,
    summary, figures, tables, metrics, notes). Claims are declared as data: a module-level
    tuple of :class:`~ghoststep_lab.common.results.ClaimRule` evaluated by
    :func:`~ghoststep_lab.common.results.evaluate_claims`.

:func:`run_experiment` (used by ``ghoststep run``) builds the config (defaults ->
preset -> CLI overrides), creates ``runs/<name>-<YYYYmmdd-HHMMSS>/`` (or ``--out``),
writes ``config.json`` (config, preset, seeds, package/torch/python versions,
command), calls ``run``, validates the results, then writes ``results.json`` and
``report.md``. Modules never write those three files themselves and never parse
arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import platform
import sys
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ghoststep_lab.common.report import render_report
from ghoststep_lab.common.results import (
    CONFIG_FILE,
    REPORT_FILE,
    RESULTS_FILE,
    validate_results,
    write_json,
)

__all__ = [
    "ConfigError",
    "RunOutput",
    "parse_override",
    "build_config",
    "config_seeds",
    "make_run_dir",
    "versions",
    "run_experiment",
    "torch_threads",
    "progress_bar",
    "parallel_map",
]


# ----------------------------------------------------------------------------- config


class ConfigError(ValueError):
    """A preset, override or seed list that does not fit the experiment's Config."""


def parse_override(text: str) -> tuple[str, str]:
    """Split ``"key=value"`` (a ``--set`` argument) into ``(key, value)``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value")
    return key.strip(), value.strip()


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_value(text: str, hint: Any) -> Any:
    """The CLI string ``text`` as a value of the field annotation ``hint``.

    ``bool`` takes yes/no words, ``X | None`` also takes ``none``/``null``,
    ``list[X]`` / ``tuple[X, ...]`` take comma- (or space-) separated items.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]  # one type besides None
        return parse_value(text, hint)
    if origin in (list, tuple):
        items = [p for p in text.replace(" ", ",").split(",") if p]
        return origin(parse_value(p, args[0] if args else str) for p in items)
    if hint is bool:
        if text.lower() not in _TRUE + _FALSE:
            raise ValueError(f"expected a boolean, got {text!r}")
        return text.lower() in _TRUE
    if hint in (int, float, str):
        return hint(text)
    raise TypeError(f"cannot parse a config field annotated {hint!r} from the command line")


def build_config(
    config_cls: type,
    presets: Mapping[str, Mapping[str, Any]],
    preset: str = "paper",
    overrides: Mapping[str, Any] | None = None,
    seeds: Sequence[int] | None = None,
):
    """Defaults of ``config_cls`` -> ``presets[preset]`` -> ``overrides`` -> ``seeds``.

    String values (from ``--set key=value``) are parsed by the field's annotation
    (:func:`parse_value`). Unknown presets or fields, values that do not parse, and
    seeds for an unseeded experiment raise :class:`ConfigError`.
    """
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"{config_cls!r} is not a dataclass")
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(presets)}")
    hints = typing.get_type_hints(config_cls)

    def apply(cfg, changes: Mapping[str, Any], source: str):
        unknown = sorted(set(changes) - set(hints))
        if unknown:
            raise ConfigError(
                f"{source}: unknown config field(s) {unknown}; fields: {sorted(hints)}"
            )
        resolved = dict(changes)
        for key, value in changes.items():
            try:
                if isinstance(value, str):
                    resolved[key] = parse_value(value, hints[key])
            except ValueError as exc:
                raise ConfigError(f"{source}: {key}={value!r}: {exc}") from None
        return dataclasses.replace(cfg, **resolved)

    config = apply(config_cls(), presets[preset], f"preset {preset!r}")
    if overrides:
        config = apply(config, overrides, "override")
    if seeds is not None:
        if "seeds" not in hints:
            raise ConfigError(f"{config_cls.__module__} takes no seeds (its Config has no 'seeds')")
        config = dataclasses.replace(config, seeds=type(config.seeds)(int(s) for s in seeds))
    return config


def config_seeds(config) -> list[int] | None:
    """The config's seeds as a list, or None when the experiment is not seeded."""
    seeds = getattr(config, "seeds", None)
    return None if seeds is None else [int(s) for s in seeds]


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
    path, k = root / f"{name}-{stamp}", 2
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            path, k = root / f"{name}-{stamp}-{k}", k + 1


def versions() -> dict[str, str]:
    """Versions that make a run describable: ghoststep, the experiments, torch, numpy,
    python, platform."""
    import numpy as np

    import ghoststep
    import ghoststep_lab

    return {
        "ghoststep": ghoststep.__version__,
        "ghoststep_lab": ghoststep_lab.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


class RunOutput(NamedTuple):
    out_dir: Path
    results: dict  # the results.json content
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
    from ghoststep_lab import load_experiment, registry_entry

    module = load_experiment(name)
    entry = registry_entry(name)
    config = build_config(module.Config, module.PRESETS, preset, overrides, seeds)
    out_dir = make_run_dir(name, out, runs_root)
    meta = {
        "experiment": name,
        "preset": preset,
        "seeds": config_seeds(config),
        "versions": versions(),
        "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "paper_figures": entry.paper,
    }
    write_json(out_dir / CONFIG_FILE, {**meta, "config": dataclasses.asdict(config)})

    t0 = time.perf_counter()
    # A ``threads`` config field fixes torch's intra-op threads for the run (tiny models
    # gain nothing from more, and a fixed count keeps float sums reproducible).
    with torch_threads(getattr(config, "threads", 0)):
        results = validate_results(module.run(config, out_dir, progress))
    results.title = results.title or entry.description
    results.meta = {**meta, "elapsed_s": round(time.perf_counter() - t0, 3)}
    results.config = dataclasses.asdict(config)
    write_json(out_dir / RESULTS_FILE, results.to_dict())
    report_path = out_dir / REPORT_FILE
    report_path.write_text(render_report(results), encoding="utf-8")
    return RunOutput(out_dir, results.to_dict(), report_path)


# ----------------------------------------------------------------------------- execution


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


def _call_with_threads(fn: Callable[..., Any], job: Mapping[str, Any], threads: int) -> Any:
    with torch_threads(threads):
        return fn(**job)


def parallel_map(
    fn: Callable[..., Any],
    jobs: Sequence[Mapping[str, Any]],
    *,
    workers: int = 1,
    threads: int = 1,
    progress: bool = False,
    desc: str | None = None,
) -> list:
    """``[fn(**job) for job in jobs]`` in job order, on ``workers`` joblib processes.

    ``workers == 1`` runs in this process, ``0`` uses one worker per CPU core. Each run
    uses ``threads`` torch threads (0: leave the setting alone; a worker process then
    uses 1). Every run seeds itself, so results do not depend on ``workers``.
    """
    import joblib

    n_jobs = -1 if workers == 0 else max(workers, 1)
    if n_jobs != 1:
        threads = max(threads, 1)  # a fresh worker's default would oversubscribe the cores
    parallel = joblib.Parallel(n_jobs=n_jobs, return_as="generator")
    outputs = parallel(joblib.delayed(_call_with_threads)(fn, job, threads) for job in jobs)
    with progress_bar(outputs, total=len(jobs), desc=desc, enabled=progress) as bar:
        return list(bar)
